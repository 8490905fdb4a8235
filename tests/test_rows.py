"""Per-sample blends (core.rows.RowBlend): one batch, a different w per image, equal to separate calls."""

from __future__ import annotations

import pytest
import torch

from diffblend.core import Blend, RowBlend, blend_denoisers, is_per_row, ls_choices
from diffblend.pipeline import BlendPipeline
from helpers_pipelines import save_random_lora, tiny_sd

NAMES = ("a", "b")
ROWS = [{"a": 1.0}, {"a": 0.3, "b": 0.7}, {"b": 1.0}]


# -- core -----------------------------------------------------------------------------------------
def test_create_validates_each_row_and_names_it():
    rb = RowBlend.create(ROWS, NAMES, kl_strength=[1.0, 0.5, 1.2])
    assert rb.coefficients().shape == (3, 3)
    torch.testing.assert_close(rb.coefficients()[1], Blend.create(ROWS[1], NAMES, kl_strength=0.5).coefficients())
    with pytest.raises(ValueError, match=r"weights\[1\] \(sample 1\).*sum to 1"):
        RowBlend.create([{"a": 1.0}, {"a": 0.5}], NAMES)
    with pytest.raises(ValueError, match=r"weights\[0\].*lambda\) = 1.5 > 1"):
        RowBlend.create(ROWS, NAMES, kl_strength=1.5, method="ls")
    with pytest.raises(ValueError, match="kl_strength has 2 values for 3"):
        RowBlend.create(ROWS, NAMES, kl_strength=[1.0, 1.0])
    with pytest.raises(ValueError, match="sample_keys has 1 keys for 3"):
        RowBlend.create(ROWS, NAMES, sample_keys=[1])
    with pytest.raises(ValueError, match="same adapters"):
        RowBlend.create([{"a": 1.0}, {"b": 1.0}])


def test_is_per_row_tells_one_w_from_a_list_of_them():
    assert is_per_row([{"a": 1.0}]) and is_per_row([[0.5, 0.5]])
    assert not is_per_row({"a": 1.0}) and not is_per_row([0.5, 0.5]) and not is_per_row([]) and not is_per_row("a")


def test_active_coefficients_repeat_over_cfg_groups():
    rb = RowBlend.create(ROWS, NAMES, kl_strength=[1.0, 1.0, 0.5])
    names, c = rb.active_coefficients(groups=2)
    assert names == ["__base__", "a", "b"] and c.shape == (3, 6)
    torch.testing.assert_close(c[:, :3], c[:, 3:])  # row r is sample r % 3
    torch.testing.assert_close(c[:, 2], torch.tensor([0.5, 0.0, 0.5], dtype=torch.float64))


def test_ls_per_row_draws_equal_each_blend_drawing_alone():
    blends = [Blend.create(w, NAMES, method="ls", seed=5, kl_strength=0.7) for w in ROWS]
    rb = RowBlend.create(ROWS, NAMES, method="ls", seed=5, kl_strength=0.7)
    for step in range(30):
        got = rb.choices(step, 3)
        want = torch.stack([b.choices(step, 3)[j] for j, b in enumerate(blends)])  # row j of a batch of 3
        assert torch.equal(got, want)
    with pytest.raises(ValueError, match="3 per-sample blends but the batch holds 2"):
        rb.choices(0, 2)
    with pytest.raises(ValueError, match="coeffs has 3 rows for 2 samples"):
        ls_choices(rb.coefficients(), 0, 0, 2)


@pytest.mark.parametrize("method", ["mpa", "ls"])
@pytest.mark.parametrize("groups", [1, 2])
def test_blend_denoisers_per_row_equals_separate_blends(method, groups):
    # denoisers with distinct, input-dependent outputs: any row mix-up shows
    den = {n: (lambda k: lambda x, t, c: x * (k + 1) + k)(k) for k, n in enumerate(("__base__", *NAMES))}
    x = torch.randn(3 * groups, 2, generator=torch.Generator().manual_seed(0))
    t = torch.tensor(500)
    lam = 0.6
    rb = RowBlend.create(ROWS, NAMES, method=method, kl_strength=lam, sample_keys=[7, 8, 9])
    got = blend_denoisers(den, rb, groups)(x, t)
    for j, w in enumerate(ROWS):
        one = Blend.create(w, NAMES, method=method, kl_strength=lam, sample_keys=[7 + j])
        rows = [g * 3 + j for g in range(groups)]
        want = blend_denoisers(den, one, groups)(x[rows], t)
        torch.testing.assert_close(got[rows], want, atol=1e-6, rtol=0)


# -- on a diffusers pipeline (tiny SD 1.5 from configs, CFG) ---------------------------------------------
STEPS = 3
PROMPTS = ["a cat", "a dog", "a fish"]
SEEDS = [10, 11, 12]


@pytest.fixture(scope="module")
def sd(tmp_path_factory):
    d = tmp_path_factory.mktemp("sd_rows")
    pipe = tiny_sd(d)
    files = {n: save_random_lora(pipe, d / n, seed=i + 1) for i, n in enumerate(NAMES)}
    return BlendPipeline(pipe, files)


def _call(bp, idx, weights, **kw):
    lat = torch.randn((3, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    return bp(prompt=[PROMPTS[j] for j in idx], latents=lat[idx], weights=weights,
              generator=[torch.Generator().manual_seed(SEEDS[j]) for j in idx],
              sample_keys=[SEEDS[j] for j in idx], num_inference_steps=STEPS, eta=1.0, guidance_scale=3.0,
              height=16, width=16, output_type="latent", **kw).images


@pytest.mark.parametrize("mode", ["batched", "sequential"])
@pytest.mark.parametrize("method", ["mpa", "ls", "soup"])
def test_pipeline_per_row_equals_separate_calls(sd, method, mode):
    lams = [1.0, 0.5, 0.8] if method != "mpa" else [1.0, 0.5, 1.5]
    rows = ROWS[:2] + [{"a": 0.6, "b": 0.4}]  # LS needs a mixed w to draw different models per row
    got = _call(sd, [0, 1, 2], rows, kl_strength=lams, method=method, mode=mode)
    for j in range(3):
        alone = _call(sd, [j], rows[j], kl_strength=lams[j], method=method, mode=mode)
        # float32 kernels vary with the batch size: ~1e-5 seen on |x| ~ 3 (a wrong w: > 1e-2)
        torch.testing.assert_close(got[j], alone[0], atol=1e-4, rtol=0)
    other = _call(sd, [0], rows[1], kl_strength=lams[1], method=method, mode=mode)
    assert (got[0] - other[0]).abs().max() > 1e-2  # the rows did get different blends


def test_pipeline_per_row_with_images_per_prompt_and_wrong_count(sd):
    lat = torch.randn((4, 4, 8, 8), generator=torch.Generator().manual_seed(0))
    kw = dict(num_inference_steps=STEPS, eta=1.0, guidance_scale=3.0, height=16, width=16, output_type="latent",
              num_images_per_prompt=2)
    rows = [{"a": 1.0}, {"b": 1.0}, {"a": 0.5, "b": 0.5}, {"a": 1.0}]
    got = sd(prompt=["a cat", "a dog"], latents=lat, weights=rows, **kw).images
    assert got.shape[0] == 4
    with pytest.raises(ValueError, match="3 per-sample blends but the batch holds 4 samples"):
        sd(prompt=["a cat", "a dog"], latents=lat, weights=rows[:3], **kw)
