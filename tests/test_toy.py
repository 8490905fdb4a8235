"""The exact analytic toy (core/toy.py): scores, tilts, posterior, control, Jensen gap, and the
sampler + toy together. All exact identities are checked in float64 to round-off; statistical
checks use fixed seeds and tolerances in units of their own Monte-Carlo standard error."""

import math

import pytest
import torch

from diffblend.core import NoiseSchedule, randn, sample
from diffblend.core.toy import GaussianMixture, QuadraticReward, control, jensen_control
from diffblend.toybench import default_problem, null_energy_distance, sliced_energy_distance

F64 = torch.float64


# exact identities in float64: values are O(1-10) and pass through a few 2x2 inversions and a
# logsumexp, so round-off is ~1e-14; 1e-9 leaves room without hiding any formula error.
EXACT = 1e-9


def _mix() -> GaussianMixture:
    return GaussianMixture.create(
        weights=[0.5, 0.3, 0.2],
        means=[[-2.0, 0.0], [2.0, 0.5], [0.0, 2.5]],
        covs=[[[0.5, 0.2], [0.2, 0.4]], [[0.3, 0.0], [0.0, 0.6]], [[0.4, -0.1], [-0.1, 0.3]]],
    )


REWARDS = {
    "linear": QuadraticReward.linear([1.0, -0.5]),
    "quadratic": QuadraticReward.quadratic(0.7, [-1.0, 1.5]),
    "sum": QuadraticReward.weighted_sum(
        [QuadraticReward.linear([1.0, 0.0]), QuadraticReward.quadratic(1.0, [-2.0, 1.0])], [0.3, 0.7]),
}


def _points(n=64, seed=0):
    return 2.0 * torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


@pytest.mark.parametrize("alpha_bar", [0.9999, 0.9, 0.5, 0.05, 1e-4])
def test_eps_is_autograd_of_exact_log_density(alpha_bar):
    g, x = _mix(), _points()
    xr = x.clone().requires_grad_(True)
    (score,) = torch.autograd.grad(g.noised(alpha_bar).log_prob(xr).sum(), xr)
    assert torch.allclose(g.eps(x, alpha_bar), -math.sqrt(1 - alpha_bar) * score, atol=EXACT, rtol=0)


def test_denoiser_uses_the_schedule_per_sample():
    g, sched = _mix(), NoiseSchedule.linear(1000)
    x = _points(6)
    t = torch.tensor([0, 10, 10, 500, 999, 500])  # mixed timesteps in one batch
    eps = g.denoiser(sched)(x.float(), t, None)
    assert eps.dtype == torch.float32
    for i in range(6):
        ref = g.eps(x[i:i + 1], float(sched.alpha_bar(t[i])))
        assert torch.allclose(eps[i:i + 1].double(), ref, atol=1e-6)  # float32 output


def test_noised_marginal_matches_forward_process():
    """p_t in closed form vs x0 ~ p, x_t = sqrt(a) x0 + sqrt(1-a) eps: means and covariances."""
    g, a, n = _mix(), 0.3, 200_000
    gen = torch.Generator().manual_seed(1)
    xt = math.sqrt(a) * g.sample(n, gen) + math.sqrt(1 - a) * torch.randn(n, 2, generator=gen, dtype=F64)
    pt = g.noised(a)
    se = xt.std(0) / math.sqrt(n)
    # 5 standard errors: a false alarm has probability ~6e-7 per coordinate under the normal approximation
    assert ((xt.mean(0) - pt.mean()).abs() < 5 * se).all()
    # covariance entries: the sample covariance's SE is about sqrt((s_ii s_jj + s_ij^2) / n) <= 2 var / sqrt(n)
    cov_se = 2 * pt.cov().diagonal().max() / math.sqrt(n)
    assert ((torch.cov(xt.T) - pt.cov()).abs() < 5 * cov_se).all()


def test_exact_sampling_moments():
    g, n = _mix(), 200_000
    s = g.sample(n, torch.Generator().manual_seed(2))
    assert ((s.mean(0) - g.mean()).abs() < 5 * s.std(0) / math.sqrt(n)).all()  # 5 SE, as above
    assert ((torch.cov(s.T) - g.cov()).abs() < 5 * 2 * g.cov().diagonal().max() / math.sqrt(n)).all()
    # the generator decides everything
    assert torch.equal(g.sample(10, torch.Generator().manual_seed(3)), g.sample(10, torch.Generator().manual_seed(3)))


