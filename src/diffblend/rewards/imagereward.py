"""``imagereward``: ImageReward (Xu et al. 2023), BLIP with a reward head, without the ``image-reward`` package.

The released ``ImageReward.pt`` is a state dict of ``ImageReward(BLIP_Pretrain(vit="large"), MLP(768))``:
``blip.visual_encoder.*`` (BLIP's ViT), ``blip.text_encoder.*`` (BLIP's med.py BERT with cross-attention)
and ``mlp.layers.{0,2,4,6,7}.*``. The ViT maps onto transformers' ``BlipVisionModel`` (same fused qkv,
renamed keys) and the BERT onto ``BlipTextModel`` (a port of med.py, same keys); the head is the LAION
MLP shape. Score, as ``ImageReward.score``: prompt tokens ([CLS] ... [SEP], max 35) cross-attend to
the image tokens, the [CLS] state goes through the MLP, then ``(r - 0.16717) / 1.03334``.
"""

from __future__ import annotations

import json
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ._loading import cached, load_pretrained, load_state_dict, parse_dtype
from ._preprocess import ImageTransform, batch_prompts, check_images
from .aesthetic import AestheticHead
from .registry import register_reward

__all__ = ["ImageRewardModel", "load_imagereward", "imagereward", "IR_MEAN", "IR_STD"]

IR_MEAN, IR_STD = 0.16717362830052426, 1.0333394966054072  # ImageReward.py's normalisation of the MLP output
IR_MAX_TOKENS = 35
IR_TOKENIZER = "bert-base-uncased"  # BLIP's init_tokenizer (its added [DEC]/[ENC] tokens are not used in scoring)
_IGNORED = ("blip.vision_proj.", "blip.text_proj.", "blip.itm_head.", "blip.text_encoder.embeddings.position_ids")
_VIT = [(r"cls_token", "embeddings.class_embedding"), (r"pos_embed", "embeddings.position_embedding"),
        (r"patch_embed\.proj\.", "embeddings.patch_embedding."), (r"blocks\.(\d+)\.norm1\.", r"encoder.layers.\1.layer_norm1."),
        (r"blocks\.(\d+)\.norm2\.", r"encoder.layers.\1.layer_norm2."), (r"blocks\.(\d+)\.attn\.qkv\.", r"encoder.layers.\1.self_attn.qkv."),
        (r"blocks\.(\d+)\.attn\.proj\.", r"encoder.layers.\1.self_attn.projection."),
        (r"blocks\.(\d+)\.mlp\.", r"encoder.layers.\1.mlp."), (r"norm\.", "post_layernorm.")]


def _vit_key(key: str) -> str:
    for pat, rep in _VIT:
        new, n = re.subn("^" + pat, rep, key)
        if n:
            return new
    raise ValueError(f"ImageReward checkpoint: unknown ViT key blip.visual_encoder.{key}")


