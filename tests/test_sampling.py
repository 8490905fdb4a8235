"""Samplers against diffusers' own schedulers, log-probs against torch.distributions.Normal."""

import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler

from diffblend.core import (
    NoiseSchedule,
    cfg_denoiser,
    ddim_step,
    ddpm_step,
    gaussian_log_prob,
    randn,
    sample,
)

# float32 everywhere, as diffusers computes; both sides do the same arithmetic in the same order
# up to regrouping, so differences are a few ulps of values of order 1-10: atol 1e-5.
ATOL = 1e-5


def _sd_kwargs(prediction_type="epsilon", set_alpha_to_one=False):
    return dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012, clip_sample=False,
                prediction_type=prediction_type, set_alpha_to_one=set_alpha_to_one, steps_offset=1)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("set_alpha_to_one", [False, True])
def test_ddim_step_matches_diffusers(prediction_type, eta, set_alpha_to_one):
    sched = DDIMScheduler(**_sd_kwargs(prediction_type, set_alpha_to_one))
    sched.set_timesteps(10)
    ns = NoiseSchedule.from_scheduler(sched)
    assert torch.equal(ns.timesteps(10, steps_offset=1), sched.timesteps)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    for i, t in enumerate(sched.timesteps):
        pred, noise = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
        prev_t = sched.timesteps[i + 1] if i + 1 < len(sched.timesteps) else -1
        ref = sched.step(pred, t, x, eta=eta, variance_noise=noise)
        out = ddim_step(pred, t, x, ns, prev_t, eta, noise=noise)
        assert torch.allclose(out.prev_sample, ref.prev_sample, atol=ATOL)
        assert torch.allclose(out.x0_hat, ref.pred_original_sample, atol=ATOL * 10)
        x = ref.prev_sample


