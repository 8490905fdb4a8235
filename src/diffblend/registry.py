"""Plug-ins: pipeline classes and the default model, registered by packages the library never imports.

The library (everything outside ``commands/``, ``cli.py`` and the ``zoo`` plug-in) does not import
the embedded model's package; the zoo registers itself here instead:

- :func:`register_pipeline_class`: a pipeline class loaded by the ``_class_name`` of a folder's
  ``model_index.json`` when it is not a diffusers class (the zoo's ``DigitsPipeline``);
- :func:`register_default_model`: an embedded model, by name (``--model NAME``); the default one is what
  ``model=None`` means: a loader ``(device) -> pipeline``, its shipped adapters
  ``(include_oracles) -> {name: path}``, the folder of their ``manifest.json``, the prompts commands
  use when given none, and the demo's pair of adapters;
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
           "register_default_model", "default_model", "embedded_models", "use_default_model"]

BUILTIN_PLUGINS = ("diffblend.zoo.plugin",)
ENTRY_POINT_GROUP = "diffblend.plugins"

_PIPELINE_CLASSES: dict[str, type] = {}
_MODELS: dict[str, DefaultModel] = {}  # embedded models by name
_DEFAULT: list[str] = []  # the name of the default one
_LOADED: set[str] = set()


@dataclass(frozen=True)
class DefaultModel:
    """An embedded model: ``load(device) -> pipeline``; ``adapters(include_oracles) -> {name: path}``;
    ``adapters_dir``: the folder of the adapters' manifest.json (or None); ``report_rewards``: rewards
    reported beside the adapters' own (e.g. the digits' legibility); ``name``: what ``--model NAME``
    selects; ``prompts``: what commands generate or train on when given no prompts; ``demo_pair``: the
    two adapters ``diffblend demo`` blends; ``guidance_scale``: its CFG scale at generation;
    ``filtered_finetune``: its best-of-n trainer on rendered scenes, ``(FinetuneConfig, run_dir, out, *, resume,
    progress, stop_after) -> summary`` (``diffblend finetune --algorithm filtered``), or None."""

    load: Callable[[Any], Any]
    adapters: Callable[[bool], dict[str, Path]]
    adapters_dir: Path | None = None
    report_rewards: tuple[str, ...] = ()
    name: str = "default"
    prompts: tuple[str, ...] = ()
    demo_pair: tuple[str, str] | None = None
    guidance_scale: float = 2.0
    filtered_finetune: Callable[..., dict] | None = None


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


def register_default_model(model: DefaultModel, default: bool = True) -> None:
    """Register the embedded ``model`` under ``model.name``; ``default``: make it what ``model=None``
    means (the last such registration wins)."""
    if not isinstance(model, DefaultModel):
        raise TypeError(f"model must be a DefaultModel, got {type(model).__name__}")
    _MODELS[model.name] = model
    if default or not _DEFAULT:
        _DEFAULT[:] = [model.name]


def embedded_models() -> list[str]:
    """Names of the registered embedded models (the default first)."""
    load_plugins()
    return sorted(_MODELS, key=lambda n: (n not in _DEFAULT, n))


def default_model(name: str | None = None) -> DefaultModel:
    """The embedded model ``name`` (None: the default); LookupError when there is none such."""
    load_plugins()
    if name is None:
        if not _DEFAULT:
            raise LookupError("no default model is registered (the zoo plug-in is missing); pass a pipeline folder")
        name = _DEFAULT[0]
    if name not in _MODELS:
        raise LookupError(f"no embedded model {name!r}; embedded models: {', '.join(embedded_models()) or 'none'}")
    return _MODELS[name]


def use_default_model(name: str) -> str:
    """Make the embedded model ``name`` the default; returns the previous default's name (to restore it)."""
    model = default_model(name)
    previous = default_model().name
    _DEFAULT[:] = [model.name]
    return previous
