"""Correctors for the Jensen gap of DB-MPA: SMC toward the geometric mixture, and Langevin. Torch only.

Why DB-MPA is biased. With sum_k c_k = 1 the target of a blend is the geometric mixture of the
aligned models, p_pre exp(lambda r(w) / alpha) = prod_k p_k^{c_k} (k over [base, adapters]), and
the blended prediction eps_bar = sum_k c_k eps_k is, at every t, exactly the score of the
geometric mixture of the *noised* models,

    pi_t(x) ∝ prod_k p_{k,t}(x)^{c_k},    grad log pi_t = -sum_k c_k eps_k / sqrt(1 - alpha_bar_t).

pi_0 is the target, but pi_t is not the noised target at t > 0, and the reverse SDE driven by the
score of pi_t does not carry pi_t to pi_{t-1}: the geometric mixture of marginals is not a
diffusion's marginal. With the forward SDE dx = f dt + g dW, each p_{k,t} solves the Fokker-Planck
equation, and the unnormalised pi_t = prod_k p_{k,t}^{c_k} solves it plus a reaction term,

    d/dt pi_t = FP(pi_t) + V_t pi_t,   V_t(x) = g_t^2 / 2 (sum_k c_k |s_k|^2 - |sum_k c_k s_k|^2),

V the c-weighted spread of the scores s_k (no divergence term; cf. the Feynman-Kac correctors
of Skreta et al., ICML 2025). So particles that follow DB-MPA's own reverse SDE and carry the
log-weight -int V dtau (reverse time) are, weighted, samples of pi_t at every t, and of the exact
target at t = 0. On a VP schedule one step t -> t_prev of length g^2 dtau = 1 - alpha_bar_t /
alpha_bar_prev gives (left-point rule, :func:`fk_log_weight`)

    log w += -(1 - alpha_bar_t / alpha_bar_prev) / (2 (1 - alpha_bar_t)) * sum_k c_k |eps_k - eps_bar|^2,

computed from the per-model predictions DB-MPA evaluates anyway: no extra model evaluation; the
cost is the number of particles per output sample. :class:`BlendSMC` runs it inside
:func:`core.sample` (its ``denoiser`` and its ``callback``).

Langevin (Du et al., ICML 2023, "Reduce, Reuse, Recycle"): a few Langevin steps with the blended
score after each denoising step (:class:`LangevinCorrector`) pull the particles toward pi_t at the
current t. pi_t is not the noised target, so this cannot remove the bias by itself; in the limit
of many steps the particles follow pi_t, which becomes the target only as t -> 0, where modes are
separated and Langevin no longer moves mass between them: it fixes shapes within modes, not the
weights of modes (SMC's weights do). Cost: m model evaluations per corrector step.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .blend import Blend, combine
from .sampling import NoiseSchedule, StepOutput, map_cond, randn, sample

__all__ = ["fk_log_weight", "score_spread", "systematic_resample", "effective_sample_size", "BlendSMC",
           "LangevinCorrector"]


def score_spread(preds: torch.Tensor, coeffs: torch.Tensor) -> torch.Tensor:
    """sum_k c_k |eps_k - eps_bar|^2 per sample, eps_bar = sum_k c_k eps_k; preds (K, B, ...) -> (B,).

    For c >= 0 it is a variance (>= 0); with lambda > 1 (a negative base coefficient) it can be < 0.
    """
    c = torch.as_tensor(coeffs, dtype=preds.dtype, device=preds.device)
    dev = preds - combine(preds, c)[None]
    sq = dev.flatten(2).pow(2).sum(-1)  # (K, B)
    return (c[:, None] * sq).sum(0)


def fk_log_weight(preds: torch.Tensor, coeffs: torch.Tensor, alpha_bar_t: torch.Tensor | float,
                  alpha_bar_prev: torch.Tensor | float) -> torch.Tensor:
    """The log-weight increment of one reverse step t -> t_prev toward prod_k p_{k,t}^{c_k}; (B,).

    -(1 - a_t / a_prev) / (2 (1 - a_t)) * sum_k c_k |eps_k - eps_bar|^2 (see the module docstring),
    from the eps predictions (K, B, ...) at (x_t, t).
    """
    a_t = torch.as_tensor(alpha_bar_t, dtype=torch.float64)
    a_prev = torch.as_tensor(alpha_bar_prev, dtype=torch.float64)
    scale = (1 - a_t / a_prev) / (2 * (1 - a_t))
    return -scale.to(preds.dtype) * score_spread(preds, coeffs)


def effective_sample_size(log_w: torch.Tensor) -> torch.Tensor:
    """ESS = (sum w)^2 / sum w^2 per row of log_w (G, P) -> (G,), in [1, P]."""
    w = torch.softmax(log_w, -1)
    return 1.0 / (w**2).sum(-1)


def systematic_resample(log_w: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Systematic resampling within each row of log_w (G, P): (G, P) indices into that row.

    Particle p is copied floor or ceil of P w_p times (expected P w_p), one uniform per row.
    """
    G, P = log_w.shape
    w = torch.softmax(log_w.to(torch.float64), -1).cpu()
    u = torch.rand(G, 1, generator=generator, dtype=torch.float64)
    points = (u + torch.arange(P, dtype=torch.float64)) / P
    cdf = w.cumsum(-1)
    cdf = cdf / cdf[:, -1:]
    return torch.searchsorted(cdf, points, right=True).clamp_(max=P - 1).to(log_w.device)


