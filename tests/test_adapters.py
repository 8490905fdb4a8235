"""Loading adapters by name, every refusal, per-sample routing, and the core-loop denoiser.

Tolerance ATOL = 2e-4 as in test_pipeline.py (float32 sums in another order, through <= 3 steps);
single forwards are compared at 1e-5 (one float32 forward of |pred| ~ 1-3, ~1e-6 seen).
"""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffblend.adapters import AdapterError, Blender, _compat, blend_denoiser
from diffblend.core.blend import BASE, Blend
from diffblend.core.sampling import NoiseSchedule, randn, sample
from diffblend.pipeline import BlendPipeline
from helpers_pipelines import save_random_lora, tiny_sd, tiny_sdxl

ATOL = 2e-4
NAMES = ("aes", "txt", "cmp")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("loras")
    pipe = tiny_sd(d)
    out = {n: save_random_lora(pipe, d / n, seed=i + 1) for i, n in enumerate(NAMES)}
    out["dora"] = save_random_lora(pipe, d / "dora", seed=9, use_dora=True)
    out["with_te"] = save_random_lora(pipe, d / "with_te", seed=10, text_encoder=True)
    out["xl"] = save_random_lora(tiny_sdxl(d), d / "xl", seed=11)
    out["other_layers"] = save_random_lora(pipe, d / "other_layers", seed=13, targets=["proj_in", "proj_out", "conv1"])
    out["biased"] = save_random_lora(pipe, d / "biased", seed=12, targets=["to_out.0", "time_emb_proj"], lora_bias=True)
    out["dir"] = d
    return out


@pytest.fixture()
def bp(files, tmp_path):
    return BlendPipeline(tiny_sd(tmp_path), {n: files[n] for n in NAMES}, mode="sequential")


def _use(unet, name):
    if name == BASE:
        unet.disable_lora()
    else:
        unet.enable_lora()
        unet.set_adapters([name])


def _inputs(batch=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn((1, 4, 8, 8), generator=g).expand(batch, -1, -1, -1).contiguous()  # identical rows
    emb = torch.randn((1, 16, 32), generator=g).expand(batch, -1, -1).contiguous()
    return x, emb


# -- loading ------------------------------------------------------------------------------------

def test_loaded_weights_and_alpha_are_the_files(bp, files):
    sd = load_file(str(files["txt"]))
    layer = bp.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    prefix = "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q"
    torch.testing.assert_close(layer.lora_B["txt"].weight, sd[f"{prefix}.lora_B.weight"], atol=0, rtol=0)
    torch.testing.assert_close(layer.lora_A["txt"].weight, sd[f"{prefix}.lora_A.weight"], atol=0, rtol=0)
    assert layer.scaling["txt"] == pytest.approx(8.0 / 4)  # lora_alpha / r from the file's metadata
    assert bp.adapter_names == list(NAMES)


def test_adapter_names_are_in_load_order_so_a_list_of_weights_goes_to_the_right_adapters(tmp_path):
    """Adapter 'a' targets to_k, 'b' to_q: the first adapted layer (attn1.to_q) is b's, yet the names,
    and the order of a list of weights, are the load order [a, b] (also after a delete and reload)."""
    pipe = tiny_sd(tmp_path)
    bp = BlendPipeline(pipe, {"a": save_random_lora(pipe, tmp_path / "a", seed=1, targets=["to_k"]),
                              "b": save_random_lora(pipe, tmp_path / "b", seed=2, targets=["to_q"])})
    first = next(n for n, m in bp.model.named_modules() if hasattr(m, "lora_A"))
    assert first.endswith("attn1.to_q") and list(bp.model.get_submodule(first).lora_A) == ["b"]
    assert bp.adapter_names == ["a", "b"]
    kw = dict(prompt="a", num_inference_steps=2, height=16, width=16, output_type="latent")

    def run(w):
        return bp(weights=w, generator=torch.Generator().manual_seed(0), **kw).images

    listed = run([0.3, 0.7])
    torch.testing.assert_close(listed, run({"a": 0.3, "b": 0.7}), atol=0, rtol=0)
    assert (listed - run({"a": 0.7, "b": 0.3})).abs().max() > 1e-3  # the order matters here
    pipe.delete_adapters("a")
    pipe.load_lora_weights(str(tmp_path / "a" / "lora.safetensors"), adapter_name="a")
    assert bp.adapter_names == ["b", "a"]  # reloaded last
    torch.testing.assert_close(run([0.7, 0.3]), listed, atol=0, rtol=0)


def test_peft_directory_equals_the_diffusers_file(bp, files, tmp_path):
    """A peft adapter dir (adapter_config.json + adapter_model.safetensors) gives the same model."""
    peft_dir = tmp_path / "peft_txt"
    peft_dir.mkdir()
    sd = {"base_model.model." + k.removeprefix("unet."): v for k, v in load_file(str(files["txt"])).items()}
    save_file(sd, str(peft_dir / "adapter_model.safetensors"))
    (peft_dir / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 8, "target_modules": ["to_q", "to_k", "to_v", "to_out.0",
                                                                          "time_emb_proj"]}))
    bp.load_adapter("txt_peft", peft_dir)
    x, emb = _inputs(2)
    den_file = bp.denoiser(Blend.create({"txt": 1.0}, bp.adapter_names))
    den_peft = bp.denoiser(Blend.create({"txt_peft": 1.0}, bp.adapter_names))
    t = torch.full((2,), 500)
    with torch.no_grad():
        torch.testing.assert_close(den_peft(x, t, emb), den_file(x, t, emb), atol=1e-5, rtol=0)


