"""core.corrector (SMC toward the geometric mixture, Langevin) and core.wschedule (w(t)) on the exact toy."""

import math

import pytest
import torch

from diffblend.core import Blend, blend_denoisers, randn, sample
from diffblend.core.corrector import (BlendSMC, LangevinCorrector, effective_sample_size, fk_log_weight, score_spread,
                                      systematic_resample)
from diffblend.core.toy import GaussianMixture, QuadraticReward
from diffblend.core.wschedule import ramp, scheduled_blend_denoisers
from diffblend.toybench import default_problem, null_energy_distance, sliced_energy_distance

F64 = torch.float64
NULL_FACTOR = 8.0  # energy distance / its null mean above 8 is a real difference (tests/test_toybench.py)
N = 1000


def test_fk_weight_formula_by_hand():
    g = torch.Generator().manual_seed(0)
    preds = torch.randn(3, 5, 2, 4, generator=g, dtype=F64)
    c = torch.tensor([-0.2, 0.5, 0.7], dtype=F64)
    bar = sum(c[k] * preds[k] for k in range(3))
    spread = sum(c[k] * ((preds[k] - bar) ** 2).sum((1, 2)) for k in range(3))
    assert torch.allclose(score_spread(preds, c), spread, atol=1e-12)
    a_t, a_prev = 0.3, 0.4
    ref = -(1 - a_t / a_prev) / (2 * (1 - a_t)) * spread
    assert torch.allclose(fk_log_weight(preds, c, a_t, a_prev), ref, atol=1e-12)
    same = preds[:1].expand(3, -1, -1, -1)
    assert torch.allclose(score_spread(same, c), torch.zeros(5, dtype=F64), atol=1e-12)  # models agree: no weight


def test_systematic_resampling_counts_and_ess():
    log_w = torch.log(torch.tensor([[0.1, 0.2, 0.3, 0.4], [1.0, 0.0, 0.0, 0.0]], dtype=F64).clamp(min=1e-300))
    idx = systematic_resample(log_w, torch.Generator().manual_seed(1))
    for row, w in zip(idx, log_w.exp()):
        counts = torch.bincount(row, minlength=4).double()
        assert ((counts - 4 * w / w.sum()).abs() < 1).all()  # floor or ceil of P w
    assert torch.allclose(effective_sample_size(torch.zeros(2, 8)), torch.full((2,), 8.0))
    assert float(effective_sample_size(log_w)[1]) == pytest.approx(1.0)


def _gaussian_linear_case():
    """A Gaussian base and linear rewards: the aligned models are Gaussians with one covariance, so
    the blended score is exactly the noised target's at every t (no Jensen gap)."""
    base = GaussianMixture.create([1.0], [[0.5, -1.0]], [[[0.6, 0.2], [0.2, 0.5]]])
    rewards = [QuadraticReward.linear([1.0, -0.5]), QuadraticReward.linear([-0.5, 1.5])]
    return base, rewards, [base.tilt(r, 0.5) for r in rewards]


def _toy_sched():
    return default_problem().schedule


def test_smc_leaves_the_exact_case_exact():
    """Equal weights in every group (the score spread is the same at every x), no resampling, and
    the output is the exact target (energy distance within the null threshold)."""
    base, rewards, models = _gaussian_linear_case()
    sched = _toy_sched()
    ts = sched.timesteps(40)
    den = {n: m.denoiser(sched) for n, m in zip("ab", models)}
    smc = BlendSMC(den, Blend.create([0.3, 0.7], list("ab")), sched, ts, 4, generator=torch.Generator().manual_seed(2))
    x = randn((N, 2), torch.Generator().manual_seed(3), dtype=F64)
    out = smc.run(x, generators=torch.Generator().manual_seed(4))
    assert out.shape == (N, 2) and smc.resamples == 0
    assert torch.allclose(smc.log_w, smc.log_w[:, :1].expand_as(smc.log_w), atol=1e-9)
    assert float(smc.log_w.abs().max()) > 1e-3  # the weight is not trivially zero: only constant
    target = base.target(rewards, [0.3, 0.7], 0.5)
    ref = target.sample(N, torch.Generator().manual_seed(5))
    assert sliced_energy_distance(out, ref) < NULL_FACTOR * null_energy_distance(ref, N, N)


