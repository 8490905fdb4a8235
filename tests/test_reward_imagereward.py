"""imagereward: a random checkpoint in ImageReward.pt's layout (BLIP ViT + med.py BERT with cross-attention + MLP),
loaded through get_reward (mapped onto transformers' BLIP classes), vs a forward of the original layout written
out here by hand (timm-style pre-norm ViT, post-norm BERT, [CLS] -> MLP -> (r - mean) / std)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers_rewards import PROMPTS, offline, uint8_images, pil_processor

from diffblend.rewards import get_reward
from diffblend.rewards._loading import clear_cache
from diffblend.rewards._preprocess import to_pil

VW, VL, VH, PATCH, GRID = 32, 2, 2, 32, 7  # ViT: width, layers, heads, patch, grid (224 / 32)
TW, TL, TH, POS = 24, 2, 3, 40  # BERT: width, layers, heads, positions
WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "cat", "dog", "on", "grass", "blue", "car", "an",
         "old", "house"]


def _state_dict(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def r(*shape, s=0.2):
        return torch.randn(*shape, generator=g) * s

    def lin(name, o, i):
        sd[name + ".weight"], sd[name + ".bias"] = r(o, i, s=1 / math.sqrt(i)), r(o, s=0.05)

    def ln(name, d):
        sd[name + ".weight"], sd[name + ".bias"] = 1 + r(d, s=0.1), r(d, s=0.1)

    v, t = "blip.visual_encoder.", "blip.text_encoder."
    sd = {v + "cls_token": r(1, 1, VW), v + "pos_embed": r(1, GRID * GRID + 1, VW),
          t + "embeddings.word_embeddings.weight": r(len(WORDS), TW), t + "embeddings.position_embeddings.weight": r(POS, TW),
          t + "embeddings.position_ids": torch.arange(POS)[None]}
    sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"] = r(VW, 3, PATCH, PATCH, s=0.02), r(VW, s=0.05)
    for i in range(VL):
        b = f"{v}blocks.{i}."
        ln(b + "norm1", VW), ln(b + "norm2", VW), lin(b + "attn.qkv", 3 * VW, VW), lin(b + "attn.proj", VW, VW)
        lin(b + "mlp.fc1", 4 * VW, VW), lin(b + "mlp.fc2", VW, 4 * VW)
    ln(v + "norm", VW), ln(t + "embeddings.LayerNorm", TW)
    for i in range(TL):
        b = f"{t}encoder.layer.{i}."
        for att, kv in (("attention", TW), ("crossattention", VW)):
            lin(b + att + ".self.query", TW, TW), lin(b + att + ".self.key", TW, kv), lin(b + att + ".self.value", TW, kv)
            lin(b + att + ".output.dense", TW, TW), ln(b + att + ".output.LayerNorm", TW)
        lin(b + "intermediate.dense", 4 * TW, TW), lin(b + "output.dense", TW, 4 * TW), ln(b + "output.LayerNorm", TW)
    for i, (o, n) in {0: (1024, TW), 2: (128, 1024), 4: (64, 128), 6: (16, 64), 7: (1, 16)}.items():
        lin(f"mlp.layers.{i}", o, n)
    lin("blip.vision_proj", 16, VW), lin("blip.text_proj", 16, TW)  # in the release, unused by the score
    return sd


def _ln(x, sd, name, eps):
    return F.layer_norm(x, (x.shape[-1],), sd[name + ".weight"], sd[name + ".bias"], eps=eps)


def _lin(x, sd, name):
    return x @ sd[name + ".weight"].T + sd[name + ".bias"]


def _attend(q, k, v, heads, mask=None):
    b, n, d = q.shape
    q, k, v = (x.reshape(b, x.shape[1], heads, d // heads).transpose(1, 2) for x in (q, k, v))
    att = q @ k.transpose(-1, -2) / math.sqrt(d // heads)
    if mask is not None:
        att = att + (1.0 - mask[:, None, None, :].float()) * -10000.0  # med.py's extended attention mask
    return (att.softmax(-1) @ v).transpose(1, 2).reshape(b, n, d)


def _vit(sd, pixels):
    """BLIP's timm-style ViT: x + attn(norm1(x)); x + mlp(norm2(x)); norm(x) on every token; LayerNorm eps 1e-6."""
    v = "blip.visual_encoder."
    x = F.conv2d(pixels, sd[v + "patch_embed.proj.weight"], sd[v + "patch_embed.proj.bias"], stride=PATCH)
    x = torch.cat([sd[v + "cls_token"].expand(len(x), 1, VW), x.flatten(2).transpose(1, 2)], 1) + sd[v + "pos_embed"]
    for i in range(VL):
        b = f"{v}blocks.{i}."
        q, k, val = _lin(_ln(x, sd, b + "norm1", 1e-6), sd, b + "attn.qkv").split(VW, dim=-1)
        x = x + _lin(_attend(q, k, val, VH), sd, b + "attn.proj")
        x = x + _lin(F.gelu(_lin(_ln(x, sd, b + "norm2", 1e-6), sd, b + "mlp.fc1")), sd, b + "mlp.fc2")
    return _ln(x, sd, v + "norm", 1e-6)


