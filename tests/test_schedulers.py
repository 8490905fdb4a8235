"""diffblend.schedulers.FlowMatchSDEScheduler: a drop-in for diffusers' FlowMatchEulerDiscreteScheduler.

References: diffusers' own scheduler (noise_level = 0, the same pipeline call) and core.flow_sde_step
(noise_level > 0). A tiny StableDiffusion3Pipeline built from configs (no T5) runs the real pipeline
loop: 4 steps on 8x8 latents.
"""

import warnings

import pytest
import torch

from diffblend.core import flow_sde_step
from diffblend.pipeline import BlendPipeline
from diffblend.schedulers import FlowMatchSDEScheduler
from helpers_pipelines import tiny_sd3


def _euler(**kw):
    from diffusers import FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler(**kw)


def test_config_is_the_parents_plus_noise_level(tmp_path):
    base = _euler(shift=3.0, use_dynamic_shifting=True)
    sched = FlowMatchSDEScheduler.from_config(base.config, noise_level=0.3)
    for key, value in base.config.items():
        if not key.startswith("_"):
            assert sched.config[key] == value, key
    assert sched.config.noise_level == 0.3
    assert FlowMatchSDEScheduler.from_config(base.config).config.noise_level == 0.7  # Flow-GRPO's default
    sched.save_pretrained(tmp_path)
    again = FlowMatchSDEScheduler.from_pretrained(tmp_path)
    assert again.config.noise_level == 0.3 and again.config.shift == 3.0
    with pytest.raises(ValueError, match="noise_level"):
        FlowMatchSDEScheduler(noise_level=-1.0)
    with pytest.raises(ValueError, match="invert_sigmas"):
        FlowMatchSDEScheduler(invert_sigmas=True)
    with pytest.raises(ValueError, match="stochastic_sampling"):
        FlowMatchSDEScheduler(stochastic_sampling=True)


def test_step_is_flow_sde_step_on_the_schedulers_grid():
    sched = FlowMatchSDEScheduler(shift=3.0, noise_level=0.7)
    sched.set_timesteps(5)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    ref = x
    sched.generator = torch.Generator().manual_seed(1)  # what a pipeline's step uses (it passes none)
    mine = torch.Generator().manual_seed(1)
    for i, t in enumerate(sched.timesteps):
        v = torch.randn(x.shape, generator=g)
        out = sched.step(v, t, x)
        expect = flow_sde_step(v, sched.sigmas[i], sched.sigmas[i + 1], ref, 0.7, mine)
        for a, b in zip((out.prev_sample, out.log_prob, out.prev_sample_mean, out.std, out.pred_original_sample),
                        (expect.prev_sample, expect.log_prob, expect.mean, expect.std, expect.x0_hat)):
            torch.testing.assert_close(a, b, atol=0, rtol=0)  # the same function on the same numbers
        x, ref = out.prev_sample, expect.prev_sample
    sched.set_timesteps(5)
    first = sched.step(v, sched.timesteps[0], x, return_dict=False, prev_sample=x)
    assert len(first) == 5 and torch.equal(first[0], x)  # a given sample is scored, not redrawn
    with pytest.raises(ValueError, match="timestep"):
        sched.step(v, 3, x)
    with pytest.raises(ValueError, match="per_token_timesteps"):
        sched.step(v, sched.timesteps[1], x, per_token_timesteps=torch.ones(2, 64))


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3()


def _latents(pipe, seed=0):
    return pipe("a cat", num_inference_steps=4, height=16, width=16, output_type="latent", max_sequence_length=16,
                generator=torch.Generator().manual_seed(seed)).images


def test_noise_level_0_reproduces_euler_in_the_sd3_pipeline(sd3):
    """The same pipeline call with each scheduler: diffusers' Euler ODE and ours at noise_level = 0 do the
    same float32 operations, so the latents agree to round-off (atol 1e-6 on O(1) values)."""
    euler = sd3.scheduler
    try:
        ode = _latents(sd3)
        sd3.scheduler = FlowMatchSDEScheduler.from_config(euler.config, noise_level=0.0)
        torch.testing.assert_close(_latents(sd3), ode, atol=1e-6, rtol=0)
        sd3.scheduler = FlowMatchSDEScheduler.from_config(euler.config, noise_level=0.7)
        sd3.scheduler.generator = torch.Generator().manual_seed(3)
        sde = _latents(sd3)
        sd3.scheduler.generator = torch.Generator().manual_seed(3)
        torch.testing.assert_close(_latents(sd3), sde, atol=0, rtol=0)  # seeded: reproducible
        assert (sde - ode).abs().mean() > 0.1  # and stochastic: fresh noise at every step
    finally:
        sd3.scheduler = euler


def test_blend_pipeline_ls_warns_only_without_sde_noise(sd3):
    from peft import LoraConfig

    euler = sd3.scheduler
    for name in ("a", "b"):
        sd3.transformer.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_v"],
                                               init_lora_weights=False), adapter_name=name)
    try:
        bp = BlendPipeline(sd3)
        kw = dict(weights={"a": 0.5, "b": 0.5}, method="ls", num_inference_steps=2, height=16, width=16,
                  output_type="latent", max_sequence_length=16)
        with pytest.warns(UserWarning, match="stochastic sampler"):
            bp("a cat", **kw)  # the Euler ODE
        sd3.scheduler = FlowMatchSDEScheduler.from_config(euler.config, noise_level=0.0)
        with pytest.warns(UserWarning, match="stochastic sampler"):
            bp("a cat", **kw)  # noise_level 0 is the same ODE
        sd3.scheduler = FlowMatchSDEScheduler.from_config(euler.config, noise_level=0.7)
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            out = bp("a cat", **kw).images
        assert torch.isfinite(out).all()
    finally:
        sd3.scheduler = euler
        sd3.transformer.delete_adapters(["a", "b"])