def test_pickle_refused_unless_allowed(bp, files, tmp_path):
    path = tmp_path / "lora.bin"
    torch.save(load_file(str(files["txt"])), path)
    with pytest.raises(AdapterError, match="'pkl'.*pickle.*allow_pickle=True"):
        bp.load_adapter("pkl", path)
    bp.load_adapter("pkl", path, allow_pickle=True)
    assert "pkl" in bp.adapter_names


def test_other_architecture_refused(bp, files):
    with pytest.raises(AdapterError, match="adapter 'xl' does not fit this unet"):
        bp.load_adapter("xl", files["xl"])
    assert "xl" not in bp.adapter_names


def _edited(files, tmp_path, edit):
    sd = load_file(str(files["txt"]))
    edit(sd)
    path = tmp_path / "edited.safetensors"
    save_file(sd, str(path))
    return path


def test_rank_layout_and_missing_keys_refused(bp, files, tmp_path):
    key = "unet.mid_block.attentions.0.transformer_blocks.0.attn1.to_v.lora_B.weight"

    def widen(sd):
        sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] + 2)

    with pytest.raises(AdapterError, match=r"adapter 'bad'.*to_v: rank layout differs, lora_A has rank 4, lora_B 6"):
        bp.load_adapter("bad", _edited(files, tmp_path, widen))
    with pytest.raises(AdapterError, match=r"adapter 'bad'.*to_v: missing lora_B"):
        bp.load_adapter("bad", _edited(files, tmp_path, lambda sd: sd.pop(key)))

    def rename(sd):
        for k in (key, key.replace("lora_B", "lora_A")):
            sd[k.replace("mid_block", "mid_block_9")] = sd.pop(k)

    with pytest.raises(AdapterError, match=r"adapter 'bad'.*no such module"):
        bp.load_adapter("bad", _edited(files, tmp_path, rename))
    assert "bad" not in bp.adapter_names

    def kernel_1x1(sd):  # a conv LoRA whose A has another kernel than the base conv's 3x3
        k = "unet.down_blocks.0.resnets.0.conv1.lora_A.weight"
        sd[k] = sd[k][:, :, :1, :1].contiguous()

    sd = load_file(str(files["other_layers"]))
    kernel_1x1(sd)
    save_file(sd, str(tmp_path / "k.safetensors"))
    with pytest.raises(AdapterError, match=r"adapter 'bad'.*conv1: LoRA shapes \(4, 16, 1, 1\).*kernel \(3, 3\)"):
        bp.load_adapter("bad", tmp_path / "k.safetensors")
    assert "bad" not in bp.adapter_names


