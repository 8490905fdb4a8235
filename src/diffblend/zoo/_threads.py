"""The ``--threads`` option of the zoo commands (generate, demo, train-base)."""

from __future__ import annotations


def set_threads(n: int | None) -> None:
    """``torch.set_num_threads(n)`` for n >= 1 (None: leave torch's default)."""
    if n is None:
        return
    if n < 1:
        raise ValueError(f"--threads must be >= 1, got {n}")
    import torch

    torch.set_num_threads(n)
