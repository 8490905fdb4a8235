"""An exact analytic diffusion: a Gaussian-mixture base with closed-form reward tilts. Torch only.

This is the theory's test bench (Cheng et al., ICLR 2026, arXiv 2505.18547). Everything below is
closed-form, so the samplers and the blend maths can be checked against exact answers:

    p_pre(x0)            = sum_k pi_k N(x0; mu_k, Sigma_k)                       the base model
    p_t(x_t)             = sum_k pi_k N(x_t; sqrt(a) mu_k, a Sigma_k + (1 - a) I)  VP marginal, a = alpha_bar_t
    eps(x_t, t)          = -sqrt(1 - a) * grad log p_t(x_t)                      the exact noise prediction
    p_s(x_s)             = sum_k pi_k N(x_s; (1 - s) mu_k, (1 - s)^2 Sigma_k + s^2 I)  flow-matching marginal
    v(x_s, s)            = E[eps - x0 | x_s]                                     the exact flow velocity
    p_pre(x0) e^{r/alpha}                                                        again a mixture when
    r(x) = -1/2 x^T Q x + b^T x + c0                                             r is at most quadratic

A linear reward r = a.x is (Q = 0, b = a); the quadratic r = -s/2 |x - c|^2 is (Q = s I, b = s c,
c0 = -s/2 |c|^2); a weighted sum of such rewards is again one (Q, b, c0), so the aligned model for
(r_i, alpha), the MPA target for r(w) = sum_i w_i r_i and the KLA target for alpha / lambda are all
mixtures. The posterior p_pre(x0 | x_t) is a mixture with per-x_t means, which gives the exact
control u of Prop. 1 and its Jensen approximation u_bar of Lemma 1:

    u(x_t)     = grad_{x_t} log E_{p_pre(x0 | x_t)}[exp(r(x0) / alpha)]
               = grad log p_t^{(r, alpha)}(x_t) - grad log p_t^{pre}(x_t)
    u_bar(x_t) = grad_{x_t} E_{p_pre(x0 | x_t)}[r(x0) / alpha]

All maths is float64: the toy is a reference, round-off must not be what a test measures.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .sampling import NoiseSchedule

__all__ = ["QuadraticReward", "GaussianMixture", "Posterior", "control", "jensen_control"]

_F64 = torch.float64


def _mat(x, name: str, shape: tuple[int, ...]) -> torch.Tensor:
    x = torch.as_tensor(x, dtype=_F64)
    if x.shape != shape:
        raise ValueError(f"{name} must have shape {shape}, got {tuple(x.shape)}")
    if not torch.isfinite(x).all():
        raise ValueError(f"{name} must be finite")
    return x


@dataclass(frozen=True)
class QuadraticReward:
    """r(x) = -1/2 x^T Q x + b^T x + c0 on R^d, the family whose tilts stay Gaussian.

    Attributes:
        Q: (d, d) symmetric curvature (positive semi-definite for a concave reward).
        b: (d,) linear term.
        c0: constant (it changes no tilted distribution, only expected rewards).
    """

    Q: torch.Tensor
    b: torch.Tensor
    c0: float = 0.0

    @classmethod
    def linear(cls, a: Sequence[float] | torch.Tensor) -> QuadraticReward:
        """r(x) = a . x."""
        b = torch.as_tensor(a, dtype=_F64).flatten()
        return cls(Q=torch.zeros(len(b), len(b), dtype=_F64), b=_mat(b, "a", (len(b),)))

    @classmethod
    def quadratic(cls, s: float, c: Sequence[float] | torch.Tensor) -> QuadraticReward:
        """r(x) = -s/2 |x - c|^2 (s > 0: a bump at c)."""
        c = torch.as_tensor(c, dtype=_F64).flatten()
        c = _mat(c, "c", (len(c),))
        if not math.isfinite(s) or s <= 0:
            raise ValueError(f"s must be a finite number > 0, got {s!r}")
        return cls(Q=s * torch.eye(len(c), dtype=_F64), b=s * c, c0=-0.5 * s * float(c @ c))

    @property
    def dim(self) -> int:
        return int(self.b.shape[0])

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """r at points x of shape (..., d); returns (...,)."""
        x = x.to(_F64)
        return -0.5 * torch.einsum("...i,ij,...j->...", x, self.Q, x) + x @ self.b + self.c0

    def scale(self, k: float) -> QuadraticReward:
        return QuadraticReward(self.Q * k, self.b * k, self.c0 * k)

    def __add__(self, other: QuadraticReward) -> QuadraticReward:
        if other.dim != self.dim:
            raise ValueError(f"cannot add rewards on R^{self.dim} and R^{other.dim}")
        return QuadraticReward(self.Q + other.Q, self.b + other.b, self.c0 + other.c0)

    @staticmethod
    def weighted_sum(rewards: Sequence[QuadraticReward], w: Sequence[float]) -> QuadraticReward:
        """r(w) = sum_i w_i r_i (the MPA reward; w need not be normalised here)."""
        if len(rewards) != len(w) or not rewards:
            raise ValueError(f"w must have one entry per reward ({len(rewards)}), got {len(w)}")
        total = rewards[0].scale(float(w[0]))
        for r, wi in zip(rewards[1:], w[1:]):
            total = total + r.scale(float(wi))
        return total

    def expect_gaussian(self, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
        """E[r(x)] for x ~ N(mean, cov): -1/2 (tr(Q cov) + m^T Q m) + b^T m + c0.

        mean (..., K, d), cov (K, d, d) -> (..., K).
        """
        tr = torch.einsum("ij,kji->k", self.Q, cov)
        return -0.5 * (tr + torch.einsum("...i,ij,...j->...", mean, self.Q, mean)) + mean @ self.b + self.c0


def _gauss_tilt(mean: torch.Tensor, cov: torch.Tensor, r: QuadraticReward):
    """Tilt N(mean, cov) by exp(r(x)): log normaliser, new mean, new covariance.

    mean (..., K, d), cov (K, d, d) -> log Z (..., K), mean' (..., K, d), cov' (K, d, d), with
    Pi = cov^{-1}, Pi' = Pi + Q, h = Pi m + b, m' = Pi'^{-1} h and
    log Z = c0 - 1/2 m^T Pi m + 1/2 h^T Pi'^{-1} h + 1/2 (log det Pi - log det Pi').
    """
    prec = torch.linalg.inv(cov)
    prec_new = prec + r.Q
    chol, info = torch.linalg.cholesky_ex(0.5 * (prec_new + prec_new.transpose(-1, -2)))
    if (info != 0).any():
        raise ValueError("the reward tilt is not normalisable (Sigma^{-1} + Q / alpha is not positive "
                         "definite): a reward with negative curvature needs a larger alpha")
    cov_new = torch.cholesky_inverse(chol)
    h = torch.einsum("kij,...kj->...ki", prec, mean) + r.b
    mean_new = torch.einsum("kij,...kj->...ki", cov_new, h)
    logdet_ratio = torch.logdet(prec) - 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    log_z = (r.c0 - 0.5 * torch.einsum("...ki,kij,...kj->...k", mean, prec, mean)
             + 0.5 * (h * mean_new).sum(-1) + 0.5 * logdet_ratio)
    return log_z, mean_new, cov_new


def _log_normal(x: torch.Tensor, mean: torch.Tensor, cov: torch.Tensor) -> torch.Tensor:
    """log N(x; mean_k, cov_k) for x (B, d), mean (K, d), cov (K, d, d) -> (B, K)."""
    chol = torch.linalg.cholesky(cov)
    diff = (x[:, None, :] - mean[None]).permute(1, 2, 0)  # (K, d, B)
    z = torch.linalg.solve_triangular(chol, diff, upper=False)
    maha = (z**2).sum(1).T  # (B, K)
    logdet = 2 * chol.diagonal(dim1=-2, dim2=-1).log().sum(-1)
    return -0.5 * (maha + logdet + x.shape[-1] * math.log(2 * math.pi))


def _score(x: torch.Tensor, means: torch.Tensor, log_norm: torch.Tensor, prec: torch.Tensor) -> torch.Tensor:
    """Mixture score at x (B, d): responsibilities from log_norm_k - 1/2 |x - mu_k|^2_{P_k}, then
    sum_k gamma_k P_k (mu_k - x). The parameters are shared, (K, d), (K,), (K, d, d), or per row
    with a leading batch dimension of B or 1. Batched matmuls: this is the sampler's hot loop."""
    gamma, _, pd = _responsibilities(x, means, log_norm, prec)
    return (gamma.unsqueeze(1) @ pd).squeeze(1)