@pytest.mark.parametrize("num_steps", [1000, 20])
def test_ddpm_step_matches_diffusers(num_steps):
    sched = DDPMScheduler(beta_schedule="linear", clip_sample=False, variance_type="fixed_small")
    sched.set_timesteps(num_steps)
    ns = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(3, 2, 4, 4, generator=g)
    ts = sched.timesteps
    # check a spread of steps incl. the last (t = 0, no noise)
    for i in sorted({0, 1, len(ts) // 2, len(ts) - 2, len(ts) - 1}):
        t = ts[i]
        prev_t = ts[i + 1] if i + 1 < len(ts) else -1
        pred = torch.randn(x.shape, generator=g)
        noise_gen_state = torch.Generator().manual_seed(100 + i)
        ref = sched.step(pred, t, x, generator=noise_gen_state).prev_sample
        # diffusers draws its noise with randn_tensor(generator=...) on the CPU: the same draw
        noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(100 + i))
        out = ddpm_step(pred, t, x, ns, prev_t, noise=noise)
        assert torch.allclose(out.prev_sample, ref, atol=ATOL), (int(t), (out.prev_sample - ref).abs().max())


def test_log_prob_equals_normal_and_scores_given_sample():
    ns = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(2)
    x, pred = torch.randn(4, 3, 5, 5, generator=g), torch.randn(4, 3, 5, 5, generator=g)
    out = ddim_step(pred, 600, x, ns, 580, eta=1.0, generator=g)
    ref = torch.distributions.Normal(out.mean, out.std).log_prob(out.prev_sample).flatten(1).sum(1)
    assert torch.allclose(out.log_prob, ref, rtol=1e-5)
    # scoring a given previous sample (RL re-evaluation) gives the same number, and other samples less
    again = ddim_step(pred, 600, x, ns, 580, eta=1.0, prev_sample=out.prev_sample)
    assert torch.equal(again.prev_sample, out.prev_sample)
    assert torch.allclose(again.log_prob, out.log_prob)
    worse = ddim_step(pred, 600, x, ns, 580, eta=1.0, prev_sample=out.mean + 5 * out.std)
    assert (worse.log_prob < ddim_step(pred, 600, x, ns, 580, prev_sample=out.mean).log_prob).all()
    d = ddpm_step(pred, 600, x, ns, 580, generator=g)
    ref = torch.distributions.Normal(d.mean, d.std.expand_as(d.mean)).log_prob(d.prev_sample).flatten(1).sum(1)
    assert torch.allclose(d.log_prob, ref, rtol=1e-5)


def test_deterministic_transition_has_zero_log_prob():
    ns = NoiseSchedule.linear(1000)
    x = torch.randn(2, 3)
    out = ddim_step(torch.randn(2, 3), 500, x, ns, 480, eta=0.0)
    assert torch.equal(out.log_prob, torch.zeros(2)) and torch.equal(out.prev_sample, out.mean)
    assert torch.equal(gaussian_log_prob(x, x, torch.zeros(())), torch.zeros(2))


def test_eta_out_of_range():
    ns = NoiseSchedule.linear(10)
    with pytest.raises(ValueError, match=r"eta must be in \[0, 1\]"):
        ddim_step(torch.zeros(1, 2), 5, torch.zeros(1, 2), ns, 4, eta=1.5)


def test_prediction_type_conversions_are_consistent():
    ns = NoiseSchedule.linear(1000)
    g = torch.Generator().manual_seed(3)
    x0, eps = torch.randn(5, 4, generator=g), torch.randn(5, 4, generator=g)
    t = torch.tensor([10, 200, 500, 800, 999])
    xt = ns.add_noise(x0, eps, t)
    a = ns.alpha_bar(t).float().unsqueeze(1)
    v = a.sqrt() * eps - (1 - a).sqrt() * x0
    for ptype, pred in [("epsilon", eps), ("v_prediction", v), ("sample", x0)]:
        s = NoiseSchedule(ns.alphas_cumprod, prediction_type=ptype)
        e, x = s.to_eps_x0(pred, xt, t)
        assert torch.allclose(e, eps, atol=1e-3) and torch.allclose(x, x0, atol=1e-3)


def test_full_loop_matches_diffusers_loop_with_the_same_noise():
    sched = DDIMScheduler(**_sd_kwargs())
    sched.set_timesteps(8)
    ns = NoiseSchedule.from_scheduler(sched)

    def denoiser(x, t, cond):  # a smooth nonlinear stand-in for a UNet
        return torch.tanh(x * cond + t.float().reshape(-1, 1, 1, 1) / 1000)

    cond = torch.tensor(0.7)
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x_T = randn((2, 1, 4, 4), gens)
    out = sample(denoiser, x_T, ns, sched.timesteps, cond, eta=1.0, generators=gens, keep_trajectory=True)
    # reference: diffusers' loop, drawing the step noise from the same per-sample generators
    gens = [torch.Generator().manual_seed(s) for s in (11, 12)]
    x = randn((2, 1, 4, 4), gens)
    for t in sched.timesteps:
        x = sched.step(denoiser(x, t.expand(2), cond), t, x, eta=1.0, variance_noise=randn(x.shape, gens)).prev_sample
    assert torch.allclose(out.sample, x, atol=1e-5)
    assert out.latents.shape == (9, 2, 1, 4, 4) and out.log_probs.shape == (8, 2)


def test_per_sample_generators_make_samples_independent_of_the_batch():
    ns = NoiseSchedule.linear(1000)
    ts = ns.timesteps(5)

    def denoiser(x, t, cond):
        return 0.5 * x

    def run(seeds):
        gens = [torch.Generator().manual_seed(s) for s in seeds]
        return sample(denoiser, randn((len(seeds), 3), gens), ns, ts, generators=gens).sample

    both, alone = run([5, 6]), run([6])
    assert torch.equal(both[1], alone[0])


def test_cfg_denoiser_is_one_batched_call_and_guides():
    calls = []

    def denoiser(x, t, cond):
        calls.append(x.shape[0])
        return x * cond.reshape(-1, 1)

    x, t = torch.ones(3, 2), torch.zeros(3)
    guided = cfg_denoiser(denoiser, 4.0, uncond=torch.zeros(3))
    out = guided(x, t, torch.ones(3))
    assert calls == [6]
    assert torch.allclose(out, torch.full((3, 2), 4.0))  # 0 + 4 * (1 - 0)


def test_callback_can_replace_the_sample():
    ns = NoiseSchedule.linear(100)
    seen = []

    def cb(i, t, out):
        seen.append(int(t))
        return torch.zeros_like(out.prev_sample)

    out = sample(lambda x, t, c: x, torch.ones(2, 2), ns, ns.timesteps(4), callback=cb, eta=0.0)
    assert seen == [75, 50, 25, 0] and torch.equal(out.sample, torch.zeros(2, 2))


def test_bad_arguments():
    ns = NoiseSchedule.linear(100)
    with pytest.raises(ValueError, match="sampler must be"):
        sample(lambda x, t, c: x, torch.ones(1, 2), ns, [50], sampler="euler")
    with pytest.raises(ValueError, match="num_inference_steps must be in"):
        ns.timesteps(0)
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        NoiseSchedule(ns.alphas_cumprod, prediction_type="flow")
    with pytest.raises(ValueError, match="one generator per sample"):
        randn((3, 2), [torch.Generator()])


@pytest.mark.parametrize("spacing", ["leading", "trailing", "linspace"])
@pytest.mark.parametrize("T", [1000, 100])
def test_timesteps_match_diffusers_for_every_step_count(spacing, T):
    """Every spacing and every step count, as diffusers' set_timesteps makes them (its numpy
    arithmetic: arange with a float step for "trailing", linspace for "linspace")."""
    offset = 1 if spacing == "leading" else 0
    sched = DDIMScheduler(num_train_timesteps=T, timestep_spacing=spacing, steps_offset=offset)
    ns = NoiseSchedule.from_scheduler(sched)
    for n in range(1, T + 1):
        sched.set_timesteps(n)
        ts = ns.timesteps(n, spacing, steps_offset=offset)
        assert ts.dtype == torch.long and torch.equal(ts, sched.timesteps), (n, ts, sched.timesteps)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_steps_form_the_schedule_in_float32(dtype):
    """x in float16 / bfloat16 (an SD pipeline in half precision): the schedule's coefficients must
    not be formed in that dtype, where 1 - alpha_bar_t and 1 - alpha_bar_t / alpha_bar_prev cancel
    (bfloat16 rounds alpha_bar_1 = 0.9983 to 1: sigma_t = 0 or NaN; float16 was 7% off at t = 21).
    Reference: the same half inputs in float64. Measured after the fix, in units of the dtype's eps:
    std 0.5 (relative), x0_hat 1.2 (relative), x_prev 1.5 (relative to max |x_prev| ~ 4)."""
    sched = DDIMScheduler(**_sd_kwargs())
    sched.set_timesteps(50)
    ns = NoiseSchedule.from_scheduler(sched)
    g = torch.Generator().manual_seed(4)
    x, pred, noise = (torch.randn(2, 4, 8, 8, generator=g).to(dtype) for _ in range(3))
    eps, tiny = torch.finfo(dtype).eps, torch.finfo(dtype).tiny
    ts = sched.timesteps.tolist()
    for t, prev_t in zip(ts, ts[1:] + [-1]):
        for step, kw in ((ddim_step, dict(eta=1.0)), (ddpm_step, {})):
            out = step(pred, t, x, ns, prev_t, noise=noise, **kw)
            ref = step(pred.double(), t, x.double(), ns, prev_t, noise=noise.double(), **kw)
            assert out.prev_sample.dtype == dtype
            err = lambda a, b: float((a.double() - b).abs().max())  # noqa: E731
            # (a std below the dtype's smallest normal flushes: DDPM's last step has std 1e-10)
            assert err(out.std, ref.std) <= 2 * eps * float(ref.std.max()) + tiny, (t, step)
            assert err(out.x0_hat, ref.x0_hat) <= 4 * eps * float(ref.x0_hat.abs().max()), (t, step)
            assert err(out.prev_sample, ref.prev_sample) <= 4 * eps * float(ref.prev_sample.abs().max()), (t, step)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_log_prob_is_summed_in_float32(dtype):
    """A log-prob sums thousands of terms (an SD latent has 16384): in float16 / bfloat16 the sum
    itself would round to units or tens, which destroys the RL ratio exp(lp_new - lp_old).
    Reference: the same half inputs in float64; float32 accumulation is good to ~1e-6 relative."""
    g = torch.Generator().manual_seed(5)
    mean = torch.randn(2, 4, 32, 32, generator=g).to(dtype)
    std = torch.full((1, 1, 1, 1), 0.3).to(dtype)
    x = (mean.float() + std.float() * torch.randn(2, 4, 32, 32, generator=g)).to(dtype)
    lp = gaussian_log_prob(x, mean, std)
    ref = gaussian_log_prob(x.double(), mean.double(), std.double())
    assert lp.dtype == torch.float32
    assert torch.allclose(lp.double(), ref, rtol=1e-5, atol=0)


def test_from_scheduler_refuses_a_scheduler_without_a_vp_schedule():
    from diffusers import FlowMatchEulerDiscreteScheduler

    with pytest.raises(ValueError, match="FlowMatchEulerDiscreteScheduler has no alphas_cumprod"):
        NoiseSchedule.from_scheduler(FlowMatchEulerDiscreteScheduler())


def test_a_replaced_sample_is_the_one_scored():
    """log_probs[i] is log p(x_prev | x_t) of the x_prev the loop continues from (and keeps in the
    trajectory), also when the callback replaces it."""
    ns = NoiseSchedule.linear(100)
    steps = []

    def cb(i, t, out):
        steps.append(out)
        return out.mean + 0.5 * out.std  # a sample other than the drawn one

    out = sample(lambda x, t, c: 0.1 * x, torch.ones(2, 3), ns, ns.timesteps(4), callback=cb, eta=1.0,
                 generators=torch.Generator().manual_seed(0), keep_trajectory=True)
    for i, s in enumerate(steps):
        assert torch.equal(out.latents[i + 1], s.mean + 0.5 * s.std)
        assert torch.allclose(out.log_probs[i], gaussian_log_prob(out.latents[i + 1], s.mean, s.std))
    assert (out.log_probs[:3] != 0).all()  # stochastic steps, so the check above can fail


def test_map_cond_maps_batched_tensors_and_passes_the_rest():
    from diffblend.core import map_cond

    cond = {"emb": torch.arange(6.0).reshape(3, 2), "extra": [torch.ones(3), torch.tensor(2.0)], "tag": "x"}
    out = map_cond(cond, lambda t: t[torch.tensor([2, 0])])
    assert torch.equal(out["emb"], torch.tensor([[4.0, 5.0], [0.0, 1.0]]))
    assert torch.equal(out["extra"][0], torch.ones(2)) and out["extra"][1].item() == 2.0  # 0-d: untouched
    assert out["tag"] == "x" and isinstance(out["extra"], list) and map_cond(None, lambda t: t) is None
