"""Plug-ins: pipeline classes and the default model, registered by packages the library never imports.

The library (everything outside ``commands/``, ``cli.py`` and the ``zoo`` plug-in) does not import
the embedded model's package; the zoo registers itself here instead:

- :func:`register_pipeline_class`: a pipeline class loaded by the ``_class_name`` of a folder's
  ``model_index.json`` when it is not a diffusers class (the zoo's ``DigitsPipeline``);
- :func:`register_default_model`: what ``--model default`` / ``model=None`` means: a loader
  ``(device) -> pipeline``, its shipped adapters ``(include_oracles) -> {name: path}`` and the
  folder of their ``manifest.json``;
- rewards join ``diffblend.rewards.register_reward`` from the plug-in's ``register()``.

Plug-ins are modules with a ``register()`` function: :data:`BUILTIN_PLUGINS` (the zoo), then any
``diffblend.plugins`` entry point. :func:`load_plugins` runs each once, on the first lookup.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ["BUILTIN_PLUGINS", "DefaultModel", "load_plugins", "register_pipeline_class", "pipeline_class",
           "register_default_model", "default_model"]

BUILTIN_PLUGINS = ("diffblend.zoo.plugin",)
ENTRY_POINT_GROUP = "diffblend.plugins"

_PIPELINE_CLASSES: dict[str, type] = {}
_DEFAULT: list[DefaultModel] = []
_LOADED: set[str] = set()


@dataclass(frozen=True)
class DefaultModel:
    """The default model: ``load(device) -> pipeline``; ``adapters(include_oracles) -> {name: path}``;
    ``adapters_dir``: the folder of the adapters' manifest.json (or None); ``report_rewards``: rewards
    reported beside the adapters' own (e.g. the digits' legibility)."""

    load: Callable[[Any], Any]
    adapters: Callable[[bool], dict[str, Path]]
    adapters_dir: Path | None = None
    report_rewards: tuple[str, ...] = ()


def load_plugins() -> None:
    """Run ``register()`` of every plug-in not yet loaded (built-in ones, then entry points)."""
    names = list(BUILTIN_PLUGINS)
    try:
        from importlib.metadata import entry_points

        names += [ep.value for ep in entry_points(group=ENTRY_POINT_GROUP)]
    except Exception:  # noqa: BLE001  (broken metadata must not break the library)
        pass
    for name in names:
        if name in _LOADED:
            continue
        _LOADED.add(name)
        module_name, _, attr = name.partition(":")
        module = importlib.import_module(module_name)
        getattr(module, attr or "register")()


def register_pipeline_class(name: str, cls: type | Callable[[], type]) -> None:
    """Load folders whose model_index.json has ``_class_name`` = ``name`` with ``cls`` (a pipeline
    class, or a function returning it: registering then imports nothing heavy)."""
    if not isinstance(name, str) or not name:
        raise TypeError(f"name must be a non-empty str, got {name!r}")
    if not callable(cls):
        raise TypeError(f"cls must be a pipeline class or a function returning one, got {cls!r}")
    _PIPELINE_CLASSES[name] = cls


def pipeline_class(name: str | None) -> type | None:
    """The registered pipeline class for a ``_class_name``, or None (then diffusers' own)."""
    load_plugins()
    cls = _PIPELINE_CLASSES.get(str(name))
    return cls if cls is None or hasattr(cls, "from_pretrained") else cls()


def register_default_model(model: DefaultModel) -> None:
    """Make ``model`` the default (the last registration wins)."""
    if not isinstance(model, DefaultModel):
        raise TypeError(f"model must be a DefaultModel, got {type(model).__name__}")
    _DEFAULT[:] = [model]


def default_model() -> DefaultModel:
    """The registered default model; LookupError when no plug-in registered one."""
    load_plugins()
    if not _DEFAULT:
        raise LookupError("no default model is registered (the zoo plug-in is missing); pass a pipeline folder")
    return _DEFAULT[0]
