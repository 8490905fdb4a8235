"""The embedded default model: tokenizer, pipeline (SD code path, LoRA mixin), training, shipped weights."""

import json

import pytest
import torch

from diffblend.zoo.data import TEMPLATES, load_split, prompt_for, vocabulary_words
from diffblend.zoo.model import build_pipeline
from diffblend.zoo.train_base import TrainBaseConfig, diffusion_loss, train_base, training_batch


TINY = (8, 8, 16)  # UNet channels for fast tests (divisible by norm_num_groups=8)


@pytest.fixture(scope="module")
def tiny_pipe():
    pipe = build_pipeline(seed=0, channels=TINY)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_data_split_is_fixed_and_disjoint():
    xtr, ytr = load_split("train")
    xte, yte = load_split("test")
    assert xtr.shape == (1347, 1, 16, 16) and xte.shape == (450, 1, 16, 16)
    assert 0 <= float(xtr.min()) and float(xtr.max()) <= 1
    assert torch.equal(load_split("test")[1], yte)  # deterministic
    _, yall = load_split("all")
    # stratified: each class holds 25 % of its images in the test split, up to rounding
    assert ((torch.bincount(yte, minlength=10) - 0.25 * torch.bincount(yall, minlength=10)).abs() <= 1).all()


def test_tokenizer_gives_one_token_per_known_word(tiny_pipe):
    tok = tiny_pipe.tokenizer
    for word in vocabulary_words():
        ids = tok(word).input_ids
        assert len(ids) == 3, (word, ids)  # <bos> word <eos>
    for d in range(10):
        for k in range(len(TEMPLATES)):
            assert len(tok(prompt_for(d, k)).input_ids) <= tok.model_max_length
    # different digits give different embeddings, the empty prompt differs from all of them
    e, _ = tiny_pipe.encode_prompt(["7", "3", ""], "cpu", 1, False)
    assert e.shape == (3, tok.model_max_length, 32)
    assert not torch.allclose(e[0], e[1]) and not torch.allclose(e[0], e[2])


def test_pipeline_call_shapes_outputs_and_cfg(tiny_pipe):
    g = [torch.Generator().manual_seed(i) for i in range(2)]
    out = tiny_pipe(["7", "a digit 3"], num_inference_steps=3, generator=g, output_type="pt").images
    assert out.shape == (2, 1, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    pil = tiny_pipe("7", num_inference_steps=2, num_images_per_prompt=2, output_type="pil").images
    assert len(pil) == 2 and pil[0].size == (16, 16) and pil[0].mode == "L"
    npy = tiny_pipe("7", num_inference_steps=2, output_type="np").images
    assert npy.shape == (1, 16, 16, 1)
    # same per-sample generators -> same images; image 1 does not depend on the batch it is in
    a = tiny_pipe(["7", "3"], num_inference_steps=3, generator=[torch.Generator().manual_seed(i) for i in (0, 1)],
                  output_type="pt").images
    b = tiny_pipe(["3"], num_inference_steps=3, generator=[torch.Generator().manual_seed(1)], output_type="pt").images
    # float32 round-off of another batch size, grown over 3 steps of an untrained UNet: 1.5e-6 with diffusers
    # 0.42, 7.6e-5 with 0.35 (the floor); one 8-bit grey level is 3.9e-3
    assert (a[1] - b[0]).abs().max() < 2e-4
    # guidance_scale 1 disables CFG: the UNet sees B rows, not 2B
    rows = []
    hook = tiny_pipe.unet.register_forward_hook(lambda m, i, o: rows.append(i[0].shape[0]))
    try:
        tiny_pipe(["7"], num_inference_steps=1, guidance_scale=1.0)
        tiny_pipe(["7"], num_inference_steps=1, guidance_scale=3.0)
    finally:
        hook.remove()
    assert rows == [1, 2]


@pytest.mark.parametrize("kw, needle", [(dict(eta=1.5), "eta"), (dict(eta=-0.1), "eta"),
                                         (dict(num_inference_steps=0), "num_inference_steps")])
def test_pipeline_refuses_out_of_range_sampler_settings(tiny_pipe, kw, needle):
    """eta > 1 gave NaN images (DDIM's variance term goes negative), 0 steps a ZeroDivisionError."""
    with pytest.raises(ValueError, match=needle):
        tiny_pipe("7", output_type="pt", **{"num_inference_steps": 2, **kw})


def test_callback_on_step_end_can_replace_latents(tiny_pipe):
    seen = []

    def cb(pipe, i, t, kw):
        seen.append(int(t))
        return {"latents": torch.zeros_like(kw["latents"])}

    out = tiny_pipe("7", num_inference_steps=3, callback_on_step_end=cb, output_type="latent").images
    assert len(seen) == 3 and seen == sorted(seen, reverse=True) and seen[0] == 999  # trailing spacing
    assert torch.count_nonzero(out) == 0


def test_save_and_from_pretrained_round_trip(tiny_pipe, tmp_path):
    from diffblend.zoo.pipeline import DigitsPipeline

    tiny_pipe.save_pretrained(tmp_path / "p", safe_serialization=True)
    assert list((tmp_path / "p" / "unet").glob("*.safetensors"))
    again = DigitsPipeline.from_pretrained(str(tmp_path / "p"))
    again.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=3, output_type="pt")
    a = tiny_pipe(["5"], generator=[torch.Generator().manual_seed(0)], **kw).images
    b = again(["5"], generator=[torch.Generator().manual_seed(0)], **kw).images
    assert torch.equal(a, b)