def test_config_rank_that_differs_from_the_tensors_refused(bp, files, tmp_path):
    """Metadata r = 8 on rank-4 tensors: one line naming the adapter, not peft's size-mismatch dump."""
    from safetensors import safe_open

    with safe_open(str(files["txt"]), framework="pt") as fh:
        meta = fh.metadata()
    config = json.loads(meta["lora_adapter_metadata"])
    path = tmp_path / "r8.safetensors"
    save_file(load_file(str(files["txt"])), str(path),
              metadata={**meta, "lora_adapter_metadata": json.dumps({**config, "unet.r": 8})})
    with pytest.raises(AdapterError, match=r"adapter 'r8': rank layout differs .* rank 4 in the tensors, 8 in the "
                                           r"config.*more\)$"):
        bp.load_adapter("r8", path)
    assert "r8" not in bp.adapter_names and "r8" not in bp.pipe.unet.peft_config
    pattern = {**config, "unet.r": 8, "unet.rank_pattern": {"to_q": 4, "to_k": 4, "to_v": 4, "to_out.0": 4,
                                                            "time_emb_proj": 4}}
    save_file(load_file(str(files["txt"])), str(path), metadata={**meta, "lora_adapter_metadata": json.dumps(pattern)})
    bp.load_adapter("r8", path)  # every module's rank given by rank_pattern: loads
    assert "r8" in bp.adapter_names


def test_fused_checkpoint_and_fused_pipeline_refused(bp, files, tmp_path):
    full = {"unet." + k: v.contiguous() for k, v in tiny_sd(tmp_path).unet.state_dict().items()}
    path = tmp_path / "full.safetensors"
    save_file(full, str(path))
    with pytest.raises(AdapterError, match="adapter 'full' holds .* non-LoRA tensor.*fused"):
        bp.load_adapter("full", path)

    pipe = tiny_sd(tmp_path)
    pipe.load_lora_weights(str(files["aes"]), adapter_name="aes")
    pipe.fuse_lora(adapter_names=["aes"])
    with pytest.raises(AdapterError, match="fused"):
        BlendPipeline(pipe)
    # fused after the blend was set up: refused at call time
    bp.pipe.fuse_lora(adapter_names=["aes"])
    with pytest.raises(ValueError, match="fused"):
        bp("a", weights={"txt": 1.0}, num_inference_steps=1, height=16, width=16, output_type="latent")


def test_text_encoder_components_refused_or_ignored(bp, files):
    with pytest.raises(AdapterError, match=r"adapter 'te' also holds LoRA weights for \['text_encoder'\]"):
        bp.load_adapter("te", files["with_te"])
    bp.load_adapter("te", files["with_te"], text_encoder="ignore")
    assert "te" in bp.adapter_names
    assert "te" not in (getattr(bp.pipe.text_encoder, "peft_config", None) or {})  # only the unet part


def test_names_and_missing_files_refused(bp, files, tmp_path):
    with pytest.raises(AdapterError, match="'aes' is already loaded"):
        bp.load_adapter("aes", files["txt"])
    with pytest.raises(AdapterError, match="other than '__base__'"):
        bp.load_adapter(BASE, files["txt"])
    with pytest.raises(AdapterError, match="'nope'.*does not exist"):
        bp.load_adapter("nope", tmp_path / "nope.safetensors")
    (tmp_path / "x.txt").write_text("x")
    with pytest.raises(AdapterError, match="unsupported file type"):
        bp.load_adapter("txtfile", tmp_path / "x.txt")


def test_dora_refused_where_it_cannot_work(bp, files):
    bp.load_adapter("dora", files["dora"])
    kw = dict(prompt="a", num_inference_steps=1, height=16, width=16, output_type="latent")
    with pytest.raises(ValueError, match=r"\['dora'\] use DoRA.*Rewarded Soup"):
        bp(weights={"dora": 0.5, "aes": 0.5}, method="soup", **kw)
    with pytest.raises(ValueError, match=r"\['dora'\] use DoRA.*mode='sequential'"):
        bp(weights={"dora": 0.5, "aes": 0.5}, mode="batched", **kw)
    out = bp(weights={"dora": 0.5, "aes": 0.5}, mode="sequential", **kw).images  # sequential MPA works
    assert torch.isfinite(out).all()