class BlendSMC:
    """DB-MPA with sequential Monte Carlo toward the geometric mixture (the blend's exact target).

    The batch holds B groups of ``particles`` consecutive rows (B * P rows; make x with
    :meth:`expand`). Use ``smc.denoiser`` as the denoiser of :func:`core.sample` and ``smc`` as its
    ``callback``; after sampling, :meth:`select` picks one particle per group by its final weight.

    Args:
        denoisers: ``{name: denoiser}`` over the blend's active models (eps predictions).
        blend: an MPA blend (any lambda: the weights need only sum_k c_k = 1).
        schedule: the VP schedule the sampler runs.
        timesteps: the timesteps the sampler runs (descending), to know t_prev of step i.
        particles: P, particles per output sample (P = 1: plain DB-MPA).
        ess_threshold: resample a group when its ESS falls below this fraction of P.
        generator: randomness of the resampling.
        log_density: optional ``{name: fn(x, t) -> (B,)}`` exact log p_{k,t} (the analytic toy
            only): then the exact discrete-time weight replaces the score-only one (a reference).
    """

    def __init__(self, denoisers: Mapping[str, Callable], blend: Blend, schedule: NoiseSchedule, timesteps,
                 particles: int, *, ess_threshold: float = 0.5, generator: torch.Generator | None = None,
                 log_density: Mapping[str, Callable] | None = None):
        if blend.method != "mpa":
            raise ValueError(f"BlendSMC corrects DB-MPA: blend.method must be 'mpa', got {blend.method!r}")
        if isinstance(particles, bool) or not isinstance(particles, int) or particles < 1:
            raise ValueError(f"particles must be an int >= 1, got {particles!r}")
        if not 0.0 <= ess_threshold <= 1.0:
            raise ValueError(f"ess_threshold must be in [0, 1], got {ess_threshold}")
        if schedule.prediction_type != "epsilon":
            raise ValueError("BlendSMC reads eps predictions: the schedule's prediction_type must be 'epsilon'")
        self.active = blend.active()
        missing = [n for n, _ in self.active if n not in denoisers]
        if missing:
            raise ValueError(f"denoisers is missing models with non-zero coefficient: {missing}")
        self.denoisers, self.schedule, self.particles = denoisers, schedule, particles
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        self.coeffs = torch.tensor([c for _, c in self.active], dtype=torch.float64)
        self.ess_threshold, self.generator, self.log_density = ess_threshold, generator, log_density
        self.log_w: torch.Tensor | None = None
        self._last: tuple[torch.Tensor, torch.Tensor] | None = None  # (x_t, preds) of the last call
        self.resamples = 0

    def expand(self, x: torch.Tensor) -> torch.Tensor:
        """(B, ...) -> (B * P, ...): each sample's start repeated for its P particles."""
        return x.repeat_interleave(self.particles, 0)

    def denoiser(self, x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
        """The DB-MPA prediction; keeps the per-model predictions for the weight."""
        preds = torch.stack([self.denoisers[n](x, t, cond) for n, _ in self.active])
        self._last = (x, preds)
        return combine(preds, self.coeffs)

    def _increment(self, t: torch.Tensor, out: StepOutput, prev_t: torch.Tensor) -> torch.Tensor:
        x_t, preds = self._last
        a_t, a_prev = self.schedule.alpha_bar(t), self.schedule.alpha_bar(prev_t)
        if self.log_density is None:
            return fk_log_weight(preds, self.coeffs, a_t, a_prev)
        if not bool((out.std > 0).all()):  # a deterministic step has no proposal density: no weight
            return torch.zeros(x_t.shape[0], dtype=x_t.dtype, device=x_t.device)
        a = (a_t / a_prev).to(x_t.dtype)
        fwd = -((x_t - a.sqrt() * out.prev_sample) ** 2).flatten(1).sum(1) / (2 * (1 - a))
        dens = lambda x, s: sum(c * self.log_density[n](x, s) for n, c in self.active)  # noqa: E731
        return dens(out.prev_sample, prev_t) + fwd - dens(x_t, t) - out.log_prob  # constants cancel

    def __call__(self, i: int, t: torch.Tensor, out: StepOutput) -> torch.Tensor:
        """The sampler's callback: reweight, and resample the groups whose ESS is low."""
        if self._last is None or self._last[0].shape[0] != out.prev_sample.shape[0]:
            raise ValueError("BlendSMC's callback must follow a call of its own denoiser on the same batch")
        ts = self.timesteps
        prev_t = ts[i + 1] if i + 1 < len(ts) else torch.tensor(-1)
        inc = self._increment(t, out, prev_t).reshape(-1, self.particles)
        self.log_w = inc if self.log_w is None else self.log_w + inc
        low = effective_sample_size(self.log_w) < self.ess_threshold * self.particles
        if not bool(low.any()):
            return None
        idx = systematic_resample(self.log_w[low], self.generator)  # (G', P) within-group indices
        rows = (torch.nonzero(low).squeeze(1)[:, None] * self.particles + idx).flatten()
        x = out.prev_sample.clone()
        x.view(-1, self.particles, *x.shape[1:])[low] = out.prev_sample[rows].view(-1, self.particles, *x.shape[1:])
        self.log_w[low] = 0.0
        self.resamples += int(low.sum())
        return x

    def run(self, x: torch.Tensor, cond=None, *, eta: float = 1.0, generators=None) -> torch.Tensor:
        """Sample B outputs from x (B, ...): P particles each through :func:`core.sample`; (B, ...).

        ``generators``: one per particle row (B * P), or one for all.
        """
        self.log_w, self._last, self.resamples = None, None, 0
        out = sample(self.denoiser, self.expand(x), self.schedule, self.timesteps,
                     map_cond(cond, lambda c: c.repeat_interleave(self.particles, 0)), eta=eta,
                     generators=generators, callback=self)
        return self.select(out.sample)

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """One particle per group, drawn by its final weight; (B * P, ...) -> (B, ...)."""
        G = x.shape[0] // self.particles
        log_w = self.log_w if self.log_w is not None else torch.zeros(G, self.particles)
        pick = torch.multinomial(torch.softmax(log_w.double().cpu(), -1), 1, generator=self.generator).squeeze(1)
        return x[torch.arange(G) * self.particles + pick.to(x.device)]


class LangevinCorrector:
    """Annealed Langevin corrector steps with a denoiser's score, as a :func:`core.sample` callback.

    After each step t -> t_prev (t_prev >= 0), ``steps`` updates at the noise level of t_prev:
    x <- x + delta s(x) + sqrt(2 delta) z, s = -eps(x, t_prev) / sqrt(1 - alpha_bar), with
    delta = ``step_size`` * (1 - alpha_bar_{t_prev}). Each update costs one call of the denoiser
    (m model evaluations for DB-MPA). With a blended denoiser, s is the score of the geometric
    mixture pi_t, not of the noised target (see the module docstring).

    Args:
        denoiser: eps predictions ``(x, t, cond) -> eps`` (e.g. ``blend_denoisers(...)``).
        schedule: the VP schedule (prediction_type "epsilon").
        timesteps: the sampler's timesteps (to know t_prev of step i).
        steps: corrector steps per denoising step (0: none).
        step_size: delta / (1 - alpha_bar), > 0.
        generators: the noise of the updates (one per sample, or one for all).
        cond: the conditioning passed to the denoiser.
    """

    def __init__(self, denoiser: Callable, schedule: NoiseSchedule, timesteps, steps: int = 1,
                 step_size: float = 0.1, generators=None, cond=None):
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"steps must be an int >= 0, got {steps!r}")
        if not step_size > 0:
            raise ValueError(f"step_size must be > 0, got {step_size}")
        if schedule.prediction_type != "epsilon":
            raise ValueError("LangevinCorrector reads eps predictions: prediction_type must be 'epsilon'")
        self.denoiser, self.schedule, self.steps, self.step_size = denoiser, schedule, steps, step_size
        self.timesteps = torch.as_tensor(timesteps, dtype=torch.long)
        self.generators, self.cond, self.calls = generators, cond, 0

    def __call__(self, i: int, t: torch.Tensor, out: StepOutput) -> torch.Tensor | None:
        if i + 1 >= len(self.timesteps) or self.steps == 0:  # the last step ends at x_0: nothing to correct
            return None
        prev = self.timesteps[i + 1]
        x = out.prev_sample
        a = self.schedule.alpha_bar(prev).to(torch.float64)
        delta = float(self.step_size * (1 - a))
        sb = float((1 - a).sqrt())
        for _ in range(self.steps):
            eps = self.denoiser(x, prev.expand(x.shape[0]).to(x.device), self.cond)
            z = randn(x.shape, self.generators, dtype=x.dtype, device=x.device)
            x = x - (delta / sb) * eps + (2 * delta) ** 0.5 * z
            self.calls += 1
        return x
