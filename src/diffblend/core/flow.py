"""A stochastic sampler for flow-matching models (SD3, Flux) with transition log-probabilities. Torch only.

Rectified flow (diffusers' ``FlowMatchEulerDiscreteScheduler``): x_sigma = (1 - sigma) x0 + sigma eps,
sigma from 1 (noise) to 0 (data), and the model predicts the velocity v = E[eps - x0 | x_sigma].
The probability-flow ODE is dx = v dsigma (diffusers' Euler step). Since
E[eps | x] = x + (1 - sigma) v, the score is grad log p_sigma(x) = -(x + (1 - sigma) v) / sigma, and
the reverse-time SDE with the same marginals p_sigma for any diffusion g (Flow-GRPO, Liu et al. 2025,
eq. 9; Song et al. 2021 for the general reverse SDE) is, with dsigma < 0,

    dx = [v + g^2 / (2 sigma) (x + (1 - sigma) v)] dsigma + g dW,    g = a sqrt(sigma / (1 - sigma))

a = ``noise_level``. One Euler-Maruyama step from sigma to sigma_next (dt = sigma_next - sigma < 0)
is the Gaussian

    mean = x + dt [v + g^2 / (2 sigma) (x + (1 - sigma) v)],    std = g sqrt(-dt)

whose log-density is the step's log-probability (ddpo / DPOK / Flow-GRPO need it). a = 0 is the
Euler ODE step exactly; a > 0 injects fresh noise at every step, which is what DB-MPA-LS needs
for Prop. 2 (its draws of one model per step average out in distribution only then).

At sigma = 1, g is infinite (the SDE is singular at pure noise); there 1 - sigma is replaced by
1 - sigma_next, the value at the grid's next point (Flow-GRPO does the same on diffusers' grid).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from .sampling import (Denoiser, SampleOutput, StepCallback, StepOutput, _bcast, _coef_dtype, _finish_step, randn,
                       run_steps)

__all__ = ["flow_sde_step", "flow_sigmas", "sample_flow"]


def _check_noise_level(noise_level: float) -> float:
    if isinstance(noise_level, bool) or not isinstance(noise_level, (int, float)) \
            or not math.isfinite(noise_level) or noise_level < 0:
        raise ValueError(f"noise_level must be a finite number >= 0 (0: the Euler ODE), got {noise_level!r}")
    return float(noise_level)


def _sigma(value: float | torch.Tensor, like: torch.Tensor, name: str) -> torch.Tensor:
    """sigma as a tensor in the coefficient dtype on like's device, checked to lie in [0, 1]."""
    s = torch.as_tensor(value, dtype=_coef_dtype(like), device=like.device)  # a Python float at full precision
    if not bool(((s >= 0) & (s <= 1)).all()):
        raise ValueError(f"{name} must be in [0, 1] (1: pure noise, 0: data), got {value}")
    return s


def flow_sde_step(
    model_output: torch.Tensor,
    sigma: float | torch.Tensor,
    sigma_next: float | torch.Tensor,
    sample: torch.Tensor,
    noise_level: float,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    prev_sample: torch.Tensor | None = None,
    *,
    noise: torch.Tensor | None = None,
) -> StepOutput:
    """One Euler-Maruyama step of the flow-matching reverse SDE (module docstring), sigma -> sigma_next.

    Args:
        model_output: (B, ...) the velocity v predicted at (sample, sigma).
        sigma, sigma_next: current and next noise level, scalars or (B,), 0 <= sigma_next < sigma <= 1.
        sample: (B, ...) x at sigma.
        noise_level: a >= 0; 0 is diffusers' Euler ODE step, Flow-GRPO uses 0.7.
        generator / noise: where the N(0, I) noise comes from (noise wins); one generator per
            sample makes a sample's noise independent of its batch (see :func:`core.randn`).
        prev_sample: score this given x at sigma_next instead of drawing one (RL re-evaluation).

    Returns:
        :class:`StepOutput` (prev_sample, log_prob (B,), mean, std, x0_hat = x - sigma v). The maths
        runs in at least float32 (mean and std stay there); prev_sample and x0_hat have sample's
        dtype, and log_prob scores prev_sample as returned. With noise_level = 0, std = 0 and
        log_prob = 0 (a deterministic step has nothing to score).
    """
    a = _check_noise_level(noise_level)
    s, s_next = _sigma(sigma, sample, "sigma"), _sigma(sigma_next, sample, "sigma_next")
    dt = s_next - s  # < 0: sigma decreases towards the data
    if not bool((dt < 0).all()):
        raise ValueError(f"sigma_next must be < sigma (sampling goes from noise to data), got {sigma_next} >= {sigma}")
    cdt = _coef_dtype(sample)  # the maths in at least float32 (bf16 drifts overflow, Flow-GRPO notes)
    x, v = sample.to(cdt), model_output.to(cdt)
    x0_hat = x - _bcast(s, x) * v
    if a == 0:  # the ODE: exactly diffusers' Euler step, x + dt v
        mean, std = x + _bcast(dt, x) * v, torch.zeros((), dtype=cdt, device=x.device)
    else:
        one_minus = torch.where(s < 1, 1 - s, 1 - s_next)  # at sigma = 1, g is infinite: the next grid point's
        g2 = a**2 * s / one_minus  # g^2
        drift = v + _bcast(g2 / (2 * s), x) * (x + _bcast(1 - s, x) * v)
        mean, std = x + _bcast(dt, x) * drift, _bcast((g2 * -dt).sqrt(), x)
    if prev_sample is None:
        if noise is None and a > 0:
            noise = randn(x.shape, generator, dtype=cdt, device=x.device)
        prev_sample = (mean if a == 0 else mean + std * noise).to(sample.dtype)  # scored as returned
    return _finish_step(mean, std, x, x0_hat.to(sample.dtype), generator, noise, prev_sample)