def _count(sd: dict, pattern: str) -> int:
    return 1 + max(int(m.group(1)) for k in sd if (m := re.match(pattern, k)))


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder with cross-attention + MLP; ``forward`` -> (B,) normalised rewards."""

    def __init__(self, sd: dict[str, torch.Tensor], heads: tuple[int, int] | None = None,
                 eps: tuple[float, float] = (1e-6, 1e-12)):
        super().__init__()
        from transformers import BlipTextConfig, BlipTextModel, BlipVisionConfig, BlipVisionModel

        v, t = "blip.visual_encoder.", "blip.text_encoder."
        vw, patch = sd[v + "patch_embed.proj.weight"].shape[0], sd[v + "patch_embed.proj.weight"].shape[-1]
        vocab, tw = sd[t + "embeddings.word_embeddings.weight"].shape
        vh, th = heads or (vw // 64, tw // 64)
        self.vision = BlipVisionModel(BlipVisionConfig(
            hidden_size=vw, intermediate_size=sd[v + "blocks.0.mlp.fc1.weight"].shape[0], num_attention_heads=vh,
            num_hidden_layers=_count(sd, re.escape(v) + r"blocks\.(\d+)\."), patch_size=patch, layer_norm_eps=eps[0],
            image_size=round((sd[v + "pos_embed"].shape[1] - 1) ** 0.5) * patch, hidden_act="gelu"))
        self.text = BlipTextModel(BlipTextConfig(
            vocab_size=vocab, hidden_size=tw, encoder_hidden_size=vw, num_attention_heads=th, is_decoder=True,
            intermediate_size=sd[t + "encoder.layer.0.intermediate.dense.weight"].shape[0], layer_norm_eps=eps[1],
            num_hidden_layers=_count(sd, re.escape(t) + r"encoder\.layer\.(\d+)\."), hidden_act="gelu",
            max_position_embeddings=sd[t + "embeddings.position_embeddings.weight"].shape[0]), add_pooling_layer=False)
        self.mlp = AestheticHead(tw)
        self._load(sd)

    def _load(self, sd: dict[str, torch.Tensor]) -> None:
        own: dict[str, torch.Tensor] = {}
        for k, val in sd.items():
            if k.startswith("blip.visual_encoder."):
                own["vision." + _vit_key(k.removeprefix("blip.visual_encoder."))] = val
            elif k.startswith("blip.text_encoder.") and not k.startswith(_IGNORED):
                own["text." + k.removeprefix("blip.text_encoder.")] = val
            elif k.startswith("mlp."):
                own["mlp." + k.removeprefix("mlp.")] = val
            elif not k.startswith(_IGNORED):
                raise ValueError(f"ImageReward checkpoint: unexpected key {k!r}")
        missing, unexpected = self.load_state_dict({k: x.float() for k, x in own.items()}, strict=False)
        missing = [k for k in missing if not k.endswith("position_ids")]
        if missing or unexpected:
            raise ValueError(f"ImageReward checkpoint -> BLIP mapping left missing={missing[:6]} unexpected={unexpected[:6]}")

    def forward(self, pixels: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        image = self.vision(pixel_values=pixels).last_hidden_state  # (B, 1 + N, Dv), post-norm on every token
        ones = torch.ones(image.shape[:2], dtype=torch.long, device=image.device)
        text = self.text(input_ids=input_ids, attention_mask=attention_mask, encoder_hidden_states=image,
                         encoder_attention_mask=ones).last_hidden_state  # (B, T, Dt), bidirectional
        return (self.mlp(text[:, 0]).float() - IR_MEAN) / IR_STD


def _checkpoint(path: Any) -> tuple[Path, Path | None]:
    """(weights file, med_config.json or None) from a file or a folder holding one ``*.pt`` / ``*.safetensors``."""
    if path is None:
        raise ValueError("imagereward needs path=FILE (ImageReward.pt) or path=DIR (a folder holding it)")
    p = Path(os.path.expanduser(str(path)))
    if p.is_file():
        return p, (p.parent / "med_config.json") if (p.parent / "med_config.json").is_file() else None
    if not p.is_dir():
        raise FileNotFoundError(f"imagereward: path {str(p)!r} does not exist")
    files = sorted([*p.glob("*.pt"), *p.glob("*.pth"), *p.glob("*.safetensors")])
    if len(files) != 1:
        raise FileNotFoundError(f"imagereward: folder {str(p)!r} must hold one ImageReward .pt/.safetensors file, "
                                f"found {[f.name for f in files]}")
    return files[0], (p / "med_config.json") if (p / "med_config.json").is_file() else None


def load_imagereward(path: Any, device: str | torch.device = "cpu", dtype: Any = None,
                     heads: Sequence[int] | None = None) -> ImageRewardModel:
    """The ImageReward model from its checkpoint, once per process. ``heads``: (vision, text) attention
    heads; default width // 64 for the ViT and ``med_config.json``'s ``num_attention_heads`` (else width // 64)."""
    file, med = _checkpoint(path)
    dt = parse_dtype(dtype)

    def build() -> ImageRewardModel:
        sd = load_state_dict(file)
        if "blip.visual_encoder.patch_embed.proj.weight" not in sd or "mlp.layers.0.weight" not in sd:
            raise ValueError(f"{file} is not an ImageReward checkpoint (no blip.visual_encoder.* / mlp.layers.*)")
        cfg = json.loads(med.read_text()) if med else {}
        vw = sd["blip.visual_encoder.patch_embed.proj.weight"].shape[0]
        tw = sd["blip.text_encoder.embeddings.word_embeddings.weight"].shape[1]
        hv, ht = heads or (vw // 64, cfg.get("num_attention_heads", tw // 64))
        model = ImageRewardModel(sd, (int(hv), int(ht)), (1e-6, cfg.get("layer_norm_eps", 1e-12)))
        return model.to(device=device, dtype=dt).eval().requires_grad_(False)

    return cached(("imagereward", str(file.resolve()), str(torch.device(device)), str(dt), str(heads)), build)


@register_reward("imagereward", "ImageReward (BLIP + MLP), normalised: about -2..2, higher = preferred by people "
                                "(needs path=ImageReward.pt or its folder)", needs_model=True)
def imagereward(device: str | torch.device = "cpu", path: str | None = None, dtype: Any = None,
                tokenizer: str | None = None, heads: Sequence[int] | None = None) -> Any:
    """ImageReward score ``(MLP(h_CLS) - 0.16717) / 1.03334``: about -2..2, higher = preferred. Differentiable.

    ``path``: ``ImageReward.pt`` (loaded with ``torch.load(weights_only=True)``) or a .safetensors with the
    same keys, or a folder holding one (and optionally BLIP's ``med_config.json``, read for the text
    head count and LayerNorm eps; else BERT-base's 12 heads and 1e-12). ``tokenizer``: a BERT
    tokenizer folder / hub id (default: ``path``'s folder if it has a ``vocab.txt``, else bert-base-uncased).
    ``heads``: (vision, text) attention heads if not the released model's (16, 12).
    Images: resize 224 (bicubic) + centre crop + CLIP mean/std, as ImageReward's ``_transform``.
    """
    from transformers import AutoTokenizer

    model = load_imagereward(path, device, dtype, heads)
    folder = _checkpoint(path)[0].parent
    tok_path = tokenizer or (str(folder) if (folder / "vocab.txt").is_file() else IR_TOKENIZER)
    tok = cached(("tokenizer", tok_path), lambda: load_pretrained(AutoTokenizer, tok_path, "imagereward"))
    size = model.vision.config.image_size
    transform = ImageTransform(shortest_edge=size, crop=(size, size))
    dev, dt = next(model.parameters()).device, next(model.parameters()).dtype

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        prompts = batch_prompts(prompts, check_images(images).shape[0], "imagereward")
        t = tok(prompts, padding="max_length", truncation=True, max_length=IR_MAX_TOKENS, return_tensors="pt")
        pixels = transform(images.to(dev, torch.float32)).to(dt)
        r = model(pixels, t["input_ids"].to(dev), t["attention_mask"].to(dev))
        return r.float().to(images.device), {}

    return fn
