"""Checks of user-given settings shared by the API, the CLI and the app; no torch at import.

Each raises a ``ValueError`` that names the argument (``arg``: the keyword in the API, the flag in the CLI)
and what is allowed, so a bad value never turns into a traceback deep inside a pipeline or, worse, a
silently different image.
"""

from __future__ import annotations

import math

__all__ = ["MAX_SEED", "check_seed", "check_guidance_scale", "check_count", "check_output_file"]

MAX_SEED = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit integer


def check_seed(seed: object, count: int = 1, arg: str = "seed") -> int:
    """``seed`` if it is an int such that seeds ``seed .. seed + count - 1`` all fit a torch generator."""
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"{arg} must be an integer, got {seed!r}")
    if seed < 0 or seed + max(count, 1) - 1 > MAX_SEED:
        top = MAX_SEED - max(count, 1) + 1
        raise ValueError(f"{arg} must be in [0, {top}]" + (f" (it seeds {count} images: seed .. seed + {count - 1})"
                                                           if count > 1 else "") + f", got {seed}")
    return seed


def check_guidance_scale(value: object, arg: str = "guidance_scale") -> float:
    """A finite guidance scale >= 0 (diffusers runs no guidance at all for scales <= 1)."""
    try:
        scale = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{arg} must be a number, got {value!r}") from None
    if not math.isfinite(scale) or scale < 0:
        raise ValueError(f"{arg} must be a finite number >= 0 (1 or less: no classifier-free guidance), got {value!r}")
    return scale


def check_count(value: object, arg: str, minimum: int = 1) -> int:
    """An integer >= ``minimum`` (image counts, steps...)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{arg} must be an integer >= {minimum}, got {value!r}")
    return value


def check_output_file(path: str, arg: str = "-o") -> str:
    """``path`` if a file can be written there (not a folder, no parent that is a file), checked before any work;
    the errors name ``arg`` (the flag or keyword; "" for none)."""
    from pathlib import Path

    p = Path(path)
    what = f"{arg} {str(path)!r}" if arg else repr(str(path))
    if p.is_dir():
        raise IsADirectoryError(f"{what} is a folder; give a file name (e.g. {str(p / 'out.png')!r})")
    for parent in p.parents:
        if parent.exists():
            if not parent.is_dir():
                raise NotADirectoryError(f"cannot write {what}: {str(parent)!r} is a file, not a folder")
            break
    return str(path)
