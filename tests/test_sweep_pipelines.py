"""The methods registry over a tiny SD 1.5-shaped diffusers pipeline with two LoRA adapters."""

import pytest
import torch

from diffblend.evaluate.methods import MethodOptions, Setting, generate
from diffblend.evaluate.pipelines import DiffusersBackend
from diffblend.evaluate.records import read_records
from diffblend.evaluate.sweep import build_settings, pair_grid, run_sweep
from diffblend.baselines.code import CoDeConfig

from helpers_pipelines import save_random_lora, tiny_sd


def bright(images, prompts, meta):
    return images.mean(dim=(1, 2, 3)), {}


def left_dark(images, prompts, meta):
    return -images[..., : images.shape[-1] // 2].mean(dim=(1, 2, 3)), {}


def jpeg_like(images, prompts, meta):  # no gradient, like the JPEG-size reward
    return images.detach().round().mean(dim=(1, 2, 3)), {}


@pytest.fixture(scope="module")
def backend(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("tiny")
    pipe = tiny_sd(tmp)
    a = save_random_lora(pipe, tmp / "a", seed=1)
    b = save_random_lora(pipe, tmp / "b", seed=2)
    return DiffusersBackend(pipe, {"bright": a, "left_dark": b},
                            {"bright": bright, "left_dark": left_dark, "jpeg_like": jpeg_like},
                            oracles=[({"bright": 1.0, "left_dark": 0.0}, a)], num_steps=3, guidance_scale=3.0,
                            non_differentiable="skip")


def test_lambda_zero_is_base_and_oracle_is_its_adapter(backend):
    base = generate(backend, Setting.make("base"), ["x", "y"], [0, 1])
    kla0 = generate(backend, Setting.make("kla", {"bright": 0.5, "left_dark": 0.5}, 0.0), ["x", "y"], [0, 1])
    torch.testing.assert_close(base.x0, kla0.x0)
    w = {"bright": 1.0, "left_dark": 0.0}
    one_hot = generate(backend, Setting.make("mpa", w, 1.0), ["x"], [3])
    oracle = generate(backend, Setting.make("morl", w), ["x"], [3])
    torch.testing.assert_close(one_hot.x0, oracle.x0)
    assert backend.adapter_names == ("bright", "left_dark")
    with pytest.raises(ValueError, match="no MORL oracle"):
        generate(backend, Setting.make("morl", {"bright": 0.5, "left_dark": 0.5}), ["x"], [0])


def test_rgg_guides_with_differentiable_terms_only_when_asked(backend):
    w = {"bright": 0.5, "jpeg_like": 0.5}
    out = generate(backend, Setting.make("rgg", w), ["x", "y"], [0, 1])
    base = generate(backend, Setting.make("base"), ["x", "y"], [0, 1])
    assert not torch.equal(out.x0, base.x0)  # the "bright" term moved the samples
    backend.non_differentiable = "error"
    try:
        with pytest.raises(ValueError, match="not differentiable"):
            generate(backend, Setting.make("rgg", w), ["x"], [0])
    finally:
        backend.non_differentiable = "skip"


def test_sweep_with_every_method_and_saved_images(backend, tmp_path):
    grid = pair_grid(["bright", "left_dark"], [0.0, 1.0])
    st = build_settings(["base", "mpa", "ls", "soup", "kla", "rgg", "code", "morl"], grid[:1] + grid[1:],
                        lambda_grid=[0.5], kla_weights=grid[:1])
    st = [s for s in st if s.method != "morl" or s.weights_dict["bright"] == 1.0]
    path = tmp_path / "r.jsonl"
    opts = MethodOptions(code=CoDeConfig(num_candidates=2, block_size=2))
    run_sweep(backend, st, ["x"], [0], path, options=opts, batch_size=2, images_dir=tmp_path / "img",
              progress=False)
    recs = read_records(path)
    assert len(recs) == len(st)
    assert all((tmp_path / r["image"]).exists() for r in recs)
    assert set(recs[0]["rewards"]) == {"bright", "left_dark", "jpeg_like"}


def test_backend_equals_the_pipelines_own_call_on_the_digits_model(tmp_path):
    """Our sampler path (core DDIM, per-sample generators) reproduces DigitsPipeline.__call__ and
    BlendPipeline.__call__ given the same generators: the sweep measures the methods users run."""
    from diffblend.evaluate.methods import sample_seed
    from diffblend.zoo.model import build_pipeline

    pipe = build_pipeline()
    pipe.set_progress_bar_config(disable=True)
    targets = ["to_q", "to_k", "to_v", "to_out.0"]
    a = save_random_lora(pipe, tmp_path / "a", seed=1, targets=targets)
    b = save_random_lora(pipe, tmp_path / "b", seed=2, targets=targets)
    be = DiffusersBackend(pipe, {"a": a, "b": b}, {"bright": bright}, num_steps=4, guidance_scale=2.0)
    prompts, seeds = ["3", "7"], [0, 1]

    def gens():
        return [torch.Generator().manual_seed(sample_seed(p, s)) for p, s in zip(prompts, seeds)]

    kw = dict(num_inference_steps=4, guidance_scale=2.0, eta=1.0, output_type="pt")
    ours = be.to_images(generate(be, Setting.make("base"), prompts, seeds).x0)
    theirs = be.bp(prompts, generator=gens(), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-6)  # float32 round-off only
    w = {"a": 0.3, "b": 0.7}
    ours = be.to_images(generate(be, Setting.make("mpa", w, 1.0), prompts, seeds).x0)
    theirs = be.bp(prompts, weights=w, generator=gens(), **kw).images
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-5)


def test_an_oracle_serves_every_w_with_the_same_non_zero_weights(tmp_path):
    # r(w) does not change when a reward is listed with weight 0 (a three-reward grid on a pair's
    # edge), so the pair's oracle is the oracle there.
    pipe = tiny_sd(tmp_path)
    a = save_random_lora(pipe, tmp_path / "a", seed=1)
    b = save_random_lora(pipe, tmp_path / "b", seed=2)
    half = save_random_lora(pipe, tmp_path / "half", seed=3)
    be = DiffusersBackend(pipe, {"bright": a, "left_dark": b}, {"bright": bright, "left_dark": left_dark,
                                                                "jpeg_like": jpeg_like},
                          oracles=[({"bright": 0.5, "left_dark": 0.5}, half)], num_steps=2, guidance_scale=1.0)
    pair = generate(be, Setting.make("morl", {"bright": 0.5, "left_dark": 0.5}), ["x"], [0]).x0
    edge = generate(be, Setting.make("morl", {"bright": 0.5, "left_dark": 0.5, "jpeg_like": 0.0}), ["x"], [0]).x0
    torch.testing.assert_close(pair, edge, rtol=0, atol=0)
    assert be.oracle_name({"left_dark": 0.5, "bright": 0.5}) == be.oracle_name({"bright": 0.5, "left_dark": 0.5})
