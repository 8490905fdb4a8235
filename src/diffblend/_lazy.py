"""Lazy package exports (PEP 562): a name is imported from its submodule on first use."""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(package: str, where: Mapping[str, str], namespace: dict) -> tuple[Callable[[str], Any],
                                                                                   Callable[[], list[str]]]:
    """``(__getattr__, __dir__)`` for ``package`` whose public names live in submodules: ``where`` maps a name to
    its submodule (relative, without the dot); ``namespace`` is the package's ``globals()``, where a name is
    cached once imported (later lookups skip ``__getattr__``)."""
    def __getattr__(name: str) -> Any:
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(f".{where[name]}", package), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
