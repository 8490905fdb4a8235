"""Samplers that return transition log-probabilities, over the same schedule as diffusers. Torch only.

Glossary (DDIM, Song et al. 2021, eq. 12; DDPM, Ho et al. 2020, eqs. 6-7):
    alpha_bar_t   cumulative product of (1 - beta), ``alphas_cumprod[t]`` in diffusers
    x0_hat        Tweedie / predicted clean sample (x_t - sqrt(1 - alpha_bar_t) eps) / sqrt(alpha_bar_t)
    sigma_t       eta * sqrt((1 - alpha_bar_prev) / (1 - alpha_bar_t)) * sqrt(1 - alpha_bar_t / alpha_bar_prev)

The one model contract (k-diffusion style): ``denoiser(x_t, t, cond) -> prediction`` with
x_t of shape (B, ...), t a (B,) tensor of timesteps, and the prediction in the schedule's
``prediction_type`` ("epsilon", "v_prediction" or "sample"). Blending, conditioning and guidance
are closures around denoisers; the samplers never know how many models there are.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]
PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")

__all__ = [
    "NoiseSchedule",
    "StepOutput",
    "SampleOutput",
    "ddim_step",
    "ddpm_step",
    "sample",
    "run_steps",
    "randn",
    "cat_cond",
    "map_cond",
    "cfg_denoiser",
    "gaussian_log_prob",
]


@dataclass(frozen=True)
class NoiseSchedule:
    """A discrete VP schedule, as in diffusers' DDIM / DDPM schedulers.

    Attributes:
        alphas_cumprod: (T,) alpha_bar_t for t = 0..T-1 (float64 recommended).
        final_alpha_cumprod: alpha_bar used when the previous timestep is < 0 (diffusers:
            1.0 if ``set_alpha_to_one`` else ``alphas_cumprod[0]``).
        prediction_type: "epsilon", "v_prediction" or "sample".
    """

    alphas_cumprod: torch.Tensor
    final_alpha_cumprod: float = 1.0
    prediction_type: str = "epsilon"

    def __post_init__(self) -> None:
        if self.prediction_type not in PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {self.prediction_type!r}")

    @classmethod
    def linear(cls, num_train_timesteps: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
               schedule: str = "linear", **kwargs) -> NoiseSchedule:
        """diffusers' "linear" or "scaled_linear" (SD) beta schedules."""
        if schedule == "linear":
            betas = torch.linspace(beta_start, beta_end, num_train_timesteps, dtype=torch.float64)
        elif schedule == "scaled_linear":
            betas = torch.linspace(beta_start**0.5, beta_end**0.5, num_train_timesteps, dtype=torch.float64) ** 2
        else:
            raise ValueError(f"schedule must be 'linear' or 'scaled_linear', got {schedule!r}")
        return cls(alphas_cumprod=torch.cumprod(1.0 - betas, 0), **kwargs)

    @classmethod
    def from_scheduler(cls, scheduler: Any) -> NoiseSchedule:
        """Read the schedule of a diffusers DDIM/DDPM-style scheduler (duck-typed, no import)."""
        if not isinstance(getattr(scheduler, "alphas_cumprod", None), torch.Tensor):
            raise ValueError(f"{type(scheduler).__name__} has no alphas_cumprod: NoiseSchedule reads discrete "
                             f"VP schedulers (DDIM / DDPM style), not flow-matching or continuous-sigma ones")
        cfg = scheduler.config
        ac = scheduler.alphas_cumprod.to(torch.float64)
        final = 1.0 if getattr(cfg, "set_alpha_to_one", True) else float(ac[0])
        return cls(alphas_cumprod=ac, final_alpha_cumprod=final,
                   prediction_type=getattr(cfg, "prediction_type", "epsilon"))

    @property
    def num_train_timesteps(self) -> int:
        return int(self.alphas_cumprod.shape[0])

    def alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """alpha_bar at integer timesteps t (any shape); t < 0 gives final_alpha_cumprod."""
        t = torch.as_tensor(t, dtype=torch.long)
        ac = self.alphas_cumprod.to(t.device)
        out = ac[t.clamp(min=0)]
        return torch.where(t >= 0, out, torch.full_like(out, self.final_alpha_cumprod))

    def timesteps(self, num_inference_steps: int, spacing: str = "leading", steps_offset: int = 0) -> torch.Tensor:
        """Descending inference timesteps, as diffusers' ``set_timesteps`` makes them.

        The float spacings repeat numpy's arithmetic step by step (``np.arange(T, 0, -T / n)``:
        start + i * ((start - T / n) - start); ``np.linspace``: i * ((T - 1) / (n - 1)), last = T - 1),
        then round half to even: torch's own arange / linspace round differently and move some
        timesteps by one.
        """
        T, n = self.num_train_timesteps, int(num_inference_steps)
        if not 1 <= n <= T:
            raise ValueError(f"num_inference_steps must be in [1, {T}], got {num_inference_steps}")
        if spacing == "leading":
            vals = [i * (T // n) + steps_offset for i in range(n - 1, -1, -1)]
        elif spacing == "trailing":
            first, length = T - T / n, math.ceil(T / (T / n))
            delta = first - T
            vals = [T, first, *(T + i * delta for i in range(2, length))][:length]
            vals = [round(v) - 1 for v in vals]  # Python's round, like numpy's, is half to even
        elif spacing == "linspace":
            step = (T - 1) / (n - 1) if n > 1 else 0.0
            vals = [round(i * step) for i in range(n - 1)] + [T - 1 if n > 1 else 0]
            vals.reverse()
        else:
            raise ValueError(f"spacing must be 'leading', 'trailing' or 'linspace', got {spacing!r}")
        return torch.tensor(vals, dtype=torch.long)

    def to_eps_x0(self, pred: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Convert a model prediction to (eps, x0_hat) at timestep t ((B,) or scalar)."""
        a = self.alpha_bar(t).to(_coef_dtype(x_t))  # 1 - a is not formed in a half dtype
        sa, sb = _bcast(a.sqrt(), x_t), _bcast((1 - a).sqrt(), x_t)
        if self.prediction_type == "epsilon":
            eps = pred
            x0 = (x_t - sb * eps) / sa
        elif self.prediction_type == "v_prediction":
            x0 = sa * x_t - sb * pred
            eps = sa * pred + sb * x_t
        else:  # "sample"
            x0 = pred
            eps = (x_t - sa * x0) / sb
        return eps, x0

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Forward process q(x_t | x0) = N(sqrt(alpha_bar_t) x0, (1 - alpha_bar_t) I)."""
        a = self.alpha_bar(t).to(_coef_dtype(x0))
        return _bcast(a.sqrt(), x0) * x0 + _bcast((1 - a).sqrt(), x0) * noise


def _coef_dtype(like: torch.Tensor) -> torch.dtype:
    """The dtype schedule coefficients are formed in: at least float32, as diffusers forms them.
    In float16 / bfloat16, 1 - alpha_bar_t and 1 - alpha_bar_t / alpha_bar_prev cancel to a few
    bits or to 0 (bfloat16 rounds alpha_bar = 0.9983 to 1); only the finished coefficient is cast."""
    return torch.promote_types(like.dtype, torch.float32)


def _bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """(B,) or () -> broadcastable to like (B, ...), in like's dtype and device."""
    v = torch.as_tensor(v).to(device=like.device, dtype=like.dtype)
    return v.reshape(v.shape + (1,) * (like.dim() - v.dim())) if v.dim() else v


def randn(shape: Sequence[int], generators: torch.Generator | Sequence[torch.Generator] | None = None,
          dtype: torch.dtype = torch.float32, device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise of ``shape`` (B, ...), sample b drawn from ``generators[b]``.

    With one generator per sample, sample b's noise does not depend on the batch it is in, so a
    sweep over weights reuses the same noise (paired comparisons). Draws happen on the CPU, then
    move to ``device``, so the numbers are the same on every device.
    """
    shape = tuple(shape)
    if generators is None or isinstance(generators, torch.Generator):
        return torch.randn(shape, generator=generators, dtype=torch.float32).to(device=device, dtype=dtype)
    if len(generators) != shape[0]:
        raise ValueError(f"generators must have one generator per sample ({shape[0]}), got {len(generators)}")
    return torch.stack([torch.randn(shape[1:], generator=g, dtype=torch.float32) for g in generators]).to(
        device=device, dtype=dtype)


def gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """log N(x; mean, std^2 I) summed over all but the batch dimension; (B,).

    Dimensions where std == 0 (a deterministic transition) contribute 0: there is no randomness
    there to score, and the policy-gradient ratio of such a step is 1. Computed and returned in
    at least float32: a sum over thousands of dimensions in float16 / bfloat16 rounds to units.
    """
    dt = _coef_dtype(x)
    x, mean, std = x.to(dt), mean.to(dt), torch.as_tensor(std, device=x.device).to(dt)
    std = std.expand_as(x)
    pos = std > 0
    safe = torch.where(pos, std, torch.ones_like(std))
    lp = -((x - mean) ** 2) / (2 * safe**2) - safe.log() - 0.5 * math.log(2 * math.pi)
    return torch.where(pos, lp, torch.zeros_like(lp)).flatten(1).sum(1)


@dataclass
class StepOutput:
    """One reverse transition x_t -> x_prev.

    prev_sample: (B, ...) x_prev; log_prob: (B,) log p(x_prev | x_t) of the Gaussian transition;
    mean, std: its parameters (std broadcastable to x); x0_hat: the predicted clean sample.
    """

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    mean: torch.Tensor
    std: torch.Tensor
    x0_hat: torch.Tensor


def _finish_step(mean, std, x_t, x0_hat, generator, noise, prev_sample) -> StepOutput:
    if prev_sample is None:
        if noise is None:
            noise = randn(x_t.shape, generator, dtype=x_t.dtype, device=x_t.device)
        prev_sample = mean + std * noise
    return StepOutput(prev_sample, gaussian_log_prob(prev_sample, mean, std), mean, std, x0_hat)


def ddim_step(
    pred: torch.Tensor,
    t: int | torch.Tensor,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    prev_t: int | torch.Tensor,
    eta: float = 1.0,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """One DDIM step (Song et al., eq. 12), as ``diffusers.DDIMScheduler.step`` (no clipping).

    Args:
        pred: (B, ...) model prediction at (x_t, t).
        t, prev_t: current and previous integer timesteps (prev_t < 0 means the end).
        x_t: (B, ...) current sample.
        eta: 0 deterministic DDIM, 1 DDPM-like variance; in [0, 1].
        generator / noise: where the N(0, I) noise comes from (noise wins).
        prev_sample: score this given x_prev instead of drawing one (RL re-evaluation).
    """
    if not 0.0 <= eta <= 1.0:
        raise ValueError(f"eta must be in [0, 1], got {eta}")
    eps, x0_hat = schedule.to_eps_x0(pred, x_t, t)
    cdt = _coef_dtype(x_t)  # scalars or (B,), cast to x_t's dtype last
    a_t = schedule.alpha_bar(t).to(cdt)
    a_prev = schedule.alpha_bar(prev_t).to(device=a_t.device, dtype=cdt)
    variance = (1 - a_prev) / (1 - a_t) * (1 - a_t / a_prev)
    std = eta * variance.clamp(min=0).sqrt()
    mean = _bcast(a_prev.sqrt(), x_t) * x0_hat + _bcast((1 - a_prev - std**2).clamp(min=0).sqrt(), x_t) * eps
    return _finish_step(mean, _bcast(std, x_t), x_t, x0_hat, generator, noise, prev_sample)


def ddpm_step(
    pred: torch.Tensor,
    t: int | torch.Tensor,
    x_t: torch.Tensor,
    schedule: NoiseSchedule,
    prev_t: int | torch.Tensor,
    *,
    generator: torch.Generator | Sequence[torch.Generator] | None = None,
    noise: torch.Tensor | None = None,
    prev_sample: torch.Tensor | None = None,
) -> StepOutput:
    """One ancestral DDPM step (Ho et al., eqs. 6-7) with the posterior ("fixed_small") variance,
    as ``diffusers.DDPMScheduler.step`` (no clipping); prev_t may skip timesteps."""
    eps, x0_hat = schedule.to_eps_x0(pred, x_t, t)
    cdt = _coef_dtype(x_t)  # scalars or (B,), cast to x_t's dtype last
    a_t = schedule.alpha_bar(t).to(cdt)
    a_prev = schedule.alpha_bar(prev_t).to(device=a_t.device, dtype=cdt)
    a_prev = torch.where(torch.as_tensor(prev_t, device=a_prev.device) >= 0, a_prev, torch.ones_like(a_prev))
    alpha_t = a_t / a_prev  # the "current" alpha over the (possibly skipped) interval
    beta_t = 1 - alpha_t
    mean = (_bcast(a_prev.sqrt() * beta_t / (1 - a_t), x_t) * x0_hat
            + _bcast(alpha_t.sqrt() * (1 - a_prev) / (1 - a_t), x_t) * x_t)
    variance = ((1 - a_prev) / (1 - a_t) * beta_t).clamp(min=1e-20)
    t_pos = torch.as_tensor(t, device=variance.device) > 0  # no noise is added at t = 0 (diffusers' rule)
    std = _bcast(variance.sqrt() * t_pos, x_t)
    return _finish_step(mean, std, x_t, x0_hat, generator, noise, prev_sample)


# -- conditioning and guidance -----------------------------------------------------------------

def map_cond(cond: Any, fn: Callable[[torch.Tensor], torch.Tensor]) -> Any:
    """Apply ``fn`` to every tensor with a batch dimension in a conditioning (a tensor, nested
    dicts / lists / tuples of tensors, or None); 0-d tensors and other objects pass through."""
    if isinstance(cond, torch.Tensor):
        return fn(cond) if cond.dim() else cond
    if isinstance(cond, Mapping):
        return {k: map_cond(v, fn) for k, v in cond.items()}
    if isinstance(cond, (list, tuple)):
        return type(cond)(map_cond(v, fn) for v in cond)
    return cond


def cat_cond(a: Any, b: Any) -> Any:
    """Concatenate two conditionings along the batch: tensors, dicts/lists of tensors, or None."""
    if a is None and b is None:
        return None
    if isinstance(a, torch.Tensor):
        return torch.cat([a, b])
    if isinstance(a, Mapping):
        return {k: cat_cond(a[k], b[k]) for k in a}
    if isinstance(a, (list, tuple)):
        return type(a)(cat_cond(x, y) for x, y in zip(a, b))
    raise TypeError(f"cannot concatenate conditionings of type {type(a).__name__}")


def cfg_denoiser(denoiser: Denoiser, guidance_scale: float, uncond: Any) -> Denoiser:
    """Classifier-free guidance as a closure: pred_u + s (pred_c - pred_u), in one batched call.

    The wrapped denoiser sees the batch [uncond (B); cond (B)], the layout diffusers pipelines use.
    An LS blend (``core.blend_denoisers``) must be built with ``groups=2`` so that the two halves
    of a sample run the same drawn model; otherwise they draw independently (refused).
    """
    blend = getattr(denoiser, "blend", None)
    if getattr(blend, "method", None) == "ls" and getattr(denoiser, "groups", 1) != 2:
        raise ValueError(
            "classifier-free guidance around an LS blend would draw the uncond and cond halves of a sample "
            "independently: build it with blend_denoisers(denoisers, blend, groups=2)")

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        tt = torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() else t  # a scalar t serves both halves
        both = denoiser(torch.cat([x, x]), tt, cat_cond(uncond, cond))
        pred_u, pred_c = both.chunk(2)
        return pred_u + guidance_scale * (pred_c - pred_u)

    return guided


# -- the loop ----------------------------------------------------------------------------------

@dataclass
class SampleOutput:
    """Result of :func:`sample`.

    sample: (B, ...) final x_0. timesteps: (N,) the schedule used. latents: (N + 1, B, ...) the
    trajectory x_T..x_0 (if kept). log_probs: (N, B) per-transition log-probabilities.
    """

    sample: torch.Tensor
    timesteps: torch.Tensor
    log_probs: torch.Tensor
    latents: torch.Tensor | None = None
    x0_hats: list[torch.Tensor] = field(default_factory=list)


StepCallback = Callable[[int, torch.Tensor, StepOutput], "torch.Tensor | None"]


def sample(
    denoiser: Denoiser,
    x: torch.Tensor,
    schedule: NoiseSchedule,
    timesteps: torch.Tensor | Sequence[int],
    cond: Any = None,
    *,
    eta: float = 1.0,
    sampler: str = "ddim",
    guidance_scale: float = 1.0,
    uncond: Any = None,
    generators: torch.Generator | Sequence[torch.Generator] | None = None,
    callback: StepCallback | None = None,
    keep_trajectory: bool = False,
) -> SampleOutput:
    """Run the reverse process from x = x_T over ``timesteps`` (descending).

    Args:
        denoiser: ``denoiser(x_t, t, cond) -> prediction`` in ``schedule.prediction_type``.
        x: (B, ...) initial noise x_T (see :func:`randn` for per-sample seeds).
        timesteps: (N,) descending integer timesteps; the step after the last goes to -1.
        cond: conditioning passed through to the denoiser (tensor, dict, ... or None).
        eta: DDIM eta in [0, 1] (ignored by "ddpm").
        sampler: "ddim" or "ddpm".
        guidance_scale, uncond: classifier-free guidance when guidance_scale != 1.
        generators: one ``torch.Generator`` per sample (or one for all) for the step noise.
        callback: ``callback(i, t, step_output)`` after each step; may return a replacement x_prev
            (its log-probability under the step's Gaussian is then the one recorded).
        keep_trajectory: keep every x_t (for RL).
    """
    if sampler not in ("ddim", "ddpm"):
        raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {sampler!r}")
    ts = torch.as_tensor(timesteps, dtype=torch.long)
    model = denoiser if guidance_scale == 1.0 else cfg_denoiser(denoiser, guidance_scale, uncond)

    def step(i: int, pred: torch.Tensor, x_t: torch.Tensor) -> StepOutput:
        t, prev_t = ts[i], ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        if sampler == "ddim":
            return ddim_step(pred, t, x_t, schedule, prev_t, eta, generator=generators)
        return ddpm_step(pred, t, x_t, schedule, prev_t, generator=generators)

    return run_steps(model, x, ts, cond, step, callback=callback, keep_trajectory=keep_trajectory)


StepFn = Callable[[int, torch.Tensor, torch.Tensor], StepOutput]


def run_steps(model: Denoiser, x: torch.Tensor, ts: torch.Tensor, cond: Any, step: StepFn, *,
              callback: StepCallback | None = None, keep_trajectory: bool = False) -> SampleOutput:
    """The loop every sampler shares: ``pred = model(x, ts[i], cond)``, then ``step(i, pred, x)``.

    ts: (N,) the values the model is called with (integer timesteps, or sigma * 1000 for flow
    matching); ``step`` turns a prediction into a :class:`StepOutput`. ``callback`` and
    ``keep_trajectory`` as in :func:`sample`.
    """
    B = x.shape[0]
    latents, log_probs, x0s = [x] if keep_trajectory else None, [], []
    for i, t in enumerate(ts):
        out = step(i, model(x, t.expand(B).to(x.device), cond), x)
        if callback is not None:
            replaced = callback(i, t, out)
            if replaced is not None:  # score the sample the loop goes on from
                out.prev_sample, out.log_prob = replaced, gaussian_log_prob(replaced, out.mean, out.std)
        x = out.prev_sample
        log_probs.append(out.log_prob)
        x0s.append(out.x0_hat)
        if keep_trajectory:
            latents.append(x)
    return SampleOutput(
        sample=x,
        timesteps=ts,
        log_probs=torch.stack(log_probs) if log_probs else torch.zeros(0, B),
        latents=torch.stack(latents) if keep_trajectory else None,
        x0_hats=x0s,
    )