def test_bad_weights_and_options_give_the_documented_errors(bp):
    kw = dict(prompt="a", num_inference_steps=1, height=16, width=16, output_type="latent")
    cases = [
        (dict(weights={"aes": 0.5, "txt": 0.4}), "must sum to 1"),
        (dict(weights={"aes": 1.5, "txt": -0.5}), r"must be >= 0.*\['txt'\]"),
        (dict(weights={"aes": 0.5, "zzz": 0.5}), r"unknown adapter\(s\) \['zzz'\]"),
        (dict(weights={"aes": 1.0}, kl_strength=-1), "kl_strength"),
        (dict(weights={"aes": 1.0}, kl_strength=1.5, method="ls"), "method 'ls' needs non-negative"),
        (dict(weights={"aes": 1.0}, method="fancy"), "method must be one of"),
        (dict(weights={"aes": 1.0}, mode="fast"), "mode must be one of"),
        (dict(weights={BASE: 1.0}), "must not name '__base__'"),
        (dict(weights=[0.5, 0.5]), "weights has 2 entries but there are 3 adapters"),
    ]
    for blend_kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            bp(**blend_kw, **kw)
    torch.testing.assert_close(  # normalize=True rescales instead
        bp(weights={"aes": 1.0, "txt": 1.0}, normalize=True, generator=torch.Generator().manual_seed(0), **kw).images,
        bp(weights={"aes": 0.5, "txt": 0.5}, generator=torch.Generator().manual_seed(0), **kw).images, atol=0, rtol=0)
    with pytest.raises(ValueError, match="mode must be one of"):
        BlendPipeline(bp.pipe, mode="fast")


# -- routing ------------------------------------------------------------------------------------

def test_per_sample_routing_really_routes(bp):
    """Identical input rows routed to different models come out as those models' outputs."""
    unet, layers = bp.pipe.unet, bp.blender.layers
    x, emb = _inputs(4)
    names = ["aes", BASE, "cmp", "txt"]
    with torch.no_grad():
        with _compat.route(layers, names):
            routed = unet(x, 500, encoder_hidden_states=emb).sample
        singles = []
        for n in names:
            _use(unet, n)
            singles.append(unet(x[:1], 500, encoder_hidden_states=emb[:1]).sample[0])
        unet.enable_lora()
    # batch 4 vs batch 1 runs other GEMM kernels (other summation order): float32 round-off, ~1e-5 here
    for i in range(4):
        torch.testing.assert_close(routed[i], singles[i], atol=5e-5, rtol=1e-5)
    for i in range(4):  # every row got its own model: no two rows agree
        for j in range(i + 1, 4):
            assert (routed[i] - routed[j]).abs().max() > 1e-3, (names[i], names[j])
    assert not any(len(h) for h in (layer._forward_pre_hooks for layer in layers))  # hooks removed


def test_routing_refuses_a_wrong_batch_size(bp):
    x, emb = _inputs(3)
    with pytest.raises(ValueError, match="Length of `adapter_names`"), torch.no_grad():
        with _compat.route(bp.blender.layers, ["aes", "txt"]):
            bp.pipe.unet(x, 500, encoder_hidden_states=emb)


# -- the core-loop denoiser --------------------------------------------------------------------

