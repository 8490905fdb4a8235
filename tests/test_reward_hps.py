"""hpsv2: a random open_clip-layout checkpoint loaded through get_reward (mapped onto transformers' CLIPModel)
vs a forward of the open_clip / OpenAI CLIP layout written out here by hand from the same state dict.

Nothing on the reference side goes through transformers' CLIP model or the mapping: the reference
reads the open_clip keys (fused in_proj, x @ proj, argmax pooling, causal mask) directly.
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_pipelines import _tokenizer
from helpers_rewards import PROMPTS, offline, uint8_images, pil_processor

from diffblend.rewards import get_reward
from diffblend.rewards._loading import clear_cache
from diffblend.rewards._preprocess import to_pil

W, LAYERS, HEADS, MLP, PATCH, GRID, CTX, VOCAB, PROJ = 32, 2, 2, 48, 32, 7, 16, 514, 24


def _openclip_state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights in the open_clip ViT layout (names and shapes of open_clip.model.CLIP)."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    sd = {"visual.class_embedding": r(W), "visual.conv1.weight": r(W, 3, PATCH, PATCH, s=0.02),
          "visual.positional_embedding": r(GRID * GRID + 1, W), "visual.proj": r(W, PROJ),
          "token_embedding.weight": r(VOCAB, W), "positional_embedding": r(CTX, W), "text_projection": r(W, PROJ),
          "logit_scale": torch.tensor(math.log(1 / 0.07)), "attn_mask": torch.empty(CTX, CTX).fill_(float("-inf")).triu_(1)}
    for ln in ("visual.ln_pre", "visual.ln_post", "ln_final"):
        sd[f"{ln}.weight"], sd[f"{ln}.bias"] = 1 + r(W), r(W)
    for tower in ("visual.transformer.resblocks.", "transformer.resblocks."):
        for i in range(LAYERS):
            p = f"{tower}{i}."
            for ln in ("ln_1", "ln_2"):
                sd[p + ln + ".weight"], sd[p + ln + ".bias"] = 1 + r(W), r(W)
            sd[p + "attn.in_proj_weight"], sd[p + "attn.in_proj_bias"] = r(3 * W, W), r(3 * W)
            sd[p + "attn.out_proj.weight"], sd[p + "attn.out_proj.bias"] = r(W, W), r(W)
            sd[p + "mlp.c_fc.weight"], sd[p + "mlp.c_fc.bias"] = r(MLP, W), r(MLP)
            sd[p + "mlp.c_proj.weight"], sd[p + "mlp.c_proj.bias"] = r(W, MLP), r(W)
    return sd


def _ln(x, sd, name):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=1e-5)


def _resblock(x, sd, p, causal):
    """open_clip ResidualAttentionBlock: x + attn(ln_1(x)); x + mlp(ln_2(x)); nn.MultiheadAttention maths."""
    b, n, d = x.shape
    qkv = _ln(x, sd, p + "ln_1") @ sd[p + "attn.in_proj_weight"].T + sd[p + "attn.in_proj_bias"]
    q, k, v = (t.reshape(b, n, HEADS, d // HEADS).transpose(1, 2) for t in qkv.split(d, dim=-1))
    att = q @ k.transpose(-1, -2) / math.sqrt(d // HEADS)
    if causal:
        att = att + sd["attn_mask"][:n, :n]
    o = (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)
    x = x + o @ sd[p + "attn.out_proj.weight"].T + sd[p + "attn.out_proj.bias"]
    h = F.gelu(_ln(x, sd, p + "ln_2") @ sd[p + "mlp.c_fc.weight"].T + sd[p + "mlp.c_fc.bias"])
    return x + h @ sd[p + "mlp.c_proj.weight"].T + sd[p + "mlp.c_proj.bias"]


def _encode_image(sd, pixels):
    x = F.conv2d(pixels, sd["visual.conv1.weight"], stride=PATCH).flatten(2).transpose(1, 2)  # (B, GRID^2, W)
    x = torch.cat([sd["visual.class_embedding"].expand(x.shape[0], 1, W), x], dim=1) + sd["visual.positional_embedding"]
    x = _ln(x, sd, "visual.ln_pre")
    for i in range(LAYERS):
        x = _resblock(x, sd, f"visual.transformer.resblocks.{i}.", causal=False)
    return _ln(x[:, 0], sd, "visual.ln_post") @ sd["visual.proj"]


def _encode_text(sd, ids):
    x = sd["token_embedding.weight"][ids] + sd["positional_embedding"]
    for i in range(LAYERS):
        x = _resblock(x, sd, f"transformer.resblocks.{i}.", causal=True)
    x = _ln(x, sd, "ln_final")
    return x[torch.arange(len(ids)), ids.argmax(-1)] @ sd["text_projection"]  # pooled at end-of-text (largest id)


@torch.no_grad()
def _reference_hps(sd, tok, images, prompts):

    pixels = torch.tensor(pil_processor("clip")(images=to_pil(images), return_tensors="np")["pixel_values"])
    ids = torch.zeros(len(prompts), CTX, dtype=torch.long)  # open_clip pads with 0 to the context length
    for i, p in enumerate(prompts):
        t = tok(p, truncation=True, max_length=CTX)["input_ids"]
        ids[i, :len(t)] = torch.tensor(t)
    img, txt = F.normalize(_encode_image(sd, pixels), dim=-1), F.normalize(_encode_text(sd, ids), dim=-1)
    return (img * txt).sum(-1)


@pytest.fixture()
def hps_files(tmp_path, monkeypatch):
    offline(monkeypatch)
    sd = _openclip_state_dict()
    torch.save({"state_dict": {"module." + k: v for k, v in sd.items()}, "epoch": 1}, tmp_path / "hps.pt")
    _tokenizer().save_pretrained(tmp_path / "tok")
    yield sd, tmp_path
    clear_cache()


# 224x224: no resize, the same pixels on both sides (1e-5); 72x100: PIL's uint8 resize vs torch's float one.
@pytest.mark.parametrize("shape, atol", [((224, 224), 1e-5), ((72, 100), 2e-3)])
def test_hps_matches_hand_written_openclip_forward(hps_files, shape, atol):
    sd, folder = hps_files
    x = uint8_images(4, *shape, seed=5)
    fn = get_reward("hpsv2", path=str(folder / "hps.pt"), tokenizer=str(folder / "tok"), head_width=W // HEADS)
    scores, _ = fn(x, PROMPTS, None)
    ref = _reference_hps(sd, _tokenizer(), x, PROMPTS)
    assert ref.abs().max() > 0.05 and ref.std() > 0.01  # a meaningful spread, not all ~0
    torch.testing.assert_close(scores, ref, atol=atol, rtol=0)
    xg = x.clone().requires_grad_(True)
    fn(xg, PROMPTS, None)[0].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_hps_safetensors_and_errors(hps_files, tmp_path):
    from safetensors.torch import save_file

    sd, folder = hps_files
    save_file({k: v.contiguous() for k, v in sd.items()}, str(tmp_path / "hps.safetensors"))
    x = uint8_images(2, 64, 64)
    kw = dict(tokenizer=str(folder / "tok"), head_width=W // HEADS)
    a, _ = get_reward("hpsv2", path=str(tmp_path / "hps.safetensors"), **kw)(x, PROMPTS[:2], None)
    torch.testing.assert_close(a, _reference_hps(sd, _tokenizer(), x, PROMPTS[:2]), atol=2e-3, rtol=0)
    with pytest.raises(ValueError, match="path=FILE"):
        get_reward("hpsv2")
    with pytest.raises(FileNotFoundError, match="missing.pt"):
        get_reward("hpsv2", path=str(tmp_path / "missing.pt"))
    torch.save({**sd, "visual.transformer.resblocks.0.ls_1.gamma": torch.ones(W)}, tmp_path / "ls.pt")
    with pytest.raises(ValueError, match="ls_1"):
        get_reward("hpsv2", path=str(tmp_path / "ls.pt"), **kw)
    torch.save({k: v for k, v in sd.items() if k != "visual.proj"}, tmp_path / "noproj.pt")
    with pytest.raises(ValueError, match="visual.proj"):
        get_reward("hpsv2", path=str(tmp_path / "noproj.pt"), **kw)
