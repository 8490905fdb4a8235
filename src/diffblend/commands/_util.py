"""Small helpers shared by the CLI subcommands."""

from __future__ import annotations

from ..weights import parse_weights

__all__ = ["parse_weights"]