def test_blend_denoiser_in_core_sample_matches_pipeline_maths(bp):
    """core.sample + blend_denoiser with CFG == explicit per-model guided sum; CFG inside == outside."""
    B = 2
    sched = bp.pipe.scheduler
    schedule = NoiseSchedule(sched.alphas_cumprod.double(), float(sched.final_alpha_cumprod))
    ts = schedule.timesteps(3, steps_offset=1)
    pos, neg = bp.pipe.encode_prompt(["a cat", "a dog"], "cpu", 1, True)
    blend = Blend.create({"aes": 0.3, "txt": 0.7}, bp.adapter_names, kl_strength=1.2)
    x0 = randn((B, 4, 8, 8), [torch.Generator().manual_seed(i) for i in range(B)])

    def run(den, guidance=1.0, uncond=None):
        gens = [torch.Generator().manual_seed(10 + i) for i in range(B)]
        with torch.no_grad():
            return sample(den, x0, schedule, ts, pos, eta=1.0, generators=gens, guidance_scale=guidance,
                          uncond=uncond).sample

    inside = run(bp.denoiser(blend, guidance_scale=3.0, uncond=neg, mode="batched"))
    outside = run(blend_denoiser(bp.pipe.unet, blend, groups=2, mode="sequential"), 3.0, neg)
    torch.testing.assert_close(inside, outside, atol=ATOL, rtol=0)

    unet = bp.pipe.unet

    def reference(x, t, cond):
        total = 0
        for n, c in blend.active():
            _use(unet, n)
            u, co = unet(torch.cat([x, x]), torch.cat([t, t]), encoder_hidden_states=torch.cat([neg, cond])
                         ).sample.chunk(2)
            total = total + c * (u + 3.0 * (co - u))
        unet.enable_lora()
        return total

    torch.testing.assert_close(inside, run(reference), atol=ATOL, rtol=0)


def test_zoo_pipeline_works_unchanged(tmp_path):
    """The embedded default model (a DiffusionPipeline subclass) blends through the same machinery."""
    model = pytest.importorskip("diffblend.zoo.model")
    pipe = model.build_pipeline(seed=0, channels=(16, 32, 32))
    pipe.set_progress_bar_config(disable=True)
    files = {n: save_random_lora(pipe, tmp_path / n, seed=i + 1) for i, n in enumerate(("a", "b"))}
    bp = BlendPipeline(pipe, files, mode="sequential")

    def run(**kw):
        return bp(prompt=["7", "3"], num_inference_steps=2, guidance_scale=2.0, eta=1.0, output_type="latent",
                  generator=[torch.Generator().manual_seed(i) for i in range(2)], **kw).images

    # an untrained model's outputs reach |x| ~ 70 here: float32 round-off scales with the tensor's magnitude, not
    # each element's, and two steps through a UNet amplify it (3.3e-4 with another GEMM kernel, 4.4e-3 with
    # diffusers 0.35): compare relative to the largest value (1e-4 of it; a wrong blend differs by > 1e-2)
    def close(x, ref):
        assert (x - ref).abs().max() <= 1e-4 * ref.abs().max(), ((x - ref).abs().max(), ref.abs().max())

    seq = run(weights={"a": 0.4, "b": 0.6})
    close(run(weights={"a": 0.4, "b": 0.6}, mode="batched"), seq)
    _use(pipe.unet, "b")
    plain = bp.pipe(prompt=["7", "3"], num_inference_steps=2, guidance_scale=2.0, eta=1.0, output_type="latent",
                    generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    close(run(weights={"b": 1.0}), plain)
    assert (seq - plain).abs().max() > 100 * 1e-4 * seq.abs().max()  # the tolerance is far below a blend change


def test_auto_mode_choice():
    from diffblend.adapters import resolve_mode

    assert resolve_mode("auto") == "batched"
    assert resolve_mode("auto", uses_dora=True) == "sequential"
    assert resolve_mode("batched") == "batched" and resolve_mode("sequential") == "sequential"
    with pytest.raises(ValueError, match="mode must be one of"):
        resolve_mode("fast")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_batched_equals_sequential_and_ls_reproducible(files, tmp_path):
    """On CUDA: batched gives the same numbers as sequential, LS draws the same per seed.
    TF32 is turned off (cuDNN convolutions use it by default: ~1e-3 relative per op, amplified by CFG
    to ~1e-2 between the K*B-row and B-row kernels); in full float32 the tolerance is 1e-3."""
    tf32 = torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32
    torch.backends.cudnn.allow_tf32 = torch.backends.cuda.matmul.allow_tf32 = False
    try:
        _cuda_modes_agree(files, tmp_path)
    finally:
        torch.backends.cudnn.allow_tf32, torch.backends.cuda.matmul.allow_tf32 = tf32


def _cuda_modes_agree(files, tmp_path):
    bp = BlendPipeline(tiny_sd(tmp_path).to("cuda"), {n: files[n] for n in NAMES})
    kw = dict(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=4.0, eta=1.0, height=16, width=16,
              output_type="latent", latents=torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(0)))

    def run(**blend):
        return bp(**kw, generator=torch.Generator("cuda").manual_seed(1), **blend).images

    w = {"aes": 0.2, "txt": 0.3, "cmp": 0.5}
    torch.testing.assert_close(run(weights=w, kl_strength=0.7), run(weights=w, kl_strength=0.7, mode="sequential"),
                               atol=1e-3, rtol=0)
    torch.testing.assert_close(run(weights=w, method="ls"), run(weights=w, method="ls"), atol=0, rtol=0)
    torch.testing.assert_close(run(weights=w, method="ls"), run(weights=w, method="ls", mode="sequential"),
                               atol=1e-3, rtol=0)


