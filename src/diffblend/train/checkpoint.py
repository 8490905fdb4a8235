"""Checkpoints of a fine-tuning run: LoRA weights, optimizer, RNG and step, each written atomically.

A checkpoint is one file ``checkpoints/epoch-NNNNNN.pt`` written to a temporary name and renamed
(``os.replace``), so a run killed at any moment leaves either the previous checkpoints or the new
one complete, never a torn file; resuming takes the newest one.
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write

__all__ = ["save_checkpoint", "latest_checkpoint", "load_checkpoint", "prune_checkpoints"]

_NAME = re.compile(r"^epoch-(\d{6})\.pt$")


def save_checkpoint(folder: str | os.PathLike, epoch: int, state: dict[str, Any]) -> Path:
    """Write ``state`` (plus ``epoch``, the number of finished epochs) as ``folder/epoch-NNNNNN.pt``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"epoch-{epoch:06d}.pt"
    atomic_write(path, lambda tmp: torch.save({**state, "epoch": int(epoch)}, tmp))
    return path


def _checkpoints(folder: Path) -> list[tuple[int, Path]]:
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


def latest_checkpoint(folder: str | os.PathLike) -> Path | None:
    """The newest complete checkpoint in ``folder``, or None."""
    found = _checkpoints(Path(folder))
    return found[-1][1] if found else None


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint on the CPU (it holds tensors, optimizer state and generator states only)."""
    return torch.load(path, map_location="cpu", weights_only=True)


def prune_checkpoints(folder: str | os.PathLike, keep: int) -> None:
    """Delete all but the ``keep`` newest checkpoints (and stale temporary files of dead runs)."""
    folder = Path(folder)
    for _, p in _checkpoints(folder)[:-keep] if keep > 0 else []:
        p.unlink(missing_ok=True)
    for p in folder.glob(".epoch-*.tmp") if folder.is_dir() else []:
        if not p.name.endswith(f".{os.getpid()}.tmp"):
            p.unlink(missing_ok=True)
