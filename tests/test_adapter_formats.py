"""Every LoRA layout diffusers' loader reads, and bad adapter files.

Each format is written by hand from one diffusers/peft adapter (the kohya / sgm key mappings are
written out here, not taken from diffusers), then BlendPipeline with that adapter at one-hot weight
is compared with the same pipeline after ``pipe.load_lora_weights`` of the same file (for a peft
folder, which diffusers' pipeline loader does not read: after peft's own ``PeftModel.from_pretrained``).

Tolerances: with ``merge_cache=False`` the one-hot blend runs the very peft layers diffusers runs, on
the same float32 weights in the same order, so any difference is a loading difference: compared
bitwise (atol 0; 0.0 seen for every format). With the default merged weights W + s B A (one matmul
per layer where peft runs W x + s B (A x)) only the summation order differs: max 8.2e-6 seen on
latents with |x| up to ~10 after 2 DDIM steps; another GEMM kernel's order gave up to 3.3e-4 at
|x| ~ 7 in test_adapters.py, hence ATOL = 5e-5, RTOL = 1e-4 for that path.
"""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblend.adapters import AdapterError
from diffblend.adapters.loading import load_adapter
from diffblend.pipeline import BlendPipeline
from helpers_pipelines import save_random_lora, tiny_sd, tiny_sdxl

ATOL, RTOL = 5e-5, 1e-4
CONV_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj", "conv1", "conv2", "conv_shortcut"]
KW = dict(prompt=["a cat", "a dog"], num_inference_steps=2, guidance_scale=3.0, eta=1.0, height=16, width=16,
          output_type="latent")


@pytest.fixture(scope="module")
def src(tmp_path_factory):
    """Source adapters written by diffusers' save_lora_weights (rank 4, lora_alpha 8: scaling 2)."""
    d = tmp_path_factory.mktemp("src")
    return {"sd": save_random_lora(tiny_sd(d), d / "sd", seed=1),
            "conv": save_random_lora(tiny_sd(d), d / "conv", seed=2, targets=CONV_TARGETS),
            "xl": save_random_lora(tiny_sdxl(d), d / "xl", seed=3),
            "te": save_random_lora(tiny_sd(d), d / "te", seed=4, text_encoder=True),
            "dir": d}


# -- hand-written key layouts -------------------------------------------------------------------

def _modules(sd: dict, component: str = "unet"):
    """(module, 'A' / 'B', tensor) of a diffusers file's ``<component>.<module>.lora_X.weight`` keys."""
    for key, value in sd.items():
        m = re.fullmatch(rf"{component}\.(.+)\.lora_([AB])\.weight", key)
        if m:
            yield m[1], m[2], value


def to_kohya(sd: dict, alpha: float, rename=lambda m: m, component: str = "unet", prefix: str = "lora_unet_"):
    """kohya / sd-scripts keys: ``lora_unet_<module with _>.lora_down/lora_up.weight`` and ``.alpha``."""
    out = {}
    for module, ab, value in _modules(sd, component):
        base = prefix + rename(module).replace(".", "_")
        out[f"{base}.{'lora_down' if ab == 'A' else 'lora_up'}.weight"] = value
        out[f"{base}.alpha"] = torch.tensor(float(alpha))
    return out


def sgm_name(module: str, layers_per_block: int = 1) -> str:
    """diffusers SDXL UNet module -> the sgm (original SDXL) name kohya trains on, for tiny_sdxl's UNet."""
    n = layers_per_block + 1  # sgm blocks per diffusers down/up block (resnets (+ attentions), then a sampler)

    def sub(m):
        kind, b, what, j, rest = m[1], int(m[2]), m[3], int(m[4]), m[5]
        inner = 0 if what == "resnets" else 1
        index = 1 + b * n + j if kind == "down_blocks" else b * n + j
        block = "input_blocks" if kind == "down_blocks" else "output_blocks"
        return f"{block}.{index}.{inner}.{rest}"

    module = module.replace(".time_emb_proj", ".emb_layers.1")
    module = re.sub(r"^mid_block\.attentions\.0\.(.+)", r"middle_block.1.\1", module)
    module = re.sub(r"^mid_block\.resnets\.(\d)\.(.+)", lambda m: f"middle_block.{2 * int(m[1])}.{m[2]}", module)
    return re.sub(r"^(down_blocks|up_blocks)\.(\d+)\.(resnets|attentions)\.(\d+)\.(.+)", sub, module)


