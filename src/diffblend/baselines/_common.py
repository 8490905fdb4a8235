"""Helpers shared by the sampling-time baselines (RGG, CoDe)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

# A differentiable score of images: (B, C, H, W) in [0, 1] -> (B,). The weighted reward
# sum_i w_i r_i, bound to the prompts of the batch by the caller.
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def repeat_cond(cond: Any, n: int) -> Any:
    """Repeat every batch row of a conditioning n times, sample-major (row b -> rows b*n..b*n+n-1).

    Tensors, dicts/lists/tuples of tensors and None are supported; other objects pass through.
    """
    if cond is None or n == 1:
        return cond
    if isinstance(cond, torch.Tensor):
        return cond.repeat_interleave(n, 0) if cond.dim() else cond
    if isinstance(cond, Mapping):
        return {k: repeat_cond(v, n) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(repeat_cond(v, n) for v in cond)
    return cond


def identity(x: torch.Tensor) -> torch.Tensor:
    return x