def _responsibilities(x, means, log_norm, prec) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """gamma_k(x) (B, K), mu_k - x (B, K, d) and P_k (mu_k - x) (B, K, d) for :func:`_score`'s arguments."""
    diff = means - x[:, None]  # (B, K, d)
    pd = (prec @ diff[..., None]).squeeze(-1)  # (B, K, d), P_k (mu_k - x)
    gamma = torch.softmax(log_norm - 0.5 * (diff * pd).sum(-1), -1)  # (B, K)
    return gamma, diff, pd


@dataclass(frozen=True)
class Posterior:
    """p_pre(x0 | x_t) = sum_k gamma_k(x_t) N(x0; means[:, k], covs[k]) for a batch of x_t.

    log_weights: (B, K) log gamma_k(x_t); means: (B, K, d); covs: (K, d, d) (independent of x_t).
    """

    log_weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    def log_expect_exp(self, r: QuadraticReward) -> torch.Tensor:
        """log E[exp(r(x0))], (B,)."""
        log_z, _, _ = _gauss_tilt(self.means, self.covs, r)
        return torch.logsumexp(self.log_weights + log_z, -1)

    def expect(self, r: QuadraticReward) -> torch.Tensor:
        """E[r(x0)], (B,)."""
        return (self.log_weights.exp() * r.expect_gaussian(self.means, self.covs)).sum(-1)