def test_lora_weights_save_and_load_with_the_mixin(tmp_path):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffblend.zoo.pipeline import DigitsPipeline

    pipe = build_pipeline(seed=0, channels=TINY)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(0)  # peft draws lora_A from the global RNG, which this torch seeds at random per process
    pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
    with torch.no_grad():
        g = torch.Generator().manual_seed(0)
        for n, p in pipe.unet.named_parameters():
            if "lora_B" in n:
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    DigitsPipeline.save_lora_weights(tmp_path, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
    fresh = build_pipeline(seed=0, channels=TINY)
    fresh.set_progress_bar_config(disable=True)
    kw = dict(num_inference_steps=2, output_type="pt")
    base = fresh(["4"], generator=[torch.Generator().manual_seed(0)], **kw).images
    fresh.load_lora_weights(str(tmp_path / "pytorch_lora_weights.safetensors"), adapter_name="r")
    a = pipe(["4"], generator=[torch.Generator().manual_seed(0)], **kw).images
    b = fresh(["4"], generator=[torch.Generator().manual_seed(0)], **kw).images
    assert torch.allclose(a, b, atol=1e-5) and not torch.allclose(a, base, atol=1e-3)


def test_training_steps_decrease_the_loss_on_a_fixed_batch():
    pipe = build_pipeline(seed=0, channels=TINY)
    x, y = load_split("train")
    cfg = TrainBaseConfig()
    g = torch.Generator().manual_seed(0)
    batch = training_batch(x, y, torch.arange(8), cfg, g, 1000)
    params = list(pipe.unet.parameters()) + list(pipe.text_encoder.parameters())
    opt = torch.optim.AdamW(params, lr=2e-3)
    with torch.no_grad():
        before = float(diffusion_loss(pipe, *batch))
    for _ in range(25):
        loss = diffusion_loss(pipe, *batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        after = float(diffusion_loss(pipe, *batch))
    # the same 8 (x0, t, noise) triples: 25 Adam steps fit them; an untrained UNet starts near
    # loss 1 (unit-variance noise), so halving is a clear, not a marginal, decrease
    assert after < 0.5 * before, (before, after)


def _tiny_cfg(**kw):
    return TrainBaseConfig(steps=4, batch_size=4, channels=TINY, eval_per_digit=0, log_every=1, checkpoint_every=2,
                           warmup_steps=2, train_images=32, **kw)


def test_train_base_run_dir_and_resume_matches_an_uninterrupted_run(tmp_path):
    full = train_base(_tiny_cfg(), tmp_path / "full", progress=False)
    assert full["steps"] == 4
    run = tmp_path / "full"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["steps"] == 4 and cfg["channels"] == list(TINY)
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in lines] == [1, 2, 3, 4]
    assert (run / "pipeline" / "model_index.json").is_file()

    # interrupted at step 2 (stop_at), then resumed to 4: same weights as the uninterrupted run
    part = tmp_path / "part"
    train_base(_tiny_cfg(), part, progress=False, stop_at=2)
    state = torch.load(part / "checkpoint.pt", weights_only=True)
    assert state["step"] == 2 and state["optimizer"]["state"]
    train_base(_tiny_cfg(), part, resume=True, progress=False)
    a = torch.load(run / "checkpoint.pt", weights_only=True)
    b = torch.load(part / "checkpoint.pt", weights_only=True)
    assert b["step"] == 4
    for k in a["unet"]:
        assert torch.allclose(a["unet"][k], b["unet"][k], atol=1e-6), k
    for k in a["ema"]:
        assert torch.allclose(a["ema"][k], b["ema"][k], atol=1e-6), k
    assert [json.loads(line)["step"] for line in (part / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]
    with pytest.raises(ValueError):  # a used run dir is not overwritten silently
        train_base(_tiny_cfg(), run, progress=False)


def test_train_base_resume_after_a_kill_between_checkpoints(tmp_path, monkeypatch):
    """Killed after step 3 was logged but before its checkpoint (the last one is step 2), in the middle of a
    metrics line: the resumed run redoes step 3, and metrics.jsonl holds each step once."""
    import diffblend.zoo.train_base as tb

    save = tb._save_checkpoint
    monkeypatch.setattr(tb, "_save_checkpoint", lambda path, pipe, ema, opt, step, g:
                        None if step == 3 else save(path, pipe, ema, opt, step, g))
    train_base(_tiny_cfg(), tmp_path, progress=False, stop_at=3)
    monkeypatch.setattr(tb, "_save_checkpoint", save)
    with open(tmp_path / "metrics.jsonl", "a") as f:
        f.write('{"step": 4, "lo')
    train_base(_tiny_cfg(), tmp_path, resume=True, progress=False)
    assert [json.loads(line)["step"] for line in (tmp_path / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4]


def test_train_base_resume_refuses_a_different_config(tmp_path):
    import dataclasses

    train_base(_tiny_cfg(), tmp_path, progress=False, stop_at=2)
    with pytest.raises(ValueError, match=r"differs from the run's config.json in \['batch_size', 'lr'\]"):
        train_base(dataclasses.replace(_tiny_cfg(), lr=0.5, batch_size=8), tmp_path, resume=True, progress=False)
    with pytest.raises(ValueError, match="steps must be >= 2"):
        train_base(dataclasses.replace(_tiny_cfg(), steps=1), tmp_path, resume=True, progress=False)
    assert json.loads((tmp_path / "config.json").read_text())["lr"] == _tiny_cfg().lr  # the record is kept
    # more steps (and other evaluation settings) continue the run
    out = train_base(dataclasses.replace(_tiny_cfg(), steps=5), tmp_path, resume=True, progress=False)
    assert out["steps"] == 5 and json.loads((tmp_path / "config.json").read_text())["steps"] == 5


def test_shipped_pipeline_loads_and_generates():
    from diffblend.zoo import load_default_pipeline

    pipe = load_default_pipeline()
    g = [torch.Generator().manual_seed(i) for i in range(3)]
    out = pipe(["0", "a digit 1", "two"], num_inference_steps=4, generator=g, output_type="pt").images
    assert out.shape == (3, 1, 16, 16) and 0 <= float(out.min()) and float(out.max()) <= 1
    assert pipe.unet.dtype == torch.float32


def test_shipped_weights_are_small():
    from diffblend.zoo import weights_dir

    total = sum(f.stat().st_size for name in ("base", "classifier") for f in weights_dir(name).rglob("*") if f.is_file())
    assert total < 3_000_000, total


@pytest.mark.slow
def test_shipped_model_sample_quality():
    from diffblend.zoo import load_default_pipeline
    from diffblend.zoo.train_base import sample_quality

    q = sample_quality(load_default_pipeline(), per_digit=10, seed=1)
    assert q["accuracy"] >= 0.85, q


def test_shipped_tokenizer_files_tokenize_as_the_built_tokenizer():
    """The shipped folder has tokenizer.json (transformers 5) and vocab.json / merges.txt (4.x's slow
    CLIPTokenizer); whichever one loads, prompts get the ids the text encoder was trained on."""
    from importlib import resources

    from transformers import CLIPTokenizer

    from diffblend.zoo.data import vocabulary_words
    from diffblend.zoo.text import build_tokenizer

    folder = str(resources.files("diffblend.zoo").joinpath("weights/base/tokenizer"))
    shipped, built = CLIPTokenizer.from_pretrained(folder), build_tokenizer()
    prompts = ["7", "a digit 7", "seven", "An  unknown prompt!"] + [" ".join(vocabulary_words()[:3])]
    for p in prompts:
        assert shipped(p).input_ids == built(p).input_ids, p
    assert len(built("a digit 7").input_ids) == 5  # one token per known word, plus start and end


def test_shipped_text_encoder_keys_load_on_transformers_4_and_5():
    """transformers 4.x reads only ``text_model.``-prefixed CLIPTextModel keys (and silently starts from random
    weights otherwise); the shipped file has them, and train-base writes them (portable_text_encoder_file)."""
    from importlib import resources

    from safetensors.torch import load_file

    folder = resources.files("diffblend.zoo").joinpath("weights/base/text_encoder")
    keys = list(load_file(str(folder.joinpath("model.safetensors"))))
    assert keys and all(k.startswith("text_model.") for k in keys)


def test_portable_text_encoder_file_keeps_the_model(tmp_path):
    import torch
    from transformers import CLIPTextModel

    from diffblend.zoo.text import build_text_encoder, portable_text_encoder_file

    model = build_text_encoder(vocab_size=600, seed=3).eval()
    model.save_pretrained(tmp_path)
    portable_text_encoder_file(tmp_path)
    from safetensors.torch import load_file

    assert all(k.startswith("text_model.") for k in load_file(str(tmp_path / "model.safetensors")))
    ids = torch.tensor([[0, 5, 9, 1]])
    with torch.no_grad():
        torch.testing.assert_close(CLIPTextModel.from_pretrained(tmp_path).eval()(ids)[0], model(ids)[0], atol=0, rtol=0)
