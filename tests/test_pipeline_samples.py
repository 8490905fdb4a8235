"""How BlendPipeline splits a denoiser call into row groups: from the images the pipeline call declares
(prompt / prompt_embeds batch x num_images_per_prompt, as diffusers computes batch_size), never guessed
from row counts; and the blend is validated once per pipeline call, not at every denoiser call."""

from __future__ import annotations

import types

import pytest
import torch

import diffblend.adapters.blender as blender_mod
from diffblend.pipeline import BlendPipeline, declared_samples
from helpers_pipelines import save_random_lora, tiny_sd

STEPS = 2
W = {"a": 0.5, "b": 0.5}


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd(d)
    return BlendPipeline(pipe, {n: save_random_lora(pipe, d / n, seed=i + 1) for i, n in enumerate("ab")})


@pytest.fixture
def groups_seen(monkeypatch):
    """(rows, groups) of every Blender.forward call."""
    seen: list[tuple[int, int]] = []
    inner = blender_mod.Blender.forward

    def spy(self, forward, blend, groups, args, kwargs, mode=None, **kw):
        x = kwargs.get(self._sample_arg, args[0] if args else None)
        seen.append((x.shape[0], groups))
        return inner(self, forward, blend, groups, args, kwargs, mode, **kw)

    monkeypatch.setattr(blender_mod.Blender, "forward", spy)
    return seen


def _kw(n_latents: int, **extra):
    return dict(num_inference_steps=STEPS, eta=1.0, height=16, width=16, output_type="latent",
                latents=torch.randn((n_latents, 4, 8, 8), generator=torch.Generator().manual_seed(0)),
                generator=torch.Generator().manual_seed(1), **extra)


def test_declared_samples_follows_diffusers_batch_size(sd):
    emb = torch.zeros(3, 16, 32)
    assert declared_samples(sd.pipe, (), {"prompt": "a"}) == 1
    assert declared_samples(sd.pipe, (["a", "b"],), {}) == 2  # positional prompt
    assert declared_samples(sd.pipe, (), {"prompt": ["a", "b"], "num_images_per_prompt": 3}) == 6
    assert declared_samples(sd.pipe, (), {"prompt_embeds": emb, "num_images_per_prompt": 2}) == 6
    assert declared_samples(sd.pipe, (), {}) is None  # neither prompt nor prompt_embeds
    assert declared_samples(types.SimpleNamespace(), (), {"prompt": "a"}) is None  # not callable

    class Unconditional:  # e.g. DDPMPipeline: batch_size, no prompt
        def __call__(self, batch_size: int = 1, num_inference_steps: int = 10):
            pass

    assert declared_samples(Unconditional(), (), {}) == 1
    assert declared_samples(Unconditional(), (4,), {}) == 4


def test_declared_samples_on_the_digits_pipeline():
    from diffblend.zoo.pipeline import DigitsPipeline

    pipe = DigitsPipeline.__new__(DigitsPipeline)  # only its __call__ signature is read
    assert declared_samples(pipe, (["3", "7"],), {"num_images_per_prompt": 2}) == 4
    assert declared_samples(pipe, (), {"prompt_embeds": torch.zeros(5, 4, 8)}) == 5


def test_num_images_per_prompt_gives_two_groups_per_call(sd, groups_seen):
    """2 prompts x 2 images under CFG: every call holds 8 rows = 2 groups ([uncond; cond]) of the 4 images."""
    with torch.no_grad():
        sd(prompt=["a", "b"], num_images_per_prompt=2, guidance_scale=3.0, weights=W, method="ls",
           **_kw(4))
    assert groups_seen == [(8, 2)] * STEPS


def test_prompt_embeds_input_blends_as_the_prompt(sd, groups_seen):
    """The same images from prompt_embeds as from the prompts they encode (LS: the same per-sample draws)."""
    prompts = ["a", "b", "c"]
    with torch.no_grad():
        cond, uncond = sd.pipe.encode_prompt(prompts, "cpu", 1, True)
        common = dict(guidance_scale=3.0, weights=W, method="ls", blend_seed=5)
        ref = sd(prompt=prompts, **common, **_kw(3)).images
        got = sd(prompt_embeds=cond, negative_prompt_embeds=uncond, **common, **_kw(3)).images
    torch.testing.assert_close(got, ref, atol=0, rtol=0)
    assert groups_seen == [(6, 2)] * (2 * STEPS)


def test_rows_not_a_multiple_of_the_declared_images_is_an_error(sd):
    blend = sd.make_blend(W, method="ls")
    x = torch.zeros(4, 4, 8, 8)
    with torch.no_grad(), sd.attached(blend, samples=3), pytest.raises(ValueError, match="not a whole number"):
        sd.model(x, torch.tensor(10), encoder_hidden_states=torch.zeros(4, 16, 32))


def test_per_image_blends_need_a_declared_number_of_images(sd):
    with pytest.raises(ValueError, match="must declare how many images"):
        with sd.attached(sd.make_blend(W, method="ls")):
            pass
    with sd.attached(sd.make_blend(W)):  # MPA treats every row alike: no count needed
        pass
    with pytest.raises(ValueError, match="2 per-sample blends but the batch holds 4"):
        sd(prompt=["a", "b"], num_images_per_prompt=2, weights=[W, W], **_kw(4))


def test_the_blend_is_checked_once_per_pipeline_call(sd, monkeypatch):
    calls = []
    check = blender_mod.Blender.check
    monkeypatch.setattr(blender_mod.Blender, "check", lambda self, *a: calls.append(1) or check(self, *a))
    with torch.no_grad():
        sd(prompt="a", guidance_scale=3.0, weights=W, **_kw(1))
    assert len(calls) == 1
