"""Config dataclass fields that carry their help text: the one place a setting's name, type, default
and meaning are declared. The command line builds its options from them (``commands/_options.py``);
no torch at import."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import MISSING, field
from typing import Any

__all__ = ["setting"]


def setting(default: Any = MISSING, help: str = "", *, default_factory: Callable[[], Any] = MISSING,  # noqa: A002
            choices: Iterable[str] | None = None) -> Any:
    """A dataclass field whose ``metadata`` holds ``help`` (its meaning and unit) and, for a string
    setting, its allowed ``choices``.

    Example::

        @dataclass
        class Config:
            steps: int = setting(20, "DDIM steps per rollout")
    """
    meta: dict[str, Any] = {"help": help}
    if choices is not None:
        meta["choices"] = tuple(choices)
    return field(default=default, default_factory=default_factory, metadata=meta)