def test_merge_cache_follows_weight_updates_and_keeps_gradients(bp):
    """Cached merged weights are rebuilt after an in-place update (an optimizer step), and with
    autograd on the unmerged path runs, so gradients reach the LoRA factors."""
    x, emb = _inputs(2)
    t = torch.full((2,), 500)
    blend = Blend.create({"txt": 1.0}, bp.adapter_names)
    den = bp.denoiser(blend, mode="sequential")
    with torch.no_grad():
        before = den(x, t, emb)
        assert any(k[0] == "one" for k in bp.blender._cache)  # the merged path ran
        lora_b = bp.pipe.unet.mid_block.attentions[0].transformer_blocks[0].attn2.to_q.lora_B["txt"].weight
        lora_b.add_(0.5)  # in place, as an optimizer step
        after = den(x, t, emb)
    assert (after - before).abs().max() > 1e-3
    _use(bp.pipe.unet, "txt")
    with torch.no_grad():
        torch.testing.assert_close(after, bp.pipe.unet(x, t, encoder_hidden_states=emb).sample, atol=1e-5, rtol=0)
    grads = []
    for d in (den, blend_denoiser(bp.pipe.unet, blend, blender=Blender(bp.pipe.unet, merge_cache=False))):
        xg = x.clone().requires_grad_(True)  # reward guidance: gradients w.r.t. x_t, adapters frozen
        d(xg, t, emb).square().mean().backward()
        grads.append(xg.grad)
    assert grads[0].abs().max() > 0
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-4)  # merged == unmerged path
    lora_b.requires_grad_(True)  # training: the unmerged path, so the factor gets its gradient
    den(x, t, emb).square().mean().backward()
    assert lora_b.grad is not None and lora_b.grad.abs().max() > 0


def test_merge_cache_follows_adapter_scaling(bp):
    """diffusers' set_adapters(names, weights) rescales the layers' scaling: the cached merged weights
    must follow it (in both modes), as the unmerged path does."""
    x, emb = _inputs(2)
    t = torch.full((2,), 500)
    blends = [Blend.create({"txt": 1.0}, bp.adapter_names), Blend.create({"aes": 0.5, "txt": 0.5}, bp.adapter_names)]
    unmerged_blender = Blender(bp.pipe.unet, merge_cache=False)

    def both(blend):
        merged = [bp.denoiser(blend, mode=m)(x, t, emb) for m in ("sequential", "batched")]
        return merged, blend_denoiser(bp.pipe.unet, blend, mode="sequential", blender=unmerged_blender)(x, t, emb)

    with torch.no_grad():
        before = [both(b) for b in blends]  # fills the cache
        bp.pipe.unet.set_adapters(list(NAMES), [1.0, 0.5, 1.0])  # "txt" at half strength
        for (merged, ref), (_, old_ref) in zip([both(b) for b in blends], before):
            assert (ref - old_ref).abs().max() > 1e-3  # the rescale changed the model
            for got in merged:
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    bp.pipe.unet.set_adapters(list(NAMES), [1.0, 1.0, 1.0])


