"""The one model interface (diffblend.model) on tiny SD 1.5, SDXL and SD3 pipelines: conditioning as
the pipelines build it, and ``diffblend finetune --model DIR`` on folders saved with save_pretrained."""

from __future__ import annotations

import json

import pytest
import torch
from helpers_pipelines import save_random_lora, tiny_flux, tiny_sd, tiny_sd3, tiny_sdxl

from diffblend.cli import main
from diffblend.model import DiffusionModel

BUILDERS = {"sd": lambda d: tiny_sd(d), "sdxl": lambda d: tiny_sdxl(d), "sd3": lambda d: tiny_sd3()}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def saved(request, tmp_path_factory):
    folder = tmp_path_factory.mktemp(f"tiny_{request.param}")
    BUILDERS[request.param](folder).save_pretrained(folder)  # SD3: without its T5 (no index entry)
    return request.param, folder


def _load(folder):
    from diffblend.zoo.generate import load_pipeline

    return load_pipeline(str(folder))


def test_model_matches_the_pipelines_own_denoising_loop(saved):
    """One deterministic step of DiffusionModel (its encode, uncond, guidance, grid, transition,
    decode) equals the pipeline's own __call__ with one step, to float32 round-off (1e-4: the same
    ops in a different order)."""
    family, folder = saved
    pipe = _load(folder)
    model = DiffusionModel.from_pipeline(pipe)
    assert model.family == family and model.is_flow == (family == "sd3")
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["ab", "c"]
    den = model.guide(model.denoiser(), 3.0)
    out = model.sample(den, x.clone(), model.grid(1), model.encode(prompts), 0.0)
    kw = {} if family == "sd3" else {"eta": 0.0}
    call = dict(num_inference_steps=1, guidance_scale=3.0, **kw)
    ref = pipe(prompts, latents=x.clone(), output_type="latent", **call).images
    ref_img = pipe(prompts, latents=x.clone(), output_type="pt", **call).images
    assert torch.allclose(out.sample, ref, atol=1e-4)
    assert not torch.allclose(out.sample, x, atol=1e-2)  # the step did something
    img = model.decode(out.sample)  # the pipeline's decode (scaling, SD3's shift) and [-1, 1] -> [0, 1]
    assert img.shape == (2, 3, 16, 16) and torch.allclose(img, ref_img, atol=1e-4)


@pytest.mark.parametrize("chunk", [1, None])
def test_decode_in_chunks_equals_whole_batch(saved, chunk):
    _, folder = saved
    pipe = _load(folder)
    whole = DiffusionModel.from_pipeline(pipe)
    part = DiffusionModel.from_pipeline(pipe, decode_chunk=chunk)
    z = torch.randn(3, *whole.latent_shape, generator=torch.Generator().manual_seed(1))
    assert torch.allclose(whole.decode(z), part.decode(z), atol=1e-6)


def test_finetune_command_on_each_family(saved, tmp_path):
    """``diffblend finetune --model DIR`` trains (2 epochs, 2 steps; flow models through the SDE),
    writes an adapter that the pipeline's own load_lora_weights loads, and the LoRA weights moved."""
    from safetensors.torch import load_file

    family, folder = saved
    run = tmp_path / "run"
    args = ["finetune", "--model", str(folder), "--reward", "boldness", "--kl", "0.1", "--run-dir", str(run),
            "--epochs", "2", "--prompts-per-epoch", "1", "--samples-per-prompt", "2", "--steps", "2",
            "--minibatch-size", "2", "--prompts", "a,b", "--lr", "0.05", "--no-progress"]
    assert main(args) == 0
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1] and all(torch.isfinite(torch.tensor(r["loss"])) for r in rows)
    pipe = _load(folder)
    pipe.load_lora_weights(str(run / "adapter.safetensors"), adapter_name="boldness")
    net = pipe.transformer if family == "sd3" else pipe.unet
    assert "boldness" in net.peft_config
    state = load_file(str(run / "adapter.safetensors"))
    prefix = "transformer." if family == "sd3" else "unet."
    assert all(k.startswith(prefix) for k in state)
    # peft initialises lora_B to zero: trained B weights are not
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)


