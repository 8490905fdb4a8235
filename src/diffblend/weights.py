"""Parsing of ``NAME=W,NAME=W`` strings (preference weights, weighted rewards); no torch.

One parser for every place that reads such a string (``--weights``, ``--reward a=0.5,b=0.5``,
reward specs in manifests); the callers add their own rules on top (w >= 0, sum to 1, canonical
reward names...).
"""

from __future__ import annotations

import math

__all__ = ["parse_weights"]


def parse_weights(text: str, what: str = "--weights", example: str = "legibility=0.7", *,
                  nonnegative: bool = False) -> dict[str, float]:
    """Parse ``"name=0.3,other=0.7"`` into ``{"name": 0.3, "other": 0.7}`` (names stripped, order kept).

    Args:
        text: the string.
        what: how the string is called in error messages (e.g. ``"--weights"``).
        example: an example item for the error messages.
        nonnegative: also refuse negative weights.

    Raises:
        ValueError: for an empty string, an item without ``=`` or a name, a repeated name, or a
            value that is not a finite number (>= 0 with ``nonnegative``); the message names ``what``
            and the item.
    """
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"{what} is empty; expected NAME=W[,NAME=W...], e.g. {example}")
    out: dict[str, float] = {}
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"{what} item {item!r} is malformed; expected NAME=W, e.g. {example}")
        if name in out:
            raise ValueError(f"{what} names {name!r} twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"{what} item {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(w) or (nonnegative and w < 0):
            rule = "a finite number >= 0" if nonnegative else "a finite number"
            raise ValueError(f"{what} item {item!r}: the weight must be {rule}")
        out[name] = w
    return out