def test_lora_bias_adapter_gives_its_own_model(bp, files):
    """An adapter with a bias on lora_B (lora_bias=True) is W x + b + s (B A x + b_B): merged weights
    W + dW would drop the bias, so it runs unmerged, in every mode."""
    bp.load_adapter("biased", files["biased"])
    unet = bp.pipe.unet
    x, emb = _inputs(2)
    t = torch.full((2,), 500)
    with torch.no_grad():
        _use(unet, "biased")
        plain = unet(x, t, encoder_hidden_states=emb).sample
        unet.enable_lora()
        mix = Blend.create({"biased": 0.5, "aes": 0.5}, bp.adapter_names)
        ref = blend_denoiser(unet, mix, mode="sequential", blender=Blender(unet, merge_cache=False))(x, t, emb)
        for mode in ("sequential", "batched"):
            torch.testing.assert_close(bp.denoiser(Blend.create({"biased": 1.0}, bp.adapter_names), mode=mode)(
                x, t, emb), plain, atol=1e-5, rtol=0)
            torch.testing.assert_close(bp.denoiser(mix, mode=mode)(x, t, emb), ref, atol=1e-5, rtol=0)


def test_lora_scale_in_cross_attention_kwargs_scales_every_adapter_in_every_mode(bp):
    """cross_attention_kwargs={"scale": s} (diffusers' LoRA scale) gives sum_k c_k model_k at scale s,
    model_k run alone through diffusers, whichever path runs it (routed, merged, sequential)."""
    unet = bp.pipe.unet
    x, emb = _inputs(2)
    t = torch.full((2,), 500)
    kw = {"cross_attention_kwargs": {"scale": 0.3}}
    blend = Blend.create({"aes": 0.5, "txt": 0.5}, bp.adapter_names, kl_strength=0.8)
    with torch.no_grad():
        ref = 0
        for n, c in blend.active():
            _use(unet, n)
            ref = ref + c * unet(x, t, encoder_hidden_states=emb, **kw).sample
        unet.enable_lora()
        assert (ref - bp.denoiser(blend)(x, t, emb)).abs().max() > 1e-3  # the scale matters
        for merge_cache in (True, False):
            blender = Blender(unet, merge_cache=merge_cache)
            for mode in ("batched", "sequential"):
                got = blend_denoiser(unet, blend, mode=mode, blender=blender)(x, t, {"encoder_hidden_states": emb, **kw})
                torch.testing.assert_close(got, ref, atol=1e-5, rtol=0)
    assert kw == {"cross_attention_kwargs": {"scale": 0.3}}  # the caller's dict is left as it was
    assert unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.scaling["aes"] == 2.0  # restored


def test_block_routing_with_merged_weights(bp):
    """Row blocks with merged weights (the fast batched path): each block is its model's output."""
    unet, blender = bp.pipe.unet, bp.blender
    x, emb = _inputs(4)
    names = ["aes", BASE, "cmp", "txt"]
    weights = [[None] * len(blender.layers) if n == BASE else blender._weights(("one", n), {n: 1.0}) for n in names]
    with torch.no_grad():
        with _compat.blocks(blender.layers, [(0, 1), (1, 2), (2, 3), (3, 4)], weights):
            routed = unet(x, 500, encoder_hidden_states=emb).sample
        assert not any("forward" in layer.get_base_layer().__dict__ for layer in blender.layers)  # unpatched
        hooked = blender.layers[0].get_base_layer()
        own = hooked.forward  # an instance forward already there (e.g. a hook's) is put back, not deleted
        hooked.forward = own
        with _compat.blocks(blender.layers, [(0, 1), (1, 2), (2, 3), (3, 4)], weights):
            assert hooked.forward is not own
        assert hooked.__dict__["forward"] is own
        del hooked.forward
        for i, n in enumerate(names):
            _use(unet, n)
            torch.testing.assert_close(routed[i], unet(x[:1], 500, encoder_hidden_states=emb[:1]).sample[0],
                                       atol=1e-5, rtol=0)
        unet.enable_lora()
    assert all((routed[i] - routed[j]).abs().max() > 1e-3 for i in range(4) for j in range(i + 1, 4))