@pytest.mark.parametrize("name", list(REWARDS))
@pytest.mark.parametrize("alpha", [2.0, 0.5])
def test_tilt_matches_importance_reweighted_base(name, alpha):
    """p exp(r / alpha) in closed form vs self-normalised importance weights on exact base samples."""
    g, r, n = _mix(), REWARDS[name], 400_000
    x = g.sample(n, torch.Generator().manual_seed(4))
    w = torch.softmax(r(x) / alpha, 0)  # (n,) self-normalised weights
    tilted = g.tilt(r, alpha)
    est_mean = w @ x
    # delta-method SE of a self-normalised IS mean: sqrt(sum_i w_i^2 (x_i - mean)^2)
    se_mean = ((w[:, None] ** 2) * (x - est_mean) ** 2).sum(0).sqrt()
    assert ((est_mean - tilted.mean()).abs() < 5 * se_mean).all(), (est_mean, tilted.mean(), se_mean)
    est_second = torch.einsum("n,ni,nj->ij", w, x - est_mean, x - est_mean)
    dev = (x - est_mean) ** 2
    se_second = ((w[:, None] ** 2) * (dev - (w @ dev)) ** 2).sum(0).sqrt()  # diagonal entries
    assert ((est_second.diagonal() - tilted.cov().diagonal()).abs() < 5 * se_second).all()
    # expected reward under the tilt, closed form vs the same estimator
    rv = r(x)
    se_r = ((w**2) * (rv - w @ rv) ** 2).sum().sqrt()
    assert abs(float(w @ rv) - tilted.expect(r)) < 5 * se_r


def test_tilt_algebra():
    g = _mix()
    r1, r2 = REWARDS["linear"], REWARDS["quadratic"]
    # tilting twice = tilting once by the sum; alpha scales the reward
    a = g.tilt(r1, 1.0).tilt(r2, 1.0)
    b = g.tilt(r1 + r2, 1.0)
    c = g.tilt((r1 + r2).scale(2.0), 2.0)
    for m in (b, c):
        assert torch.allclose(a.weights, m.weights, atol=EXACT)
        assert torch.allclose(a.means, m.means, atol=EXACT)
        assert torch.allclose(a.covs, m.covs, atol=EXACT)
    # target(): lambda = 0 is the base, lambda scales the KL weight alpha -> alpha / lambda
    base = g.target([r1, r2], [0.5, 0.5], 1.0, kl_strength=0.0)  # a tilt by the zero reward
    assert torch.allclose(base.weights, g.weights, atol=EXACT) and torch.allclose(base.covs, g.covs, atol=EXACT)
    assert g.tilt(r1, math.inf) is g
    t = g.target([r1, r2], [0.25, 0.75], 1.0, kl_strength=2.0)
    ref = g.tilt(QuadraticReward.weighted_sum([r1, r2], [0.25, 0.75]), 0.5)
    assert torch.allclose(t.means, ref.means, atol=EXACT) and torch.allclose(t.weights, ref.weights, atol=EXACT)
    # the density of a tilt is p exp(r / alpha) / Z: differences of log-densities agree
    x = _points(16)
    lhs = g.tilt(r2, 0.5).log_prob(x) - g.log_prob(x) - r2(x) / 0.5
    assert torch.allclose(lhs, lhs[0].expand_as(lhs), atol=EXACT)  # log Z is one constant


@pytest.mark.parametrize("name", list(REWARDS))
@pytest.mark.parametrize("alpha_bar", [0.99, 0.5, 0.02])
def test_control_is_difference_of_scores(name, alpha_bar):
    """Prop. 1 through the posterior = grad log p_t^{tilted} - grad log p_t^{pre} (two independent routes)."""
    g, r, alpha, x = _mix(), REWARDS[name], 0.7, _points()
    u = control(g, r, alpha, x, alpha_bar)
    ref = g.tilt(r, alpha).noised(alpha_bar).score(x) - g.noised(alpha_bar).score(x)
    assert torch.allclose(u, ref, atol=1e-8, rtol=0)  # autograd through logsumexp: a little more round-off


def test_posterior_matches_bayes_rule():
    """p(x0 | x_t) ∝ p(x0) N(x_t; sqrt(a) x0, (1-a) I): compare log-densities up to one constant."""
    g, a = _mix(), 0.4
    xt = _points(1, seed=5)
    post = g.posterior(xt, a)
    pm = GaussianMixture(post.log_weights[0].exp(), post.means[0], post.covs)
    x0 = _points(32, seed=6)
    lik = -((xt - math.sqrt(a) * x0) ** 2).sum(1) / (2 * (1 - a))
    diff = pm.log_prob(x0) - (g.log_prob(x0) + lik)
    assert torch.allclose(diff, diff[0].expand_as(diff), atol=EXACT)