def to_attn_processor(sd: dict) -> dict:
    """The old diffusers layout: ``unet.<...>.processor.to_q_lora.down.weight``, ``<...>.lora.down.weight``."""
    out = {}
    for module, ab, value in _modules(sd):
        updown = "down" if ab == "A" else "up"
        m = re.fullmatch(r"(.+)\.(to_q|to_k|to_v|to_out\.0)", module)
        if m:
            proj = "to_out" if m[2] == "to_out.0" else m[2]
            out[f"unet.{m[1]}.processor.{proj}_lora.{updown}.weight"] = value
        else:
            out[f"unet.{module}.lora.{updown}.weight"] = value
    return out


def to_peft_dir(sd: dict, path, r=4, alpha=8):
    """A peft adapter folder: ``base_model.model.<module>.lora_A.weight`` + adapter_config.json."""
    path.mkdir()
    save_file({"base_model.model." + k.removeprefix("unet."): v for k, v in sd.items()},
              str(path / "adapter_model.safetensors"))
    targets = sorted({m.rsplit(".", 1)[-1] if not m.endswith(".0") else "to_out.0" for m, _, _ in _modules(sd)})
    (path / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "lora_alpha": alpha, "target_modules": targets, "bias": "none"}))
    return path


def _write(sd: dict, path, metadata=None):
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path), metadata=metadata)
    return path


# -- the comparison -----------------------------------------------------------------------------

def _run(pipe_or_bp, **blend):
    return pipe_or_bp(**KW, generator=torch.Generator().manual_seed(0), **blend).images


def _blend_vs_diffusers(make_pipe, path, tmp_path, reference=None):
    """((blended one-hot latents: merged, unmerged), diffusers-loaded latents, base latents, BlendPipeline)."""
    bp = BlendPipeline(make_pipe(tmp_path), {"x": path})
    ref = make_pipe(tmp_path)
    base = _run(ref)
    if reference is None:
        ref.load_lora_weights(str(path), adapter_name="x")
    else:
        reference(ref)
    merged = _run(bp, weights={"x": 1.0})
    bp.blender.merge_cache = False
    unmerged = _run(bp, weights={"x": 1.0})
    bp.blender.merge_cache = True
    return (merged, unmerged), _run(ref), base, bp


def _scaling(bp, module="down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"):
    return bp.model.get_submodule(module).scaling["x"]


def _assert_same(got, want, base):
    assert (want - base).abs().max() > 1e-2  # the adapter changes the output: the comparison means something
    merged, unmerged = got
    torch.testing.assert_close(unmerged, want, atol=0, rtol=0)
    torch.testing.assert_close(merged, want, atol=ATOL, rtol=RTOL)


def test_diffusers_file_with_and_without_metadata(src, tmp_path):
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, src["sd"], tmp_path)
    _assert_same(got, want, base)
    assert _scaling(bp) == pytest.approx(8 / 4)  # lora_alpha / r from the metadata
    plain = _write(load_file(str(src["sd"])), tmp_path / "plain.safetensors")  # no lora_adapter_metadata
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, plain, tmp_path)
    _assert_same(got, want, base)
    assert _scaling(bp) == pytest.approx(1.0)  # diffusers' default without metadata: lora_alpha = r


def test_kohya_sd15_with_alpha_other_than_rank(src, tmp_path):
    sd = load_file(str(src["sd"]))
    kohya = _write(to_kohya(sd, alpha=2.0), tmp_path / "kohya.safetensors")
    assert all(k.startswith("lora_unet_") for k in load_file(str(kohya)))
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, kohya, tmp_path)
    _assert_same(got, want, base)
    for module in ("down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_out.0",
                   "mid_block.resnets.0.time_emb_proj"):
        assert _scaling(bp, module) == pytest.approx(2.0 / 4)  # kohya: alpha / rank
        layer = bp.model.get_submodule(module)
        torch.testing.assert_close(layer.lora_A["x"].weight, sd[f"unet.{module}.lora_A.weight"], atol=0, rtol=0)