def test_adapters_loaded_through_diffusers_are_picked_up(bp, files):
    bp.pipe.load_lora_weights(str(files["aes"]), adapter_name="late")
    kw = dict(prompt="a", num_inference_steps=1, height=16, width=16, output_type="latent",
              generator=torch.Generator().manual_seed(0))
    out = bp(weights={"late": 1.0}, **kw).images  # the same file as "aes"
    torch.testing.assert_close(out, bp(weights={"aes": 1.0}, **{**kw, "generator": torch.Generator().manual_seed(0)})
                               .images, atol=1e-5, rtol=0)
    assert "late" in bp.adapter_names


def test_adapter_replaced_under_the_same_name_is_picked_up(bp, files):
    """delete_adapters + load_lora_weights under an old name (other target layers): the blend runs the
    new adapter on its layers, in both modes, as a Blender built afresh does."""
    x, emb = _inputs(2)
    t = torch.full((2,), 500)
    blend = Blend.create({"aes": 0.5, "txt": 0.5}, bp.adapter_names)
    with torch.no_grad():
        old = bp.denoiser(blend)(x, t, emb)
        bp.pipe.delete_adapters("aes")
        bp.pipe.load_lora_weights(str(files["other_layers"]), adapter_name="aes")
        ref = blend_denoiser(bp.pipe.unet, blend, mode="sequential", blender=Blender(bp.pipe.unet, merge_cache=False))
        ref = ref(x, t, emb)
        assert (ref - old).abs().max() > 1e-3
        for mode in ("batched", "sequential"):
            torch.testing.assert_close(bp.denoiser(blend, mode=mode)(x, t, emb), ref, atol=1e-5, rtol=0)
        kw = dict(prompt="a", num_inference_steps=1, height=16, width=16, output_type="latent")
        got = bp(weights={"aes": 0.5, "txt": 0.5}, generator=torch.Generator().manual_seed(0), **kw).images
        fresh = BlendPipeline(bp.pipe)(weights={"aes": 0.5, "txt": 0.5}, generator=torch.Generator().manual_seed(0),
                                       **kw).images
    torch.testing.assert_close(got, fresh, atol=1e-5, rtol=0)


def test_accelerate_offload_hooks_run_unmerged_and_stay(files, tmp_path):
    """Under accelerate's per-layer offload hooks (the weights live on the meta device and are loaded
    at each layer's forward) the blend equals the one without hooks, in both modes, and the hooks
    stay in place (merged weights cannot be built there: a meta-device error, hooks deleted)."""
    from accelerate import cpu_offload

    bp = BlendPipeline(tiny_sd(tmp_path), {n: files[n] for n in NAMES[:2]})
    kw = dict(prompt=["a", "b"], num_inference_steps=2, height=16, width=16, output_type="latent",
              guidance_scale=3.0, eta=1.0)

    def run(**blend):
        return bp(generator=torch.Generator().manual_seed(0), **kw, **blend).images

    cases = [dict(weights={"aes": 0.5, "txt": 0.5}, mode="batched"), dict(weights={"aes": 0.5, "txt": 0.5},
             mode="sequential"), dict(weights={"txt": 1.0}), dict(weights={"aes": 0.5, "txt": 0.5}, method="soup")]
    refs = [run(**c) for c in cases]
    cpu_offload(bp.model, execution_device=torch.device("cpu"))
    base = bp.model.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q.get_base_layer()
    assert base.weight.device.type == "meta" and "forward" in base.__dict__
    for case, ref in zip(cases, refs):
        torch.testing.assert_close(run(**case), ref, atol=ATOL, rtol=0)  # merged refs vs unmerged: ~1e-5
    assert "forward" in base.__dict__  # the hook's forward is still there
