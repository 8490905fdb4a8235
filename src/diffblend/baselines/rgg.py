"""Reward-gradient guidance (RGG), the guidance baseline of the paper (PAPER.md, "Baselines").

At every stochastic step x_t -> x_{t-1} the sampler adds the gradient of the weighted reward
evaluated on the Tweedie estimate of the clean sample:

    x_{t-1} = mu_t + sigma_t z + s_i * sigma_t^2 * g_t / alpha,
    g_t     = grad_{x_t} r(decode(x0_hat(x_t))),
    x0_hat  = (x_t - sqrt(1 - alpha_bar_t) eps.detach()) / sqrt(alpha_bar_t)

where sigma_t is the DDIM standard deviation (eta included, so sigma_t^2 = eta^2 sigma_t(eta=1)^2),
alpha = ``kl_coeff`` the KL weight of the target p_pre exp(r / alpha), and r = sum_i w_i r_i. The
model's noise estimate eps is detached (the guidance does not back-propagate through the denoiser;
for v- and x0-models eps is derived from the prediction first), so the only backward pass is
through ``decode`` and the reward. Options as in the authors' baseline
(kl_coeff 0.1, gradient normalisation, tempering gamma 0.024):

- gradient normalisation ("rms"): g_t is divided by its root-mean-square over the pixels of each
  sample, so that every pixel's guidance has unit scale whatever the reward's units. (The
  authors' script only names a per-pixel normalisation flag; this is our reading of it.)
- tempering: s_i = min((1 + gamma)^i - 1, 1) at step i = 0..N-1, the exponential tempering
  schedule of DAS (Kim et al. 2025), which the authors' baseline builds on; without it s_i = 1.

Cost: one denoiser evaluation per step plus one reward forward and backward per step; callers
time the whole call (seconds per image), which counts the backward honestly.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Any

import torch

from .._fields import setting
from ..core.sampling import Denoiser, NoiseSchedule, ddim_step
from ._common import ScoreFn, identity

__all__ = ["RGGConfig", "RGGOutput", "rgg_sample", "tempering_scale"]


@dataclass(frozen=True)
class RGGConfig:
    """Settings of reward-gradient guidance."""

    kl_coeff: float = setting(0.1, "alpha, KL weight of the target; guidance scales as 1 / alpha (reward units)")
    grad_norm: str | None = setting("rms", "gradient normalisation: rms (unit per-pixel RMS per sample) or none "
                                           "(the raw gradient)", choices=("rms",))
    tempering_gamma: float | None = setting(0.024, "tempering gamma: s_i = min((1+gamma)^i - 1, 1); none: s_i = 1")
    eta: float = setting(1.0, "DDIM eta; guidance needs noise (sigma_t > 0), so eta = 0 gives no guidance")

    def __post_init__(self) -> None:
        if not self.kl_coeff > 0:
            raise ValueError(f"kl_coeff must be > 0, got {self.kl_coeff}")
        if self.grad_norm not in (None, "rms"):
            raise ValueError(f"grad_norm must be None or 'rms', got {self.grad_norm!r}")
        if self.tempering_gamma is not None and not self.tempering_gamma > 0:
            raise ValueError(f"tempering_gamma must be > 0 or None, got {self.tempering_gamma}")
        if not 0.0 <= self.eta <= 1.0:
            raise ValueError(f"eta must be in [0, 1], got {self.eta}")


@dataclass
class RGGOutput:
    """sample: (B, ...) x_0; nfe: denoiser evaluations per sample; reward_grads: reward
    forward+backward passes per sample."""

    sample: torch.Tensor
    nfe: int
    reward_grads: int


def tempering_scale(i: int, gamma: float | None) -> float:
    """s_i = min((1 + gamma)^i - 1, 1) (DAS's exponential schedule); 1 when gamma is None."""
    if gamma is None:
        return 1.0
    return min((1.0 + gamma) ** i - 1.0, 1.0)


def _reward_grad(score_fn: ScoreFn, decode: Callable, schedule: NoiseSchedule, pred: torch.Tensor,
                 x_t: torch.Tensor, t: torch.Tensor, grad_norm: str | None) -> torch.Tensor:
    """grad_{x_t} score(decode(x0_hat(x_t))) with eps held fixed; (B, ...).

    x0_hat(x) = (x - sqrt(1 - a) eps) / sqrt(a), eps the model's (detached) noise estimate at x_t,
    whatever it predicts: holding a v or x0 prediction fixed instead would scale the gradient by
    alpha_bar_t (v) or zero it (x0).
    """
    eps, _ = schedule.to_eps_x0(pred.detach(), x_t.detach(), t)
    eps_schedule = replace(schedule, prediction_type="epsilon")
    with torch.enable_grad():
        x = x_t.detach().requires_grad_(True)
        _, x0_hat = eps_schedule.to_eps_x0(eps, x, t)
        scores = score_fn(decode(x0_hat))
        if scores.shape != (x.shape[0],):
            raise ValueError(f"score_fn must return shape ({x.shape[0]},), got {tuple(scores.shape)}")
        if not scores.requires_grad:  # no differentiable term (e.g. all its weight on JPEG size)
            return torch.zeros_like(x)
        (g,) = torch.autograd.grad(scores.sum(), x)  # samples are independent: sum gives each its own
    g = torch.nan_to_num(g)
    if grad_norm == "rms":  # a zero gradient stays zero (rms clamped away from 0)
        rms = g.flatten(1).pow(2).mean(1).sqrt().clamp(min=1e-12)
        g = g / rms.view(-1, *([1] * (g.dim() - 1)))
    return g


@torch.no_grad()
def rgg_sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    cond: Any = None,
    *,
    score_fn: ScoreFn,
    config: RGGConfig = RGGConfig(),
    decode: Callable[[torch.Tensor], torch.Tensor] = identity,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
) -> RGGOutput:
    """Sample with reward-gradient guidance on the DDIM sampler of the core.

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> prediction`` (guidance such as CFG already inside).
        x: (B, ...) initial noise x_T.
        timesteps: (N,) descending integer timesteps.
        score_fn: differentiable ``images -> (B,)`` weighted reward sum_i w_i r_i (higher is better).
        decode: differentiable map from x0 to the images the reward reads (identity for pixel
            models with images in the reward's range; VAE decode for latent models).
        generators: one ``torch.Generator`` per sample for the step noise (paired comparisons).

    Returns:
        :class:`RGGOutput`.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.long)
    B = x.shape[0]
    n_grads = 0
    for i, t in enumerate(ts):
        prev_t = ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        t_b = t.expand(B).to(x.device)
        pred = denoiser(x, t_b, cond)
        out = ddim_step(pred, t, x, schedule, prev_t, config.eta, generator=generators)
        s = tempering_scale(i, config.tempering_gamma)
        if s > 0 and bool((out.std > 0).any()):
            g = _reward_grad(score_fn, decode, schedule, pred, x, t_b, config.grad_norm)
            x = out.prev_sample + (s / config.kl_coeff) * out.std**2 * g
            n_grads += 1
        else:
            x = out.prev_sample
    return RGGOutput(sample=x, nfe=len(ts), reward_grads=n_grads)
