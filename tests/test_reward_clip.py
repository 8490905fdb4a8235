"""clip_score, pickscore, aesthetic: tiny real CLIPModels loaded through get_reward vs the real processor + forward
and the formulas written out by hand; the torch pre-processing vs the real image processors."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from helpers_rewards import PROMPTS, offline, reference_clip_embeds, tiny_clip, uint8_images, pil_processor

from diffblend.rewards import get_reward
from diffblend.rewards._loading import clear_cache
from diffblend.rewards._preprocess import ImageTransform, to_pil

# The reference sees the image resized by PIL and rounded to uint8; the torch path keeps floats:
# ~0.3 grey levels apart on average (see test_transform_matches_processor), which moves a cosine
# of these random tiny models by ~1e-4. 2e-3 on cosines (5e-3 on 2.5 * cos) leaves room and still
# fails on a wrong crop, mean/std or embedding.
COS_ATOL = 2e-3


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory):
    return tiny_clip(tmp_path_factory.mktemp("clip"))


@pytest.fixture(autouse=True)
def _fresh_cache(monkeypatch):
    offline(monkeypatch)
    yield
    clear_cache()


@pytest.mark.parametrize("shape", [(512, 512), (300, 417), (61, 37)])
@pytest.mark.parametrize("kind", ["clip", "blip"])
def test_transform_matches_processor(kind, shape):
    """Torch resize/crop/normalise vs transformers' PIL processors, in grey levels (x 255) of the [0, 1] image.
    The processor rounds PIL's resized image to uint8, so half a level is the floor; bicubic upscales
    (61x37 -> 384x384) differ by up to ~2.5 levels where PIL's 8-bit-precision weights round."""

    proc = pil_processor(kind)
    x = uint8_images(2, *shape, seed=1)
    ref = torch.from_numpy(np.stack(proc(images=to_pil(x))["pixel_values"]))
    t = ImageTransform.from_processor(proc)
    out = t(x)
    assert out.shape == ref.shape == (2, 3, *((224, 224) if kind == "clip" else (384, 384)))
    levels = ((out - ref) * torch.tensor(t.std)[:, None, None] * 255).abs()
    assert levels.mean() < 0.4 and levels.max() < 3.0, (levels.mean(), levels.max())


def test_clip_score_matches_hand_formula(clip_dir):
    x = uint8_images(4, 96, 128)
    scores, info = get_reward("clip_score", path=str(clip_dir))(x, PROMPTS, None)
    img, txt, _ = reference_clip_embeds(clip_dir, x, PROMPTS)
    cos = (img * txt).sum(-1)
    assert scores.dtype == torch.float32 and scores.shape == (4,)
    torch.testing.assert_close(info["cosine"], cos, atol=COS_ATOL, rtol=0)
    torch.testing.assert_close(scores, 2.5 * cos.clamp(min=0), atol=2.5 * COS_ATOL, rtol=0)


def test_pickscore_matches_hand_formula(tmp_path):
    folder = tiny_clip(tmp_path, seed=3, logit_scale=np.log(100.0))
    x = uint8_images(4, 64, 64, seed=2)
    scores, _ = get_reward("pickscore", path=str(folder), offset=19.0)(x, PROMPTS, None)
    img, txt, scale = reference_clip_embeds(folder, x, PROMPTS)
    assert abs(scale.item() - 100.0) < 1e-3
    torch.testing.assert_close(scores, 100.0 * (img * txt).sum(-1) - 19.0, atol=100 * COS_ATOL, rtol=0)


def test_clip_score_gradient_and_no_grad(clip_dir):
    fn = get_reward("clip_score", path=str(clip_dir))
    x = uint8_images(2, 64, 64).requires_grad_(True)
    s, _ = fn(x, PROMPTS[:2], None)
    s.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    with torch.no_grad():
        s2, _ = fn(x, PROMPTS[:2], None)
    assert s2.grad_fn is None
    torch.testing.assert_close(s2, s.detach())


def test_clip_loaded_once_and_dtypes(clip_dir):
    from diffblend.rewards import _loading

    get_reward("clip_score", path=str(clip_dir))
    n = len(_loading._CACHE)
    get_reward("clip_score", path=str(clip_dir))
    get_reward("pickscore", path=str(clip_dir))  # same folder, same device and dtype: the same model
    assert len(_loading._CACHE) == n
    x = uint8_images(2, 64, 64)
    ref, _ = get_reward("clip_score", path=str(clip_dir))(x, PROMPTS[:2], None)
    s, _ = get_reward("clip_score", path=str(clip_dir), dtype="bf16")(x, PROMPTS[:2], None)
    assert len(_loading._CACHE) == n + 1 and s.dtype == torch.float32
    torch.testing.assert_close(s, ref, atol=0.1, rtol=0)  # bf16 keeps ~3 digits


def _save_head(path, dim: int, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    sizes = {0: (1024, dim), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}
    sd = {}
    for i, (o, n) in sizes.items():
        sd[f"layers.{i}.weight"] = torch.randn(o, n, generator=g) / n ** 0.5
        sd[f"layers.{i}.bias"] = torch.randn(o, generator=g) * 0.1
    if str(path).endswith(".safetensors"):
        from safetensors.torch import save_file

        save_file(sd, str(path))
    else:
        torch.save(sd, path)
    return sd


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_aesthetic_matches_hand_mlp(clip_dir, tmp_path, suffix):
    sd = _save_head(tmp_path / f"head{suffix}", dim=16)
    x = uint8_images(3, 80, 80, seed=4)
    scores, _ = get_reward("aesthetic", path=str(clip_dir), head=str(tmp_path / f"head{suffix}"))(x, PROMPTS[:3], None)
    h, _, _ = reference_clip_embeds(clip_dir, x, PROMPTS[:3])
    for i in (0, 2, 4, 6, 7):  # Linear layers only: the LAION MLP has no activations, dropout is off in eval
        h = h @ sd[f"layers.{i}.weight"].T + sd[f"layers.{i}.bias"]
    torch.testing.assert_close(scores, h[:, 0], atol=2e-3, rtol=0)


def test_clear_errors(clip_dir, tmp_path):
    with pytest.raises(FileNotFoundError, match="does-not-exist"):
        get_reward("clip_score", path=str(tmp_path / "does-not-exist"))
    with pytest.raises(ValueError, match="head=FILE"):
        get_reward("aesthetic", path=str(clip_dir))
    with pytest.raises(FileNotFoundError, match="head file"):
        get_reward("aesthetic", path=str(clip_dir), head=str(tmp_path / "nope.pth"))
    _save_head(tmp_path / "wide.pth", dim=768)
    with pytest.raises(ValueError, match="768-d"):
        get_reward("aesthetic", path=str(clip_dir), head=str(tmp_path / "wide.pth"))
    with pytest.raises(ValueError, match="dtype"):
        get_reward("clip_score", path=str(clip_dir), dtype="int8")
    fn = get_reward("clip_score", path=str(clip_dir))
    with pytest.raises(ValueError, match="one prompt string per image"):
        fn(uint8_images(2, 32, 32), ["only one"], None)
    with pytest.raises(ValueError, match=r"\(B, 3, H, W\)"):
        fn(torch.rand(3, 32, 32), ["a"], None)


def test_hub_id_offline_fails_fast():
    """An uncached hub id with HF_HUB_OFFLINE=1: one OSError naming the id, no download attempt."""
    with pytest.raises(OSError, match="no-such-owner/no-such-clip"):
        get_reward("clip_score", path="no-such-owner/no-such-clip")