def flow_sigmas(num_inference_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The (N + 1,) descending sigma grid of diffusers' ``FlowMatchEulerDiscreteScheduler.set_timesteps``
    (static shift, no Karras / exponential / beta spacing), ending with the appended 0, in float32.

    N values evenly spaced from 1 to 1 / T, shifted by sigma -> shift sigma / (1 + (shift - 1) sigma)
    (SD3: shift = 3), then 0.
    """
    n = int(num_inference_steps)
    if n < 1:
        raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
    if not math.isfinite(shift) or shift <= 0:
        raise ValueError(f"shift must be a finite number > 0, got {shift}")
    T = int(num_train_timesteps)
    # diffusers spaces timesteps from sigma_max * T to sigma_min * T, both shifted in float32 first
    ends = torch.tensor([1.0, 1.0 / T], dtype=torch.float32)
    ends = (shift * ends / (1 + (shift - 1) * ends)).double()
    s = torch.linspace(float(ends[0]) * T, float(ends[1]) * T, n, dtype=torch.float64) / T
    s = shift * s / (1 + (shift - 1) * s)
    return torch.cat([s.float(), torch.zeros(1)])


def sample_flow(
    denoiser: Denoiser,
    x: torch.Tensor,
    sigmas: torch.Tensor | Sequence[float],
    cond: Any = None,
    *,
    noise_level: float = 0.7,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    keep_trajectory: bool = False,
    time_scale: float = 1000.0,
) -> SampleOutput:
    """Run the flow-matching SDE (or the ODE, noise_level = 0) from x = x_1 over ``sigmas``.

    Args:
        denoiser: ``denoiser(x, t, cond) -> v`` with t = sigma * time_scale, (B,): diffusers'
            transformers take ``timestep = sigma * num_train_timesteps``. Wrap it in
            ``core.cfg_denoiser`` for classifier-free guidance.
        x: (B, ...) initial noise at sigmas[0] (1 for text-to-image).
        sigmas: (N + 1,) descending noise levels ending at the last target (0), e.g.
            :func:`flow_sigmas` or a diffusers scheduler's ``sigmas`` after ``set_timesteps``.
        noise_level, generators: as in :func:`flow_sde_step`.
        callback, keep_trajectory: as in :func:`core.sample`.

    Returns:
        :class:`SampleOutput` with ``timesteps`` = sigmas[:-1] * time_scale (what the model saw).
    """
    _check_noise_level(noise_level)
    sig = torch.as_tensor(sigmas).flatten()
    if sig.numel() < 2:
        raise ValueError(f"sigmas must hold at least two values (start and end), got {sig.numel()}")

    def step(i: int, v: torch.Tensor, x_t: torch.Tensor) -> StepOutput:
        return flow_sde_step(v, sig[i], sig[i + 1], x_t, noise_level, generators)

    return run_steps(denoiser, x, sig[:-1] * time_scale, cond, step, callback=callback,
                     keep_trajectory=keep_trajectory)
