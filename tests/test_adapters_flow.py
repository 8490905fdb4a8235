"""Flow-matching transformers (SD3, Flux): velocity blending through the same Blender.

Tiny transformers built from configs; adapters written by the pipelines' own save_lora_weights. The
full SD3 / Flux pipelines need three text encoders (one a T5), too heavy here: the pipeline path is
exercised with a stand-in that calls the transformer exactly as StableDiffusion3Pipeline does
(keyword arguments, ``[uncond; cond]`` rows, ``return_dict=False``).
Tolerance: single float32 forwards, sums in another order: 1e-5 absolute on |v| ~ 1.
"""

from __future__ import annotations

import types

import pytest
import torch

from diffblend.adapters import blend_denoiser
from diffblend.core.blend import BASE, Blend
from diffblend.pipeline import BlendPipeline

ATOL = 1e-5


def _seeded(seed, build):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _save_lora(model, pipeline_cls, path, seed, targets=("to_q", "to_k", "to_v")):
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    cfg = LoraConfig(r=4, lora_alpha=4, target_modules=list(targets), init_lora_weights=False)
    model.add_adapter(cfg, adapter_name="tmp")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".tmp." in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sd = get_peft_model_state_dict(model, adapter_name="tmp")
    pipeline_cls.save_lora_weights(path, transformer_lora_layers=sd, weight_name="lora.safetensors",
                                   transformer_lora_adapter_metadata=cfg.to_dict())
    model.delete_adapters("tmp")
    return path / "lora.safetensors"


def _use(model, name):
    if name == BASE:
        model.disable_lora()
    else:
        model.enable_lora()
        model.set_adapters([name])


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    from diffusers import SD3Transformer2DModel, StableDiffusion3Pipeline

    d = tmp_path_factory.mktemp("sd3")
    model = _seeded(0, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=32, pooled_projection_dim=16, out_channels=4,
        pos_embed_max_size=8).eval())
    files = {n: _save_lora(model, StableDiffusion3Pipeline, d / n, seed=i + 1) for i, n in enumerate("ab")}
    pipe = types.SimpleNamespace(transformer=model, do_classifier_free_guidance=True, scheduler=None)
    return BlendPipeline(pipe, files)


def _sd3_inputs(B=3):
    g = torch.Generator().manual_seed(0)
    x = torch.randn((B, 4, 8, 8), generator=g)
    cond = {"encoder_hidden_states": torch.randn((B, 5, 32), generator=g),
            "pooled_projections": torch.randn((B, 16), generator=g)}
    return x, cond, torch.full((B,), 700.0)


def test_sd3_mpa_equals_weighted_velocities_in_both_modes(sd3):
    model = sd3.model
    x, cond, t = _sd3_inputs()
    blend = Blend.create({"a": 0.25, "b": 0.75}, sd3.adapter_names, kl_strength=1.5)
    with torch.no_grad():
        ref = 0
        for n, c in blend.active():
            _use(model, n)
            ref = ref + c * model(x, timestep=t, return_dict=False, **cond)[0]
        model.enable_lora()
        for mode in ("batched", "sequential"):
            got = blend_denoiser(model, blend, mode=mode)(x, t, cond)
            torch.testing.assert_close(got, ref, atol=ATOL, rtol=0)
        assert (ref - blend_denoiser(model, None)(x, t, cond)).abs().max() > 1e-2


def test_sd3_pipeline_call_pattern_ls_routes_per_sample(sd3):
    """Called as SD3's pipeline calls it ([uncond; cond] rows, keywords): LS rows follow the draws."""
    model = sd3.model
    x, cond, t = _sd3_inputs(4)
    blend = sd3.make_blend({"a": 0.5, "b": 0.5}, kl_strength=0.9, method="ls", blend_seed=3)
    rows = lambda v: torch.cat([v, v])  # noqa: E731  (uncond = cond here: only routing matters)
    with torch.no_grad(), sd3.attached(blend, samples=4):
        out = sd3.pipe.transformer(hidden_states=rows(x), timestep=rows(t), encoder_hidden_states=rows(
            cond["encoder_hidden_states"]), pooled_projections=rows(cond["pooled_projections"]),
            joint_attention_kwargs=None, return_dict=False)[0]
    assert "forward" not in model.__dict__
    from diffblend.core.blend import ls_choices, step_key

    draw = ls_choices(blend.coefficients(), 3, step_key(t), 4)
    assert len(set(draw.tolist())) > 1  # this seed mixes models across the 4 samples
    with torch.no_grad():
        for j, k in enumerate(draw.tolist()):
            _use(model, blend.model_names[k])
            ref = model(x[j:j + 1], timestep=t[j:j + 1], return_dict=False,
                        **{n: v[j:j + 1] for n, v in cond.items()})[0][0]
            torch.testing.assert_close(out[j], ref, atol=ATOL, rtol=0)  # uncond half
            torch.testing.assert_close(out[j + 4], ref, atol=ATOL, rtol=0)  # cond half: the same model
        model.enable_lora()


