"""RGG and CoDe on the exact analytic toy (closed-form eps, so only the baselines are tested)."""

import pytest
import torch

from diffblend.baselines.code import CoDeConfig, code_sample
from diffblend.baselines.rgg import RGGConfig, rgg_sample, tempering_scale
from diffblend.core.sampling import NoiseSchedule, randn, sample
from diffblend.core.toy import GaussianMixture, QuadraticReward

SCHED = NoiseSchedule.linear(1000)
TS = SCHED.timesteps(20)
BASE = GaussianMixture.create([0.5, 0.5], [[-1.5, 0.0], [1.5, 0.0]], [0.3, 0.3])
R = QuadraticReward.linear([1.0, 0.5])  # r(x) = x1 + 0.5 x2


def gens(n, offset=0):
    return [torch.Generator().manual_seed(offset + i) for i in range(n)]


def score(images):
    return R(images.to(torch.float64)).to(images.dtype)


def run_base(n, seed=0):
    x = randn((n, 2), gens(n, seed), dtype=torch.float64)
    return sample(BASE.denoiser(SCHED), x, SCHED, TS, eta=1.0, generators=gens(n, 10_000 + seed)).sample


def test_tempering_schedule():
    assert tempering_scale(0, 0.024) == 0.0
    assert tempering_scale(10, 0.024) == pytest.approx(1.024**10 - 1)
    assert tempering_scale(200, 0.024) == 1.0
    assert tempering_scale(0, None) == 1.0


@pytest.mark.parametrize("sign", [1.0, -1.0])
def test_rgg_moves_expected_reward_in_the_right_direction(sign):
    n = 800
    x = randn((n, 2), gens(n), dtype=torch.float64)
    fn = (lambda im: sign * score(im))
    cfg = RGGConfig(kl_coeff=1.0, grad_norm=None, tempering_gamma=None)
    out = rgg_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=fn, config=cfg, generators=gens(n, 10_000))
    base = run_base(n)
    diff = R(out.sample) - R(base)  # paired: same initial and step noise
    se = diff.std() / n**0.5
    # Require a shift in the right direction by more than 5 paired standard errors (Monte-Carlo
    # noise). No upper bound: with the prediction detached, grad_{x_t} r(x0_hat) = a / sqrt(abar_t)
    # is far larger than the exact control at high noise, so untempered RGG overshoots the exact
    # tilted target (measured: shift 5.1 vs exact 1.73 here); tempering exists to damp that.
    assert sign * diff.mean() > 5 * se
    assert out.nfe == len(TS) and out.reward_grads == len(TS) - 1  # last step has sigma = 0


def test_rgg_gradient_of_a_linear_reward_is_a_over_sqrt_alpha_bar():
    from diffblend.baselines.rgg import _reward_grad

    x = torch.randn(5, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    t = torch.full((5,), 500)
    g = _reward_grad(score, lambda z: z, SCHED, torch.zeros_like(x), x, t, None)
    expected = torch.tensor([1.0, 0.5], dtype=torch.float64) / SCHED.alpha_bar(torch.tensor(500)).sqrt()
    torch.testing.assert_close(g, expected.expand(5, 2))
    g = _reward_grad(score, lambda z: z, SCHED, torch.zeros_like(x), x, t, "rms")
    torch.testing.assert_close(g.pow(2).mean(1), torch.ones(5, dtype=torch.float64))


def test_rgg_with_authors_defaults_also_moves_reward_up():
    n = 400
    x = randn((n, 2), gens(n), dtype=torch.float64)
    out = rgg_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=score, config=RGGConfig(),
                     generators=gens(n, 10_000))
    diff = R(out.sample) - R(run_base(n))
    assert diff.mean() > 5 * diff.std() / n**0.5


def test_rgg_with_eta_zero_is_plain_ddim():
    n = 16
    x = randn((n, 2), gens(n), dtype=torch.float64)
    out = rgg_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=score, config=RGGConfig(eta=0.0))
    ref = sample(BASE.denoiser(SCHED), x, SCHED, TS, eta=0.0).sample
    assert torch.equal(out.sample, ref) and out.reward_grads == 0


def test_code_with_one_candidate_equals_plain_sampling():
    n = 12
    x = randn((n, 2), gens(n), dtype=torch.float64)
    out = code_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=score,
                      config=CoDeConfig(num_candidates=1, block_size=5), generators=gens(n, 10_000))
    assert torch.equal(out.sample, run_base(n))
    assert out.nfe == len(TS) and out.reward_evals == 0


def test_code_search_raises_reward_and_counts_cost():
    n, N, B = 300, 4, 5
    x = randn((n, 2), gens(n), dtype=torch.float64)
    out = code_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=score,
                      config=CoDeConfig(num_candidates=N, block_size=B), generators=gens(n, 10_000))
    diff = R(out.sample) - R(run_base(n))
    assert diff.mean() > 5 * diff.std() / n**0.5  # best-of-4 per block beats candidate 0's path
    # 4 blocks of 5 steps: first step shared (1 eval, block 1 only; later blocks reuse the scored
    # prediction), 4 steps x N, scoring N at the end of blocks 1-3, none after the last.
    assert out.nfe == 1 + 4 * 4 * N + 3 * N
    assert out.reward_evals == 4 * N
    assert out.choices.shape == (4, n)


def test_bad_configs_are_refused():
    with pytest.raises(ValueError, match="kl_coeff"):
        RGGConfig(kl_coeff=0)
    with pytest.raises(ValueError, match="grad_norm"):
        RGGConfig(grad_norm="l2")
    with pytest.raises(ValueError, match="num_candidates"):
        CoDeConfig(num_candidates=0)
    with pytest.raises(ValueError, match="block_size"):
        CoDeConfig(block_size=1.5)


@pytest.mark.parametrize("prediction_type", ["v_prediction", "sample"])
def test_rgg_gradient_does_not_depend_on_the_parameterisation(prediction_type):
    """The detached quantity is eps (the score), whatever the model predicts: an x0- or v-model
    making the same prediction as an eps-model gets the same guidance. (Holding an x0 prediction
    fixed gave a zero gradient, i.e. no guidance; holding v fixed scaled it by alpha_bar_t.)"""
    from diffblend.baselines.rgg import _reward_grad

    g = torch.Generator().manual_seed(0)
    x, eps = (torch.randn(5, 2, generator=g, dtype=torch.float64) for _ in range(2))
    t = torch.full((5,), 500)
    sched = NoiseSchedule(SCHED.alphas_cumprod, prediction_type=prediction_type)
    a = SCHED.alpha_bar(t)[:, None]
    x0 = (x - (1 - a).sqrt() * eps) / a.sqrt()
    pred = x0 if prediction_type == "sample" else a.sqrt() * eps - (1 - a).sqrt() * x0  # the same eps
    for norm in (None, "rms"):
        ref = _reward_grad(score, lambda z: z, SCHED, eps, x, t, norm)
        torch.testing.assert_close(_reward_grad(score, lambda z: z, sched, pred, x, t, norm), ref)


def test_code_refuses_a_score_fn_of_the_wrong_shape():
    x = randn((3, 2), gens(3), dtype=torch.float64)
    for bad in (lambda im: score(im).sum(), lambda im: score(im)[:, None]):
        with pytest.raises(ValueError, match=r"score_fn must return shape \(12,\)"):
            code_sample(BASE.denoiser(SCHED), x, SCHED, TS, score_fn=bad,
                        config=CoDeConfig(num_candidates=4, block_size=5), generators=gens(3, 10_000))