@dataclass(frozen=True)
class GaussianMixture:
    """sum_k pi_k N(mu_k, Sigma_k) in R^d, float64. Build with :meth:`create` (validates).

    Attributes:
        weights: (K,) pi, positive, summing to 1.
        means: (K, d) mu.
        covs: (K, d, d) Sigma, symmetric positive definite.
    """

    weights: torch.Tensor
    means: torch.Tensor
    covs: torch.Tensor

    @classmethod
    def create(cls, weights, means, covs) -> GaussianMixture:
        """weights (K,); means (K, d); covs (K, d, d), or (K, d) diagonals, or (K,) isotropic variances."""
        means = torch.as_tensor(means, dtype=_F64)
        if means.dim() != 2:
            raise ValueError(f"means must have shape (K, d), got {tuple(means.shape)}")
        K, d = means.shape
        means = _mat(means, "means", (K, d))
        weights = _mat(weights, "weights", (K,))
        if (weights <= 0).any() or abs(float(weights.sum()) - 1) > 1e-9:
            raise ValueError(f"weights must be > 0 and sum to 1, got {weights.tolist()}")
        covs = torch.as_tensor(covs, dtype=_F64)
        if covs.shape == (K,):
            covs = covs[:, None, None] * torch.eye(d, dtype=_F64)
        elif covs.shape == (K, d):
            covs = torch.diag_embed(covs)
        covs = _mat(covs, "covs", (K, d, d))
        if not torch.allclose(covs, covs.transpose(-1, -2)) or (torch.linalg.eigvalsh(covs) <= 0).any():
            raise ValueError("covs must be symmetric positive definite")
        return cls(weights, means, covs)

    @property
    def dim(self) -> int:
        return int(self.means.shape[1])

    # -- densities ---------------------------------------------------------------------------------
    def _log_joint(self, x: torch.Tensor) -> torch.Tensor:
        """log pi_k + log N(x; mu_k, Sigma_k), (B, K)."""
        return self.weights.log() + _log_normal(x.to(_F64), self.means, self.covs)

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x), x (B, d) -> (B,)."""
        return torch.logsumexp(self._log_joint(x), -1)

    def score(self, x: torch.Tensor) -> torch.Tensor:
        """grad_x log p(x) = sum_k gamma_k(x) Sigma_k^{-1} (mu_k - x), (B, d)."""
        return _score(x.to(_F64), self.means, *self._score_parts())

    def _score_parts(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(log pi_k - 1/2 log det Sigma_k, Sigma_k^{-1}): what :func:`_score` needs, (K,), (K, d, d)."""
        return self.weights.log() - 0.5 * torch.logdet(self.covs), torch.linalg.inv(self.covs)

    def _marginal_parts(self, alpha_bars: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """sqrt(1 - a), means, log_norm and precisions of p_t for a batch of alpha_bars (T,).

        One batched inversion for a whole schedule, so the sampler's loop does no linear algebra.
        """
        a = alpha_bars.to(_F64)[:, None, None, None]  # (T, 1, 1, 1)
        covs = a * self.covs + (1 - a) * torch.eye(self.dim, dtype=_F64)  # (T, K, d, d)
        log_norm = self.weights.log() - 0.5 * torch.logdet(covs)  # (T, K)
        return (1 - alpha_bars.to(_F64)).sqrt(), a[..., 0].sqrt() * self.means, log_norm, torch.linalg.inv(covs)

    def sample(self, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """n exact samples (n, d), from ``generator`` (component draw, then Gaussian noise)."""
        k = torch.multinomial(self.weights, n, replacement=True, generator=generator)
        z = torch.randn(n, self.dim, generator=generator, dtype=_F64)
        return self.means[k] + torch.einsum("bij,bj->bi", torch.linalg.cholesky(self.covs)[k], z)

    def mean(self) -> torch.Tensor:
        return self.weights @ self.means

    def cov(self) -> torch.Tensor:
        mu = self.mean()
        second = torch.einsum("k,kij->ij", self.weights, self.covs + torch.einsum("ki,kj->kij", self.means, self.means))
        return second - torch.outer(mu, mu)

    def expect(self, r: QuadraticReward) -> float:
        """E_p[r(x)] (closed form)."""
        return float(self.weights @ r.expect_gaussian(self.means, self.covs))

    # -- the forward process -----------------------------------------------------------------------
    def noised(self, alpha_bar: float) -> GaussianMixture:
        """The VP marginal p_t: x_t = sqrt(a) x0 + sqrt(1 - a) eps, a = alpha_bar in (0, 1]."""
        a = float(alpha_bar)
        if not 0 < a <= 1:
            raise ValueError(f"alpha_bar must be in (0, 1], got {alpha_bar}")
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(self.weights, math.sqrt(a) * self.means, a * self.covs + (1 - a) * eye)

    def eps(self, x_t: torch.Tensor, alpha_bar: float) -> torch.Tensor:
        """The exact noise prediction eps(x_t) = -sqrt(1 - a) grad log p_t(x_t), (B, d)."""
        return -math.sqrt(1 - float(alpha_bar)) * self.noised(alpha_bar).score(x_t)

    def denoiser(self, schedule: NoiseSchedule):
        """The exact eps as a denoiser ``(x_t, t, cond) -> eps`` for ``core.sample`` / ``blend_denoisers``.

        t is a (B,) tensor of integer timesteps of ``schedule``; cond is ignored; the output has
        x_t's dtype.
        """

        parts: list[tuple] = []  # filled on the first call: every timestep's marginal at once

        def eps_fn(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
            if not parts:
                parts.append(self._marginal_parts(schedule.alphas_cumprod.to(_F64)))
            sb, means, log_norm, prec = parts[0]  # (T,), (T, K, d), (T, K), (T, K, d, d)
            t = torch.as_tensor(t, device="cpu").reshape(-1).expand(x.shape[0]).long()
            if bool((t == t[0]).all()):  # the usual case: one timestep for the whole batch
                t = t[:1]
            score = _score(x.cpu().to(_F64), means[t], log_norm[t], prec[t])  # differentiable in x
            return (-sb[t, None] * score).to(device=x.device, dtype=x.dtype)

        return eps_fn

    # -- the flow-matching (rectified flow) forward process ----------------------------------------
    def flow_noised(self, sigma: float) -> GaussianMixture:
        """The marginal of x_s = (1 - s) x0 + s eps, s = sigma in [0, 1] (diffusers' flow matching)."""
        s = float(sigma)
        if not 0 <= s <= 1:
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        eye = torch.eye(self.dim, dtype=_F64)
        return GaussianMixture(self.weights, (1 - s) * self.means, (1 - s) ** 2 * self.covs + s**2 * eye)

    def _flow_parts(self, sigmas: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """Marginal means, log_norm, precisions and the velocity gain for sigmas (S,): (S, K, d), (S, K),
        (S, K, d, d), (S, K, d, d). With S_k = (1 - s)^2 Sigma_k + s^2 I the component's covariance,
        E[eps | x, k] = s S_k^-1 (x - m_k) and E[x0 | x, k] = mu_k + (1 - s) Sigma_k S_k^-1 (x - m_k),
        so E[eps - x0 | x, k] = G_k (x - m_k) - mu_k with G_k = (s I - (1 - s) Sigma_k) S_k^-1."""
        s = sigmas.to(_F64)[:, None, None, None]  # (S, 1, 1, 1)
        eye = torch.eye(self.dim, dtype=_F64)
        prec = torch.linalg.inv((1 - s) ** 2 * self.covs + s**2 * eye)  # (S, K, d, d)
        log_norm = self.weights.log() + 0.5 * torch.logdet(prec)
        return (1 - s[..., 0]) * self.means, log_norm, prec, (s * eye - (1 - s) * self.covs) @ prec

    def flow_velocity(self, x: torch.Tensor, sigma: float | torch.Tensor) -> torch.Tensor:
        """The exact velocity v(x, s) = E[eps - x0 | x_s = x] = sum_k gamma_k(x) (G_k (x - m_k) - mu_k);
        x (B, d), sigma a number or (B,) in [0, 1]; (B, d) float64. Defined at s = 1 (x - mean) and s = 0 (-x)."""
        x = x.to(_F64)
        s = torch.as_tensor(sigma, dtype=_F64).reshape(-1)
        if not bool(((s >= 0) & (s <= 1)).all()):
            raise ValueError(f"sigma must be in [0, 1], got {sigma}")
        means, log_norm, prec, gain = self._flow_parts(s)
        gamma, diff, _ = _responsibilities(x, means, log_norm, prec)
        v_k = -(gain @ diff[..., None]).squeeze(-1) - self.means  # (B, K, d); diff = m_k - x
        return (gamma.unsqueeze(1) @ v_k).squeeze(1)

    def flow_denoiser(self, time_scale: float = 1000.0):
        """The exact velocity as a denoiser ``(x, t, cond) -> v`` for ``core.flow.sample_flow`` /
        ``blend_denoisers``: sigma = t / time_scale (diffusers' timestep convention), cond ignored,
        output in x's dtype and device."""

        def v_fn(x: torch.Tensor, t: torch.Tensor, cond=None) -> torch.Tensor:
            s = torch.as_tensor(t, device="cpu", dtype=_F64).reshape(-1).expand(x.shape[0]) / time_scale
            if bool((s == s[0]).all()):  # the usual case: one sigma for the whole batch
                s = s[:1]
            return self.flow_velocity(x.cpu(), s).to(device=x.device, dtype=x.dtype)

        return v_fn

    def posterior(self, x_t: torch.Tensor, alpha_bar: float) -> Posterior:
        """p(x0 | x_t): component k has precision Sigma_k^{-1} + a/(1-a) I and mean
        C_k (Sigma_k^{-1} mu_k + sqrt(a)/(1-a) x_t); its weight is gamma_k(x_t) under p_t."""
        a = float(alpha_bar)
        if not 0 < a < 1:
            raise ValueError(f"alpha_bar must be in (0, 1) for a posterior, got {alpha_bar}")
        x_t = x_t.to(_F64)
        log_w = torch.log_softmax(self.noised(a)._log_joint(x_t), -1)
        prec = torch.linalg.inv(self.covs)
        covs = torch.linalg.inv(prec + a / (1 - a) * torch.eye(self.dim, dtype=_F64))
        h = torch.einsum("kij,kj->ki", prec, self.means)[None] + (math.sqrt(a) / (1 - a)) * x_t[:, None]
        return Posterior(log_w, torch.einsum("kij,bkj->bki", covs, h), covs)

    # -- reward tilts --------------------------------------------------------------------------------
    def tilt(self, reward: QuadraticReward, alpha: float = 1.0) -> GaussianMixture:
        """p(x) exp(r(x) / alpha) / Z: the optimum of max E[r] - alpha KL(p || self).

        alpha = inf returns the mixture unchanged (no alignment, e.g. DB-KLA with lambda = 0).
        """
        alpha = float(alpha)
        if math.isnan(alpha) or alpha <= 0:
            raise ValueError(f"alpha must be > 0 (inf allowed), got {alpha}")
        if reward.dim != self.dim:
            raise ValueError(f"reward is on R^{reward.dim}, the mixture on R^{self.dim}")
        if math.isinf(alpha):
            return self
        log_z, means, covs = _gauss_tilt(self.means, self.covs, reward.scale(1 / alpha))
        return GaussianMixture(torch.softmax(self.weights.log() + log_z, 0), means, covs)

    def target(self, rewards: Sequence[QuadraticReward], w: Sequence[float], alpha: float,
               kl_strength: float = 1.0) -> GaussianMixture:
        """The exact target of a blend: p_pre exp(lambda r(w) / alpha), r(w) = sum_i w_i r_i.

        That is the model aligned to r(w) at KL weight alpha / lambda: DB-MPA is lambda = 1,
        DB-KLA a one-hot w, and lambda = 0 gives the base.
        """
        lam = float(kl_strength)
        if not math.isfinite(lam) or lam < 0:
            raise ValueError(f"kl_strength (lambda) must be finite and >= 0, got {kl_strength}")
        return self.tilt(QuadraticReward.weighted_sum(rewards, w).scale(lam), alpha)


def _grad(fn, x: torch.Tensor) -> torch.Tensor:
    """grad of fn (B,) -> (B,) row by row (rows are independent), by autograd in float64."""
    with torch.enable_grad():
        x = x.detach().to(_F64).requires_grad_(True)
        (g,) = torch.autograd.grad(fn(x).sum(), x)
    return g


def control(base: GaussianMixture, reward: QuadraticReward, alpha: float, x_t: torch.Tensor,
            alpha_bar: float) -> torch.Tensor:
    """The exact control u^{(r, alpha)}(x_t) of Prop. 1, grad log E_{p(x0|x_t)}[e^{r(x0)/alpha}]; (B, d)."""
    r = reward.scale(1 / float(alpha))
    return _grad(lambda x: base.posterior(x, alpha_bar).log_expect_exp(r), x_t)


def jensen_control(base: GaussianMixture, reward: QuadraticReward, alpha: float, x_t: torch.Tensor,
                   alpha_bar: float) -> torch.Tensor:
    """The Jensen approximation u_bar(x_t) = grad E_{p(x0|x_t)}[r(x0) / alpha] of Lemma 1; (B, d).

    u_bar is linear in r, which is what makes sum_i w_i eps_i approximate the eps of r(w).
    """
    r = reward.scale(1 / float(alpha))
    return _grad(lambda x: base.posterior(x, alpha_bar).expect(r), x_t)