def _bert(sd, ids, mask, image):
    """med.py BertModel in 'multimodal' mode: post-norm self-attention, cross-attention to the image, FFN."""
    t = "blip.text_encoder."
    x = sd[t + "embeddings.word_embeddings.weight"][ids] + sd[t + "embeddings.position_embeddings.weight"][:ids.shape[1]]
    x = _ln(x, sd, t + "embeddings.LayerNorm", 1e-12)
    for i in range(TL):
        b = f"{t}encoder.layer.{i}."
        for att, ctx, m in (("attention", x, mask), ("crossattention", image, None)):
            p = f"{b}{att}."
            o = _attend(_lin(x, sd, p + "self.query"), _lin(ctx, sd, p + "self.key"), _lin(ctx, sd, p + "self.value"), TH, m)
            x = _ln(x + _lin(o, sd, p + "output.dense"), sd, p + "output.LayerNorm", 1e-12)
        h = _lin(F.gelu(_lin(x, sd, b + "intermediate.dense")), sd, b + "output.dense")
        x = _ln(x + h, sd, b + "output.LayerNorm", 1e-12)
    return x


@torch.no_grad()
def _reference(sd, tok, images, prompts):

    pixels = torch.tensor(pil_processor("clip")(images=to_pil(images), return_tensors="np")["pixel_values"])
    t = tok(prompts, padding="max_length", truncation=True, max_length=35, return_tensors="pt")
    h = _bert(sd, t["input_ids"], t["attention_mask"], _vit(sd, pixels))[:, 0]
    for i in (0, 2, 4, 6, 7):
        h = _lin(h, sd, f"mlp.layers.{i}")
    return (h[:, 0] - 0.16717362830052426) / 1.0333394966054072


@pytest.fixture()
def ir_folder(tmp_path, monkeypatch):
    from transformers import BertTokenizer

    offline(monkeypatch)
    (tmp_path / "vocab.txt").write_text("\n".join(WORDS) + "\n")
    BertTokenizer(str(tmp_path / "vocab.txt")).save_pretrained(tmp_path)
    sd = _state_dict()
    torch.save(sd, tmp_path / "ImageReward.pt")
    yield sd, tmp_path
    clear_cache()


# 224x224 images need no resize: both sides see the same pixels, so only float rounding is left (1e-4).
# 90x70 images are resized by PIL (uint8 output) on one side and by torch on the other: ~0.3 grey
# levels apart, which moves these random tiny models' scores by up to ~5e-3: 1e-2 there.
@pytest.mark.parametrize("shape, atol", [((224, 224), 1e-4), ((90, 70), 1e-2)])
def test_imagereward_matches_hand_written_blip(ir_folder, shape, atol):
    from transformers import AutoTokenizer

    sd, folder = ir_folder
    x = uint8_images(4, *shape, seed=7)
    fn = get_reward("imagereward", path=str(folder), heads=(VH, TH))
    scores, _ = fn(x, PROMPTS, None)
    ref = _reference(sd, AutoTokenizer.from_pretrained(folder), x, PROMPTS)
    assert ref.std() > 0.05  # the prompts and images move the score: a real check
    torch.testing.assert_close(scores, ref, atol=atol, rtol=0)
    xg = x[:2].clone().requires_grad_(True)
    fn(xg, PROMPTS[:2], None)[0].sum().backward()
    assert torch.isfinite(xg.grad).all() and xg.grad.abs().sum() > 0


def test_imagereward_errors(ir_folder, tmp_path_factory):
    sd, folder = ir_folder
    empty = tmp_path_factory.mktemp("empty")
    with pytest.raises(ValueError, match="path=FILE"):
        get_reward("imagereward")
    with pytest.raises(FileNotFoundError, match="must hold one ImageReward"):
        get_reward("imagereward", path=str(empty))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        get_reward("imagereward", path=str(empty / "nope.pt"))
    torch.save({"mlp.layers.0.weight": torch.zeros(2, 2)}, empty / "other.pt")
    with pytest.raises(ValueError, match="not an ImageReward checkpoint"):
        get_reward("imagereward", path=str(empty / "other.pt"))
    torch.save({**sd, "blip.visual_encoder.blocks.0.ls1.gamma": torch.ones(VW)}, empty / "other.pt")
    with pytest.raises(ValueError, match="unknown ViT key"):
        get_reward("imagereward", path=str(empty / "other.pt"), heads=(VH, TH), tokenizer=str(folder))
