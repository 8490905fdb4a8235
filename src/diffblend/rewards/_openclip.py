"""An open_clip / OpenAI-CLIP state dict mapped onto transformers' ``CLIPModel`` (no open_clip needed).

open_clip (and OpenAI's CLIP) keep one fused ``in_proj`` per attention (``nn.MultiheadAttention``),
projections as (D, P) matrices applied as ``x @ proj``, and the text pooled at ``argmax(token ids)``
(the end-of-text token has the largest id). transformers splits q/k/v, keeps projections as
``Linear`` weights (P, D), and pools at the first ``eos_token_id``: the same token once the config's
eos id is the vocabulary's last id. The architecture is read from the tensor shapes; the number of
heads is ``width // head_width`` (open_clip's default head width is 64).
"""

from __future__ import annotations

import re

import torch

__all__ = ["openclip_config", "openclip_to_transformers", "load_openclip_as_clip"]

_IGNORED = ("attn_mask", "visual.attn_mask", "input_patchnorm")  # buffers rebuilt by the model

_BLOCK = {"ln_1": "layer_norm1", "ln_2": "layer_norm2", "attn.out_proj": "self_attn.out_proj",
          "mlp.c_fc": "mlp.fc1", "mlp.c_proj": "mlp.fc2"}


def _layers(sd: dict, prefix: str) -> int:
    idx = {int(m.group(1)) for k in sd if (m := re.match(re.escape(prefix) + r"(\d+)\.", k))}
    if not idx:
        raise ValueError(f"the state dict has no {prefix}N.* blocks: not an open_clip / OpenAI CLIP checkpoint")
    return max(idx) + 1


def openclip_config(sd: dict[str, torch.Tensor], head_width: int = 64, quick_gelu: bool = False):
    """The ``CLIPConfig`` of an open_clip state dict (ViT vision tower, default text tower)."""
    from transformers import CLIPConfig

    missing = [k for k in ("visual.conv1.weight", "visual.proj", "token_embedding.weight", "text_projection") if k not in sd]
    if missing:
        raise ValueError(f"not an open_clip ViT checkpoint: missing {missing} (ModifiedResNet / custom text towers "
                         f"are not supported)")
    vw, patch = sd["visual.conv1.weight"].shape[0], sd["visual.conv1.weight"].shape[-1]
    grid = round((sd["visual.positional_embedding"].shape[0] - 1) ** 0.5)
    vocab, tw = sd["token_embedding.weight"].shape
    act = "quick_gelu" if quick_gelu else "gelu"
    vision = dict(hidden_size=vw, intermediate_size=sd["visual.transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                  num_hidden_layers=_layers(sd, "visual.transformer.resblocks."), num_attention_heads=vw // head_width,
                  image_size=grid * patch, patch_size=patch, hidden_act=act, layer_norm_eps=1e-5)
    text = dict(vocab_size=vocab, hidden_size=tw, intermediate_size=sd["transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                num_hidden_layers=_layers(sd, "transformer.resblocks."), num_attention_heads=tw // head_width,
                max_position_embeddings=sd["positional_embedding"].shape[0], hidden_act=act, layer_norm_eps=1e-5,
                bos_token_id=vocab - 2, eos_token_id=vocab - 1, pad_token_id=vocab - 1)
    if vw % head_width or tw % head_width:
        raise ValueError(f"head_width {head_width} does not divide the widths {vw} (vision) and {tw} (text)")
    return CLIPConfig(vision_config=vision, text_config=text, projection_dim=sd["text_projection"].shape[1])


def _blocks(sd: dict, src: str, dst: str, n: int) -> dict[str, torch.Tensor]:
    out = {}
    for i in range(n):
        s, d = f"{src}{i}.", f"{dst}{i}."
        for a, b in _BLOCK.items():
            for p in ("weight", "bias"):
                out[f"{d}{b}.{p}"] = sd[f"{s}{a}.{p}"]
        for p in ("weight", "bias"):  # fused (3D, ...) -> q, k, v
            for name, part in zip(("q_proj", "k_proj", "v_proj"), sd[f"{s}attn.in_proj_{p}"].chunk(3, dim=0)):
                out[f"{d}self_attn.{name}.{p}"] = part
    return out


def openclip_to_transformers(sd: dict[str, torch.Tensor], num_vision_layers: int, num_text_layers: int) -> dict:
    """open_clip keys -> ``CLIPModel`` keys (every input key is used, or it is an ignored buffer)."""
    v, t = "vision_model.", "text_model."
    out = {
        f"{v}embeddings.class_embedding": sd["visual.class_embedding"],
        f"{v}embeddings.patch_embedding.weight": sd["visual.conv1.weight"],
        f"{v}embeddings.position_embedding.weight": sd["visual.positional_embedding"],
        f"{t}embeddings.token_embedding.weight": sd["token_embedding.weight"],
        f"{t}embeddings.position_embedding.weight": sd["positional_embedding"],
        "visual_projection.weight": sd["visual.proj"].T.contiguous(),
        "text_projection.weight": sd["text_projection"].T.contiguous(),
        "logit_scale": sd["logit_scale"].reshape(()),
    }
    for a, b in (("visual.ln_pre", f"{v}pre_layrnorm"), ("visual.ln_post", f"{v}post_layernorm"),
                 ("ln_final", f"{t}final_layer_norm")):
        out[f"{b}.weight"], out[f"{b}.bias"] = sd[f"{a}.weight"], sd[f"{a}.bias"]
    out.update(_blocks(sd, "visual.transformer.resblocks.", f"{v}encoder.layers.", num_vision_layers))
    out.update(_blocks(sd, "transformer.resblocks.", f"{t}encoder.layers.", num_text_layers))
    return out


class _Reads(dict):
    """A dict that records which keys were read."""

    def __init__(self, *args):
        super().__init__(*args)
        self.used: set[str] = set()

    def __getitem__(self, key):
        self.used.add(key)
        return super().__getitem__(key)


def load_openclip_as_clip(sd: dict[str, torch.Tensor], head_width: int = 64, quick_gelu: bool = False):
    """A transformers ``CLIPModel`` (float32, eval) holding the weights of an open_clip state dict.

    Raises:
        ValueError: a key of ``sd`` the mapping does not use (e.g. a layer-scale or attention-pooling
            tower this mapping does not know), or a model key left without a weight.
    """
    from transformers import CLIPModel

    cfg = openclip_config(sd, head_width, quick_gelu)
    nv, nt = cfg.vision_config.num_hidden_layers, cfg.text_config.num_hidden_layers
    reads = _Reads(sd)
    mapped = openclip_to_transformers(reads, nv, nt)
    unused = sorted(k for k in sd if k not in reads.used and k not in _IGNORED)
    if unused:
        raise ValueError(f"the open_clip checkpoint has tensors this mapping does not use (e.g. layer scale "
                         f"ls_1/ls_2 or attentional pooling), refusing a partial load: {unused[:8]}")
    model = CLIPModel(cfg)
    missing, unexpected = model.load_state_dict({k: v.float() for k, v in mapped.items()}, strict=False)
    missing = [k for k in missing if not k.endswith("position_ids")]
    if missing or unexpected:
        raise ValueError(f"open_clip -> CLIPModel mapping left missing={missing} unexpected={unexpected}")
    return model.eval()
