"""Helpers shared by the sampling-time baselines (RGG, CoDe)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from ..core.sampling import map_cond

# A differentiable score of images: (B, C, H, W) in [0, 1] -> (B,). The weighted reward
# sum_i w_i r_i, bound to the prompts of the batch by the caller.
ScoreFn = Callable[[torch.Tensor], torch.Tensor]


def repeat_cond(cond: Any, n: int) -> Any:
    """Repeat every batch row of a conditioning n times, sample-major (row b -> rows b*n..b*n+n-1).

    Tensors, dicts/lists/tuples of tensors and None are supported; other objects pass through.
    """
    if n == 1:
        return cond
    return map_cond(cond, lambda t: t.repeat_interleave(n, 0))


def identity(x: torch.Tensor) -> torch.Tensor:
    return x