def test_kohya_alphas_that_differ_per_module_are_diffusers_and_a_warning_says_where_it_is_not_alpha_over_rank(
        src, tmp_path):
    """diffusers 0.42 applies a module's own alpha to time_emb_proj but not to attention projections (its
    alpha_pattern keeps the processor.to_q_lora spelling): the blend is diffusers' model, and says so."""
    kohya = to_kohya(load_file(str(src["sd"])), alpha=2.0)
    q, t = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q", "mid_block.resnets.0.time_emb_proj"
    for module in (q, t):
        kohya[f"lora_unet_{module.replace('.', '_')}.alpha"] = torch.tensor(1.0)
    path = _write(kohya, tmp_path / "mixed.safetensors")
    want = (rf"adapter 'x': diffusers' loader scales 1 module\(s\) otherwise than their kohya alpha / rank, "
            rf"e\.g\. {re.escape(q)}: 0\.5 \(alpha 1 / rank 4 = 0\.25\)")
    with pytest.warns(UserWarning, match=want):
        got, want, base, bp = _blend_vs_diffusers(tiny_sd, path, tmp_path)
    _assert_same(got, want, base)
    assert _scaling(bp, t) == pytest.approx(1.0 / 4) and _scaling(bp, q) == pytest.approx(2.0 / 4)


def test_kohya_alpha_equal_to_the_source_alpha_gives_the_source_adapter(src, tmp_path):
    """A kohya file with alpha 8 on rank 4 is the source file (lora_alpha 8): an independent check of the scaling."""
    kohya = _write(to_kohya(load_file(str(src["sd"])), alpha=8.0), tmp_path / "kohya.safetensors")
    bp = BlendPipeline(tiny_sd(tmp_path), {"kohya": kohya, "source": src["sd"]})
    torch.testing.assert_close(_run(bp, weights={"kohya": 1.0}), _run(bp, weights={"source": 1.0}), atol=0, rtol=0)


def test_lycoris_locon_with_convolutions(src, tmp_path):
    """LyCORIS LoCon: kohya keys on the resnets' convolutions too (down (r, in, 3, 3), up (out, r, 1, 1))."""
    sd = load_file(str(src["conv"]))
    assert any(v.dim() == 4 for v in sd.values())
    path = _write(to_kohya(sd, alpha=3.0), tmp_path / "locon.safetensors")
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, path, tmp_path)
    _assert_same(got, want, base)
    assert _scaling(bp, "down_blocks.1.resnets.0.conv_shortcut") == pytest.approx(3.0 / 4)


def test_kohya_sdxl_with_sgm_block_names(src, tmp_path):
    path = _write(to_kohya(load_file(str(src["xl"])), alpha=2.0, rename=sgm_name), tmp_path / "xl.safetensors")
    keys = list(load_file(str(path)))
    assert any("input_blocks_3_1_transformer_blocks" in k for k in keys)
    assert any("output_blocks_1_1" in k for k in keys) and any("middle_block_2_emb_layers_1" in k for k in keys)
    got, want, base, bp = _blend_vs_diffusers(tiny_sdxl, path, tmp_path)
    _assert_same(got, want, base)
    loaded = {n for n, m in bp.model.named_modules() if "x" in getattr(m, "lora_A", {})}
    assert loaded == {m for m, _, _ in _modules(load_file(str(src["xl"])))}  # every sgm name found its module


def test_old_attention_processor_layout(src, tmp_path):
    path = _write(to_attn_processor(load_file(str(src["sd"]))), tmp_path / "attn.safetensors")
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, path, tmp_path)
    _assert_same(got, want, base)


def test_peft_folder_equals_peft_loading_it(src, tmp_path):
    from peft import PeftModel

    folder = to_peft_dir(load_file(str(src["sd"])), tmp_path / "peft")
    got, want, base, bp = _blend_vs_diffusers(tiny_sd, folder, tmp_path,
                                              reference=lambda pipe: PeftModel.from_pretrained(pipe.unet, folder))
    _assert_same(got, want, base)
    assert _scaling(bp) == pytest.approx(8 / 4)