def test_sweep_command_on_each_family(saved, tmp_path):
    """``diffblend sweep --model DIR --adapter R=PATH`` runs the blend methods (flow models: the flow SDE)
    and writes one record per image and setting; blends differ from the base."""
    from diffblend.evaluate.records import read_records

    family, folder = saved
    pipe = _load(folder)
    a = save_random_lora(pipe, tmp_path / "a", seed=1)
    b = save_random_lora(pipe, tmp_path / "b", seed=2)
    out = tmp_path / "records.jsonl"
    args = ["sweep", "--model", str(folder), "--adapter", f"boldness={a}", "--adapter", f"jpeg_compressibility={b}",
            "--score", "boldness", "--rewards", "boldness,jpeg_compressibility", "--methods", "base,mpa,ls,soup",
            "--weights", "0.5", "--prompts", "a", "--seeds", "2", "--steps", "2", "--no-progress", "-o", str(out)]
    assert main(args) == 0
    recs = read_records(out)
    assert len(recs) == 4 * 2 and {r["method"] for r in recs} == {"base", "mpa", "ls", "soup"}
    by = {(r["method"], r["seed"]): r["rewards"]["boldness"] for r in recs}
    assert by[("mpa", 0)] != by[("base", 0)]


def test_generate_command_on_each_family(saved, tmp_path):
    """``diffblend generate --model DIR --adapter ... --weights ...`` writes the grid for every family."""
    family, folder = saved
    pipe = _load(folder)
    a = save_random_lora(pipe, tmp_path / "a", seed=1)
    b = save_random_lora(pipe, tmp_path / "b", seed=2)
    out = tmp_path / "grid.png"
    args = ["generate", "--model", str(folder), "--adapter", f"one={a}", "--adapter", f"two={b}", "--weights",
            "one=0.3,two=0.7", "--prompt", "ab", "--num-images", "2", "--steps", "2", "--no-scores", "-o", str(out)]
    assert main(args) == 0
    assert out.is_file() and out.stat().st_size > 0


def test_rgg_and_code_refuse_flow_models(tmp_path):
    from diffblend.evaluate.methods import Setting, generate
    from diffblend.evaluate.pipelines import DiffusersBackend

    pipe = tiny_sd3()
    backend = DiffusersBackend(pipe, {"boldness": save_random_lora(pipe, tmp_path / "a", seed=1)}, ["boldness"],
                               num_steps=2)
    for method in ("rgg", "code"):
        with pytest.raises(ValueError, match="flow matching"):
            generate(backend, Setting.make(method, {"boldness": 1.0}), ["a"], [0])


# -- Flux: at the model level in CI (FluxPipeline's default size, 128 * vae factor pixels, is an attribute that
# save_pretrained does not keep, so a saved tiny folder runs at 256x256: its CLI test below takes ~25 s)

@pytest.mark.parametrize("true_cfg", [1.0, 3.0])
def test_flux_model_matches_the_pipelines_own_step(true_cfg):
    """One deterministic step (packed latents, ids, timestep / 1000, Flux's dynamic-shift sigmas, true
    CFG with the empty negative prompt) and the decode equal FluxPipeline's own, to 1e-4."""
    pipe = tiny_flux()
    model = DiffusionModel.from_pipeline(pipe)
    assert model.family == "flux" and model.is_flow and model.latent_shape == (16, 16)
    x = torch.randn(2, *model.latent_shape, generator=torch.Generator().manual_seed(0))
    prompts = ["ab", "c"]
    out = model.sample(model.guide(model.denoiser(), true_cfg), x.clone(), model.grid(2), model.encode(prompts), 0.0)
    call = dict(num_inference_steps=2, max_sequence_length=16, true_cfg_scale=true_cfg,
                negative_prompt=["", ""] if true_cfg > 1 else None)
    ref = pipe(prompts, latents=x.clone(), output_type="latent", **call).images
    assert torch.allclose(out.sample, ref, atol=1e-4)
    ref_img = pipe(prompts, latents=x.clone(), output_type="pt", **call).images
    assert torch.allclose(model.decode(out.sample), ref_img, atol=1e-4)


def test_flux_finetune_and_blend_at_the_model_level(tmp_path):
    """finetune on the tiny Flux model (flow SDE) writes an adapter FluxPipeline.load_lora_weights loads,
    with trained (non-zero) lora_B; the sweep's backend blends two adapters on it."""
    from safetensors.torch import load_file

    from diffblend.evaluate.methods import Setting, generate
    from diffblend.evaluate.pipelines import DiffusersBackend
    from diffblend.train import FinetuneConfig, finetune

    cfg = FinetuneConfig(reward="boldness", kl=0.1, prompts=("a", "b"), epochs=2, prompts_per_epoch=1,
                         samples_per_prompt=2, num_steps=2, minibatch_size=2, lr=0.05, guidance_scale=1.0)
    res = finetune(cfg, tmp_path / "run", policy=DiffusionModel.from_pipeline(tiny_flux()), progress=False)
    state = load_file(str(res.adapter))
    assert all(k.startswith("transformer.") for k in state)
    assert any(v.abs().max() > 0 for k, v in state.items() if "lora_B" in k)
    pipe = tiny_flux()
    pipe.load_lora_weights(str(res.adapter), adapter_name="bold")
    assert "bold" in pipe.transformer.peft_config
    pipe.delete_adapters("bold")
    a = save_random_lora(pipe, tmp_path / "a", seed=1)
    b = save_random_lora(pipe, tmp_path / "b", seed=2)
    backend = DiffusersBackend(pipe, {"boldness": a, "jpeg_compressibility": b}, ["boldness"], num_steps=2)
    base = generate(backend, Setting.make("base"), ["a"], [0])
    mpa = generate(backend, Setting.make("mpa", {"boldness": 0.5, "jpeg_compressibility": 0.5}), ["a"], [0])
    assert mpa.x0.shape == base.x0.shape == (1, 16, 16) and not torch.allclose(mpa.x0, base.x0)