def test_langevin_leaves_the_exact_case_exact():
    base, rewards, models = _gaussian_linear_case()
    sched = _toy_sched()
    ts = sched.timesteps(40)
    mpa = blend_denoisers({n: m.denoiser(sched) for n, m in zip("ab", models)}, Blend.create([0.3, 0.7], list("ab")))
    g = torch.Generator().manual_seed(3)
    lc = LangevinCorrector(mpa, sched, ts, steps=2, step_size=0.1, generators=g)
    out = sample(mpa, randn((N, 2), g, dtype=F64), sched, ts, generators=g, callback=lc).sample
    assert lc.calls == 2 * (len(ts) - 1)
    ref = base.target(rewards, [0.3, 0.7], 0.5).sample(N, torch.Generator().manual_seed(5))
    assert sliced_energy_distance(out, ref) < NULL_FACTOR * null_energy_distance(ref, N, N)


def _conflict(steps=50):
    p = default_problem()
    names = ["right", "corner"]
    den = {n: p.base.tilt(p.rewards[n], 1.0).denoiser(p.schedule) for n in names}
    target = p.base.target([p.rewards[n] for n in names], [0.5, 0.5], 1.0)
    ref = target.sample(N, torch.Generator().manual_seed(5))
    return p, den, Blend.create([0.5, 0.5], names), p.schedule.timesteps(steps), ref, null_energy_distance(ref, N, N)


def test_smc_removes_most_of_the_jensen_bias_on_the_conflicting_pair():
    """w = 1/2, alpha = 1: DB-MPA is far from the target (measured ratio ~40 here); SMC with 8 particles
    per sample and only model predictions is within the null threshold (measured ~2)."""
    p, den, blend, ts, ref, floor = _conflict()
    x = randn((N, 2), torch.Generator().manual_seed(3), dtype=F64)
    mpa = sample(blend_denoisers(den, blend), x, p.schedule, ts, generators=torch.Generator().manual_seed(4)).sample
    smc = BlendSMC(den, blend, p.schedule, ts, 8, generator=torch.Generator().manual_seed(2))
    out = smc.run(x, generators=torch.Generator().manual_seed(4))
    assert sliced_energy_distance(mpa, ref) > 3 * NULL_FACTOR * floor  # the bias is there to fix
    assert sliced_energy_distance(out, ref) < NULL_FACTOR * floor
    assert smc.resamples > 0


def test_weight_schedule_keeps_w_at_t0_and_validates():
    p, den, blend, ts, ref, floor = _conflict(20)
    fn = ramp([0.5, 0.5], 1, 0.5, p.schedule)
    assert fn(0) == pytest.approx([0.5, 0.5], abs=1e-3)  # alpha_bar_0 = 1 - 1e-4: w(0) ~ w
    assert fn(999)[1] > 0.74  # the shift grows with the noise level
    den_s = scheduled_blend_denoisers(den, ["right", "corner"], lambda t: [0.5, 0.5])
    x = randn((64, 2), torch.Generator().manual_seed(3), dtype=F64)
    a = sample(den_s, x, p.schedule, ts, generators=torch.Generator().manual_seed(1)).sample
    b = sample(blend_denoisers(den, blend), x, p.schedule, ts, generators=torch.Generator().manual_seed(1)).sample
    assert torch.equal(a, b)  # a constant schedule is the plain blend
    bad = scheduled_blend_denoisers(den, ["right", "corner"], lambda t: [0.9, 0.9])
    with pytest.raises(ValueError, match=r"weights_at\(999\): weights must sum to 1"):
        bad(x, torch.full((64,), 999), None)
    with pytest.raises(TypeError, match="weights_at must be a callable"):
        scheduled_blend_denoisers(den, ["right", "corner"], [0.5, 0.5])
    with pytest.raises(ValueError, match="delta must be in"):
        ramp([0.5, 0.5], 1, 2.0, p.schedule)


def test_validation_errors():
    p, den, blend, ts, _, _ = _conflict(5)
    with pytest.raises(ValueError, match="particles must be an int >= 1"):
        BlendSMC(den, blend, p.schedule, ts, 0)
    with pytest.raises(ValueError, match="blend.method must be 'mpa'"):
        BlendSMC(den, Blend.create([0.5, 0.5], ["right", "corner"], method="ls"), p.schedule, ts, 2)
    with pytest.raises(ValueError, match="missing models"):
        BlendSMC({"right": den["right"]}, blend, p.schedule, ts, 2)
    with pytest.raises(ValueError, match="ess_threshold"):
        BlendSMC(den, blend, p.schedule, ts, 2, ess_threshold=1.5)
    with pytest.raises(ValueError, match="steps must be an int >= 0"):
        LangevinCorrector(blend_denoisers(den, blend), p.schedule, ts, steps=-1)
    with pytest.raises(ValueError, match="step_size must be > 0"):
        LangevinCorrector(blend_denoisers(den, blend), p.schedule, ts, step_size=0.0)