def test_zoo_pipeline_and_bare_unet_read_kohya(src, tmp_path):
    """The embedded DigitsPipeline converts with its SD loader mixin; a bare UNet falls back to it."""
    model = pytest.importorskip("diffblend.zoo.model")

    def zoo(_):
        pipe = model.build_pipeline(seed=0, channels=(16, 32, 32))
        pipe.set_progress_bar_config(disable=True)
        return pipe

    zoo_file = save_random_lora(zoo(None), tmp_path / "zoo", seed=5)
    kohya = _write(to_kohya(load_file(str(zoo_file)), alpha=2.0), tmp_path / "kohya.safetensors")
    bp = BlendPipeline(zoo(None), {"x": kohya})
    ref = zoo(None)
    ref.load_lora_weights(str(kohya), adapter_name="x")
    kw = dict(prompt=["7", "3"], num_inference_steps=2, guidance_scale=2.0, eta=1.0, output_type="latent")
    want = ref(generator=torch.Generator().manual_seed(0), **kw).images
    got = bp(weights={"x": 1.0}, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, atol=2e-4, rtol=1e-4)  # merged weights, |x| ~ 70 here
    bp.blender.merge_cache = False
    got = bp(weights={"x": 1.0}, generator=torch.Generator().manual_seed(0), **kw).images
    torch.testing.assert_close(got, want, atol=0, rtol=0)  # the same peft layers as diffusers'
    unet = zoo(None).unet
    load_adapter(unet, "x", kohya)  # no pipeline class: StableDiffusionLoraLoaderMixin
    layer = unet.get_submodule("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert layer.scaling["x"] == pytest.approx(2.0 / 4)
    torch.testing.assert_close(layer.lora_B["x"].weight, bp.model.get_submodule(
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q").lora_B["x"].weight, atol=0, rtol=0)


def test_kohya_text_encoder_keys_refused_or_ignored(src, tmp_path):
    sd = load_file(str(src["te"]))
    te = to_kohya(sd, alpha=2.0, component="text_encoder", prefix="lora_te_",  # kohya names CLIP's text_model.*
                  rename=lambda m: m if m.startswith("text_model.") else "text_model." + m)
    kohya = {**to_kohya(sd, alpha=2.0), **te}
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj") for k in kohya)
    path = _write(kohya, tmp_path / "te.safetensors")
    unet_only = _write(to_kohya(sd, alpha=2.0), tmp_path / "unet_only.safetensors")
    bp = BlendPipeline(tiny_sd(tmp_path), {"unet_only": unet_only})
    with pytest.raises(AdapterError, match=r"adapter 'te' also holds LoRA weights for \['text_encoder'\] \(kohya "
                                           r"keys \['lora_te_'\]\).*text_encoder='ignore'"):
        bp.load_adapter("te", path)
    bp.load_adapter("te", path, text_encoder="ignore")
    assert "te" not in (getattr(bp.pipe.text_encoder, "peft_config", None) or {})
    torch.testing.assert_close(_run(bp, weights={"te": 1.0}), _run(bp, weights={"unet_only": 1.0}), atol=0, rtol=0)


# -- formats diffusers refuses too ----------------------------------------------------------------

def _lokr(sd):
    out = {}
    for module, ab, value in _modules(sd):
        if ab == "A":
            base = "lora_unet_" + module.replace(".", "_")
            out[f"{base}.lokr_w1"] = torch.randn(2, 2)
            out[f"{base}.lokr_w2"] = torch.randn(value.shape[1] // 2, value.shape[1] // 2)
            out[f"{base}.alpha"] = torch.tensor(1.0)
    return out


def _loha(sd):
    out = {}
    for module, ab, value in _modules(sd):
        if ab == "A":
            base = "lora_unet_" + module.replace(".", "_")
            for w in ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"):
                out[f"{base}.{w}"] = torch.randn(4, 4)
    return out


@pytest.mark.parametrize("kind, make, want", [
    ("lokr", _lokr, r"looks like a LoKr \(LyCORIS Kronecker-product\) file \(e\.g\. key 'lora_unet_.*\.lokr_w1'\)"),
    ("loha", _loha, r"looks like a LoHa \(LyCORIS Hadamard-product\) file"),
])
def test_lycoris_types_that_are_not_lora_refused_as_diffusers_does(src, tmp_path, kind, make, want):
    path = _write(make(load_file(str(src["sd"]))), tmp_path / f"{kind}.safetensors")
    pipe = tiny_sd(tmp_path)
    with pytest.raises(ValueError):  # diffusers' own loader refuses it too
        pipe.load_lora_weights(str(path), adapter_name="x")
    bp = BlendPipeline(tiny_sd(tmp_path))
    with pytest.raises(AdapterError, match=rf"adapter '{kind}': .*{kind}\.safetensors {want}.*LoRA adapters only"):
        bp.load_adapter(kind, path)
    assert bp.adapter_names == []


def test_kohya_file_with_a_missing_half_refused_with_the_format(src, tmp_path):
    kohya = to_kohya(load_file(str(src["sd"])), alpha=2.0)
    kohya.pop(next(k for k in kohya if k.endswith("lora_up.weight")))
    path = _write(kohya, tmp_path / "half.safetensors")
    bp = BlendPipeline(tiny_sd(tmp_path))
    want = (r"adapter 'half': diffusers' StableDiffusionPipeline.lora_state_dict could not convert "
            r".*half\.safetensors \(read as a kohya / sd-scripts LoRA file\): KeyError: key 'lora_unet_.*lora_up\.weight' "
            r"is missing")
    with pytest.raises(AdapterError, match=want):
        bp.load_adapter("half", path)


# -- bad files ------------------------------------------------------------------------------------

def _bad_files(src, d):
    data = src["sd"].read_bytes()
    (d / "truncated.safetensors").write_bytes(data[: len(data) // 2])
    (d / "random.safetensors").write_bytes(torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0),
                                                         dtype=torch.uint8).numpy().tobytes())
    (d / "empty.safetensors").write_bytes(b"")
    torch.save(load_file(str(src["sd"])), d / "pickled.safetensors")
    (d / "broken.bin").write_bytes(data[:100])
    return d


@pytest.mark.parametrize("file, want", [
    # the part in brackets is safetensors' own text (it differs between its versions)
    ("truncated", r"is not a valid safetensors file \(Error while deserializing header: .*\): truncated"),
    ("random", r"is not a valid safetensors file \(Error while deserializing header: .*\): truncated"),
    ("empty", r"is empty \(0 bytes\)"),
    ("pickled", r"is a PyTorch pickle saved under a \.safetensors name.*pass allow_pickle=True \(CLI: "
                r"--allow-pickle\) if you trust it"),
])
def test_bad_files_give_a_named_adapter_error(src, tmp_path, file, want):
    d = _bad_files(src, tmp_path)
    bp = BlendPipeline(tiny_sd(tmp_path))
    with pytest.raises(AdapterError, match=rf"^adapter 'bad': .*{file}\.safetensors {want}"):
        bp.load_adapter("bad", d / f"{file}.safetensors")
    assert bp.adapter_names == []


def test_pickles_allowed_only_when_asked_and_broken_ones_named(src, tmp_path):
    d = _bad_files(src, tmp_path)
    bp = BlendPipeline(tiny_sd(tmp_path))
    bp.load_adapter("pickled", d / "pickled.safetensors", allow_pickle=True)
    assert bp.adapter_names == ["pickled"]
    with pytest.raises(AdapterError, match=r"adapter 'p': .*lora\.bin is a pickle file.*allow_pickle=True \(CLI: "
                                           r"--allow-pickle\)"):
        torch.save({}, tmp_path / "lora.bin")
        bp.load_adapter("p", tmp_path / "lora.bin")
    with pytest.raises(AdapterError, match=r"adapter 'b': .*broken\.bin could not be read as a PyTorch weights file "
                                           r"\(UnpicklingError\): truncated, corrupt"):
        bp.load_adapter("b", d / "broken.bin", allow_pickle=True)


@pytest.mark.parametrize("value, counts", [(float("nan"), "1 NaN and 0 inf"), (float("inf"), "0 NaN and 1 inf")])
def test_nan_or_inf_values_refused_at_load(src, tmp_path, value, counts):
    sd = to_kohya(load_file(str(src["sd"])), alpha=2.0)
    first = sorted(k for k in sd if k.endswith("lora_up.weight"))[3]
    sd[first] = sd[first].clone()
    sd[first][0, 0] = value
    path = _write(sd, tmp_path / "diverged.safetensors")
    bp = BlendPipeline(tiny_sd(tmp_path))
    with pytest.raises(AdapterError, match=rf"adapter 'nan': tensor '{re.escape(first)}' in .*diverged\.safetensors "
                                           rf"holds {counts} value\(s\)"):
        bp.load_adapter("nan", path)
    assert bp.adapter_names == []