def test_sd3_skip_layer_guidance_call_routes_by_sample(sd3):
    """Under CFG, SD3's skip-layer guidance calls the transformer again on the n cond rows alone: row j
    of that call is sample j (one group), as in the cond half of the step's 2n-row call."""
    model = sd3.model
    blend = sd3.make_blend({"a": 0.5, "b": 0.5}, kl_strength=0.9, method="ls", blend_seed=3)
    for n in (1, 4):  # 4: draws [a, a, a, b] (two groups of 2 would give sample 3 the draw of sample 1)
        x, cond, t = _sd3_inputs(n)

        def call(rows):
            return model(hidden_states=rows(x), timestep=rows(t), encoder_hidden_states=rows(
                cond["encoder_hidden_states"]), pooled_projections=rows(cond["pooled_projections"]),
                joint_attention_kwargs=None, return_dict=False)[0]

        with torch.no_grad(), sd3.attached(blend, samples=n):
            full = call(lambda v: torch.cat([v, v]))  # [uncond; cond], uncond = cond here
            skip = call(lambda v: v)
        torch.testing.assert_close(skip, full[n:], atol=ATOL, rtol=0)


def test_perturbed_attention_guidance_rows_are_three_groups(sd3):
    """PAG with CFG stacks [uncond; cond; perturbed]: row r is sample r % n, one LS draw per sample."""
    model = sd3.model
    blend = sd3.make_blend({"a": 0.5, "b": 0.5}, kl_strength=0.9, method="ls", blend_seed=3)
    n = 4
    x, cond, t = _sd3_inputs(n)
    three = lambda v: torch.cat([v, v, v])  # noqa: E731  (identical groups: only routing matters)
    sd3.pipe.do_perturbed_attention_guidance = True
    try:
        with torch.no_grad(), sd3.attached(blend, samples=n):
            out = model(hidden_states=three(x), timestep=three(t), encoder_hidden_states=three(
                cond["encoder_hidden_states"]), pooled_projections=three(cond["pooled_projections"]),
                return_dict=False)[0]
    finally:
        del sd3.pipe.do_perturbed_attention_guidance
    torch.testing.assert_close(out[n:2 * n], out[:n], atol=ATOL, rtol=0)
    torch.testing.assert_close(out[2 * n:], out[:n], atol=ATOL, rtol=0)
    with torch.no_grad():
        alone = blend_denoiser(model, blend, groups=1)(x, t, cond)  # one group: the draws of samples 0..n-1
    torch.testing.assert_close(out[:n], alone, atol=ATOL, rtol=0)


def test_ls_with_flow_matching_ode_warns(sd3):
    from diffusers import FlowMatchEulerDiscreteScheduler

    sd3.pipe.scheduler = FlowMatchEulerDiscreteScheduler()
    # the stand-in pipe is not callable (TypeError after the check): only the warning matters here
    with pytest.warns(UserWarning, match="stochastic sampler"), pytest.raises(TypeError):
        sd3(weights={"a": 1.0}, method="ls")


def test_flux_img_ids_are_not_treated_as_batch():
    """Flux passes img_ids / txt_ids without a batch dimension; batched MPA must not repeat them."""
    from diffusers import FluxPipeline, FluxTransformer2DModel
    import tempfile
    from pathlib import Path

    model = _seeded(0, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=4, num_layers=1, num_single_layers=1, attention_head_dim=16,
        num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, axes_dims_rope=(4, 4, 8)).eval())
    with tempfile.TemporaryDirectory() as d:
        bp = BlendPipeline(types.SimpleNamespace(transformer=model),
                           {n: _save_lora(model, FluxPipeline, Path(d) / n, seed=i + 1) for i, n in enumerate("ab")})
    g = torch.Generator().manual_seed(0)
    B, N, L = 2, 16, 2  # N = L * 8 would not fool the check; B == L does (ids' first size equals B)
    cond = {"encoder_hidden_states": torch.randn((B, L, 32), generator=g),
            "pooled_projections": torch.randn((B, 32), generator=g),
            "img_ids": torch.randn((N, 3), generator=g), "txt_ids": torch.zeros((L, 3))}
    x, t = torch.randn((B, N, 4), generator=g), torch.full((B,), 0.7)
    blend = bp.make_blend({"a": 0.4, "b": 0.6})
    with torch.no_grad():
        ref = 0
        for n, c in blend.active():
            _use(model, n)
            ref = ref + c * model(x, timestep=t, return_dict=False, **cond)[0]
        model.enable_lora()
        torch.testing.assert_close(bp.denoiser(blend, mode="batched")(x, t, cond), ref, atol=ATOL, rtol=0)
