"""Small helpers shared by the CLI subcommands."""

from __future__ import annotations

from ..weights import parse_weights

__all__ = ["parse_weights", "check_device", "set_threads"]


def set_threads(n: int | None) -> None:
    """``--threads``: ``torch.set_num_threads(n)`` for n >= 1 (None: leave torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)


def check_device(text: str, arg: str = "--device") -> str:
    """``text`` if torch can use it on this machine, else a ValueError naming ``arg`` (not a traceback later)."""
    import torch

    try:
        dev = torch.device(text)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{arg} {text!r} is not a torch device; e.g. cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda":
        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if n == 0:
            raise ValueError(f"{arg} {text!r}: CUDA is not available here (no GPU, or a CPU-only torch build); "
                             f"use --device cpu")
        if dev.index is not None and dev.index >= n:
            raise ValueError(f"{arg} {text!r}: only {n} CUDA device(s) here (cuda:0..cuda:{n - 1})")
    elif dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{arg} {text!r}: MPS is not available on this machine; use --device cpu")
    return text
