"""Preference weights that change over the denoising steps, w(t). Torch only.

The blend's target is fixed by w at t = 0 (there the blended score is the target's score), while
the Jensen gap of Lemma 1 is zero at t = 0 and largest at mid t. So any schedule with w(0) = w
keeps the t = 0 score exact and may trade some of the bias at t > 0. A schedule is a callable
``weights_at(t) -> w`` (t an integer timestep, w a mapping or sequence as in :meth:`Blend.create`).

:func:`ramp` is the simple family tried on the toy: w(t) = w + delta * (1 - alpha_bar_t) * (e_j - w),
a shift toward (delta > 0) or away from (delta < 0) adapter j that grows with the noise level.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from .blend import Blend, blend_denoisers
from .sampling import NoiseSchedule

__all__ = ["scheduled_blend_denoisers", "ramp"]

WeightsAt = Callable[[int], "Mapping[str, float] | Sequence[float]"]


def scheduled_blend_denoisers(denoisers: Mapping[str, Callable], adapter_names: Sequence[str], weights_at: WeightsAt,
                              *, kl_strength: float = 1.0, method: str = "mpa", seed: int = 0) -> Callable:
    """A denoiser that blends with w(t) = ``weights_at(t)`` at each call (one timestep per batch).

    Each step's blend is a validated :class:`Blend` (w >= 0 summing to 1), built once per
    timestep and run by :func:`core.blend_denoisers`.
    """
    if not callable(weights_at):
        raise TypeError(f"weights_at must be a callable t -> weights, got {type(weights_at).__name__}")
    names = tuple(adapter_names)
    cache: dict[int, Callable] = {}

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        tt = torch.as_tensor(t).flatten()
        if not bool((tt == tt[0]).all()):
            raise ValueError("a weight schedule needs one timestep per batch")
        key = int(tt[0])
        if key not in cache:
            try:
                blend = Blend.create(weights_at(key), names, kl_strength=kl_strength, method=method, seed=seed)
            except ValueError as exc:
                raise ValueError(f"weights_at({key}): {exc}") from None
            cache[key] = blend_denoisers(denoisers, blend)
        return cache[key](x, t, cond)

    return denoiser


def ramp(weights: Sequence[float], toward: int, delta: float, schedule: NoiseSchedule) -> WeightsAt:
    """w(t) = w + delta * (1 - alpha_bar_t) * (e_toward - w): w at t = 0, shifted with the noise level.

    Args:
        weights: w (sums to 1), in adapter order.
        toward: index j of the adapter the shift moves toward (delta > 0) or away from (delta < 0).
        delta: the shift at alpha_bar = 0, in [-1, 1]; negative values may need w_j > 0 to stay >= 0.
        schedule: gives alpha_bar_t.
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    if not 0 <= toward < len(w):
        raise ValueError(f"toward must index an adapter (0..{len(w) - 1}), got {toward}")
    if not -1.0 <= delta <= 1.0:
        raise ValueError(f"delta must be in [-1, 1], got {delta}")
    e = torch.zeros_like(w)
    e[toward] = 1.0

    def weights_at(t: int) -> list[float]:
        g = 1.0 - float(schedule.alpha_bar(torch.tensor(t)))
        out = w + delta * g * (e - w)
        return (out.clamp(min=0) / out.clamp(min=0).sum()).tolist()

    return weights_at
