"""Rewarded Soup (method="soup") against diffusers' own merged weights, computed independently.

Tolerance ATOL = 2e-4: the soup runs W x + sum_i s_i B_i A_i x while the fused model runs
(W + sum_i s_i B_i A_i) x, the same sum in another float32 order (~1e-6 per forward), through 3 DDIM
steps; any wrong weight in the soup moves the latents by > 1e-2 (checked below).
"""

from __future__ import annotations

import pytest
import torch

from diffblend.baselines.soup import factor_interpolation_delta, soup_delta
from diffblend.pipeline import BlendPipeline
from helpers_pipelines import save_random_lora, tiny_sd

ATOL = 2e-4
W = {"aes": 0.3, "txt": 0.7}


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    d = tmp_path_factory.mktemp("soup")
    pipe = tiny_sd(d)
    files = {n: save_random_lora(pipe, d / n, seed=i + 21) for i, n in enumerate(W)}
    return d, files, BlendPipeline(pipe, files, mode="sequential")


def _run(pipe_call, **kw):
    return pipe_call(prompt=["a cat", "a dog"], num_inference_steps=3, guidance_scale=4.0, eta=1.0, height=16,
                     width=16, output_type="latent", generator=torch.Generator().manual_seed(0),
                     latents=torch.randn((2, 4, 8, 8), generator=torch.Generator().manual_seed(1)), **kw).images


def _fused(d, files, lam):
    """A fresh copy of the base with diffusers' set_adapters(weights) + fuse_lora + unload_lora_weights."""
    pipe = tiny_sd(d)
    for n, f in files.items():
        pipe.load_lora_weights(str(f), adapter_name=n)
    pipe.set_adapters(list(W), adapter_weights=[lam * W[n] for n in W])
    pipe.fuse_lora(adapter_names=list(W))
    pipe.unload_lora_weights()
    return pipe


@pytest.mark.parametrize("lam", [0.5, 1.0, 1.5])
def test_soup_equals_diffusers_merged_weights(setup, lam):
    d, files, bp = setup
    fused = _fused(d, files, lam)
    got = _run(bp, weights=W, kl_strength=lam, method="soup")
    torch.testing.assert_close(got, _run(fused), atol=ATOL, rtol=0)
    torch.testing.assert_close(_run(bp, weights=W, kl_strength=lam, method="soup", mode="batched"), got,
                               atol=ATOL, rtol=0)
    assert (got - _run(bp, weights=W, kl_strength=lam, method="mpa")).abs().max() > 1e-2  # soup is not MPA
    assert (got - _run(bp, weights=None)).abs().max() > 1e-2


def test_soup_delta_is_the_merged_update_and_differs_from_factor_interpolation(setup):
    d, files, bp = setup
    fused = _fused(d, files, 1.0)
    path = "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_q"
    layer = bp.pipe.unet.get_submodule(path)
    base_w = layer.get_base_layer().weight
    delta = fused.unet.get_submodule(path).weight - base_w
    torch.testing.assert_close(soup_delta(layer, W), delta, atol=1e-5, rtol=0)
    authors = factor_interpolation_delta(layer, W)
    assert (authors - delta).abs().max() > 1e-2  # interpolating A and B separately is another model


def test_soup_weights_change_without_reload(setup):
    d, files, bp = setup
    a = _run(bp, weights={"aes": 0.9, "txt": 0.1}, method="soup")
    b = _run(bp, weights={"aes": 0.1, "txt": 0.9}, method="soup")
    assert (a - b).abs().max() > 1e-2
    torch.testing.assert_close(_run(bp, weights={"aes": 0.9, "txt": 0.1}, method="soup"), a, atol=0, rtol=0)
    layer = bp.pipe.unet.down_blocks[0].attentions[0].transformer_blocks[0].attn1.to_q
    assert layer.scaling == {"aes": 2.0, "txt": 2.0}  # scalings restored after each call