# ~25 s on one CPU thread (a saved Flux folder runs at FluxPipeline's default 256x256 here): run in CI all the same
def test_flux_folder_through_the_cli(tmp_path):
    """finetune, sweep and generate --model DIR on a saved tiny Flux folder (its T5 tokenizer built offline)."""
    from diffblend.evaluate.records import read_records

    folder = tmp_path / "flux"
    pipe = tiny_flux()
    pipe.save_pretrained(folder)
    a, b = (save_random_lora(pipe, tmp_path / n, seed=i + 1) for i, n in enumerate("ab"))
    common = ["--model", str(folder), "--steps", "1", "--no-progress"]
    assert main(["finetune", *common, "--reward", "boldness", "--kl", "0.1", "--run-dir", str(tmp_path / "run"),
                 "--epochs", "1", "--prompts-per-epoch", "1", "--samples-per-prompt", "2", "--minibatch-size", "2",
                 "--prompts", "a", "--guidance-scale", "1"]) == 0
    _load(folder).load_lora_weights(str(tmp_path / "run" / "adapter.safetensors"), adapter_name="bold")
    out = tmp_path / "sweep" / "r.jsonl"
    assert main(["sweep", *common, "--adapter", f"boldness={a}", "--adapter", f"jpeg_compressibility={b}", "--score",
                 "boldness", "--rewards", "boldness,jpeg_compressibility", "--methods", "base,mpa", "--weights", "0.5",
                 "--prompts", "a", "--seeds", "1", "--guidance-scale", "1", "-o", str(out)]) == 0
    assert len(read_records(out)) == 2
    common.remove("--no-progress")
    assert main(["generate", *common, "--adapter", f"one={a}", "--adapter", f"two={b}", "--weights", "one=0.5,two=0.5",
                 "--prompt", "a", "--num-images", "1", "--no-scores", "-o", str(tmp_path / "g.png")]) == 0


def test_gradient_checkpointing_and_decode_chunks_keep_the_gradients(tmp_path):
    """The memory options change no number: same rewards and gradient norms (1e-5 relative: decoding one
    latent at a time runs the convolutions in another order, seen 4e-6); bf16 autocast runs and keeps
    the adapter in float32."""
    from diffblend.train import FinetuneConfig, finetune

    folder = tmp_path / "sdxl"
    tiny_sdxl(tmp_path).save_pretrained(folder)
    base = dict(reward="boldness", kl=0.1, model=str(folder), prompts=("a", "b"), epochs=1, prompts_per_epoch=1,
                samples_per_prompt=2, num_steps=2, minibatch_size=2)
    from accelerate.state import AcceleratorState

    runs = {}
    for name, extra in {"plain": {}, "memory": dict(gradient_checkpointing=True, decode_chunk=1),
                        "bf16": dict(mixed_precision="bf16")}.items():
        AcceleratorState._reset_state(True)  # accelerate's state is per process: one precision per state
        try:
            runs[name] = finetune(FinetuneConfig(**base, **extra), tmp_path / name, progress=False).metrics[0]
        finally:
            AcceleratorState._reset_state(True)
    for key in ("reward_mean", "grad_norm"):  # (the loss at epoch 0 is a mean of advantages, ~0: no scale)
        assert runs["memory"][key] == pytest.approx(runs["plain"][key], rel=1e-5)
    assert runs["plain"]["grad_norm"] > 0
    from safetensors.torch import load_file

    assert all(v.dtype == torch.float32 for v in load_file(str(tmp_path / "bf16" / "adapter.safetensors")).values())
    with pytest.raises(ValueError, match="mixed_precision"):
        FinetuneConfig(**base, mixed_precision="fp8")