def test_jensen_gap_is_zero_for_linear_reward_on_a_gaussian():
    """One Gaussian, linear r: log E[e^{r/alpha}] - E[r/alpha] is a constant in x_t, so u = u_bar."""
    g = GaussianMixture.create([1.0], [[0.5, -1.0]], [[[0.6, 0.2], [0.2, 0.5]]])
    x = _points(32)
    for a in (0.9, 0.3):
        u = control(g, REWARDS["linear"], 0.1, x, a)
        assert torch.allclose(u, jensen_control(g, REWARDS["linear"], 0.1, x, a), atol=EXACT)
        assert u.abs().max() > 0.1  # and the control itself is not trivially zero


def _mean_gap(g, r, alpha, a, n=500):
    x = g.tilt(r, alpha).noised(a).sample(n, torch.Generator().manual_seed(7))
    return float((control(g, r, alpha, x, a) - jensen_control(g, r, alpha, x, a)).norm(dim=1).mean())


@pytest.mark.parametrize("name", ["quadratic", "sum"])
def test_jensen_gap_vanishes_as_t_to_zero_and_grows_as_alpha_shrinks(name):
    g, r, sched = _mix(), REWARDS[name], NoiseSchedule.linear(1000)
    ts = [400, 200, 100, 50, 10, 0]
    gaps = [_mean_gap(g, r, 1.0, float(sched.alpha_bar(t))) for t in ts]
    assert all(b < a for a, b in zip(gaps, gaps[1:])), gaps  # decreasing towards t = 0 on this grid
    assert gaps[-1] < 1e-2 * gaps[0], gaps  # and close to 0 at t = 0 (alpha_bar_0 = 1 - 1e-4)
    a = float(sched.alpha_bar(100))
    by_alpha = [_mean_gap(g, r, alpha, a) for alpha in (4.0, 1.0, 0.25)]
    assert by_alpha[0] < by_alpha[1] < by_alpha[2], by_alpha


def test_validation_errors():
    with pytest.raises(ValueError, match="weights"):
        GaussianMixture.create([0.5, 0.6], [[0.0], [1.0]], [1.0, 1.0])
    with pytest.raises(ValueError, match="covs"):
        GaussianMixture.create([1.0], [[0.0, 0.0]], [[[1.0, 2.0], [2.0, 1.0]]])
    with pytest.raises(ValueError, match="means"):
        GaussianMixture.create([1.0], [0.0, 0.0], [1.0])
    with pytest.raises(ValueError, match="alpha"):
        _mix().tilt(REWARDS["linear"], 0.0)
    with pytest.raises(ValueError, match="s must be"):
        QuadraticReward.quadratic(-1.0, [0.0, 0.0])
    convex = QuadraticReward(-torch.eye(2, dtype=F64), torch.zeros(2, dtype=F64))  # r = +|x|^2 / 2
    with pytest.raises(ValueError, match="not normalisable"):
        _mix().tilt(convex, 0.1)
    with pytest.raises(ValueError, match="kl_strength"):
        _mix().target([REWARDS["linear"]], [1.0], 1.0, kl_strength=-1.0)
    with pytest.raises(ValueError, match="alpha_bar"):
        _mix().posterior(_points(2), 1.0)


# Under the null, energy distance / its expected value (null_energy_distance) is a weighted sum of
# chi^2_1 variables with mean 1. Measured on the benchmark toy's distributions (2400 replicates,
# N = 1000 and 2000): 99% quantiles 2.7-4.3, largest 7.4. So a ratio above 8 is a real difference.
NULL_FACTOR = 8.0


def test_sampling_the_exact_base_reproduces_it():
    """core.sample + the toy's exact eps (DDIM eta = 1, 100 steps) vs exact samples of the mixture.

    Also the negative control: the same sampler on the wrong model is far above the threshold.
    """
    p = default_problem()
    g, sched, n = p.base, p.schedule, 2000
    gen = torch.Generator().manual_seed(8)
    x = randn((n, 2), gen, dtype=F64)
    out = sample(g.denoiser(sched), x, sched, sched.timesteps(100), eta=1.0, generators=gen).sample
    ref = g.sample(n, torch.Generator().manual_seed(9))
    floor = null_energy_distance(g.sample(n, torch.Generator().manual_seed(100)), n, n, 64)
    assert sliced_energy_distance(out, ref, 64) < NULL_FACTOR * floor
    se = out.std(0) / math.sqrt(n)
    assert ((out.mean(0) - g.mean()).abs() < 5 * se).all()
    wrong = g.tilt(p.rewards["up"], 4.0)  # a mild tilt: the mean moves by 0.5 in y (std 1.2)
    gen = torch.Generator().manual_seed(8)
    x = randn((n, 2), gen, dtype=F64)
    out_w = sample(wrong.denoiser(sched), x, sched, sched.timesteps(100), eta=1.0, generators=gen).sample
    assert sliced_energy_distance(out_w, ref, 64) > NULL_FACTOR * floor
