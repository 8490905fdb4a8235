"""``hpsv2``: Human Preference Score v2 / v2.1 (Wu et al. 2023), an open_clip ViT-H-14 fine-tuned on HPD v2.

The released checkpoints (``HPS_v2_compressed.pt``, ``HPS_v2.1_compressed.pt``) are open_clip state
dicts. open-clip-torch needs torchvision and timm, which do not install beside every torch, so the
weights are mapped onto transformers' ``CLIPModel`` (:mod:`._openclip`) and run there; the mapping is
checked against a hand-written forward of the open_clip layout in tests/test_reward_hps.py.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._loading import cached, load_state_dict, local_file, parse_dtype
from ._preprocess import ImageTransform
from .clip import ClipEmbedder, load_clip, prompt_cosine
from .registry import register_reward

__all__ = ["hpsv2", "load_hps"]

HPS_TOKENIZER = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # open_clip's ViT-H-14 uses OpenAI's CLIP BPE


def load_hps(path: Any, device: str | torch.device = "cpu", dtype: Any = None, tokenizer: str | None = None,
             head_width: int = 64) -> ClipEmbedder:
    """HPS as a :class:`ClipEmbedder`: from an open_clip checkpoint file (.pt / .bin / .safetensors) or a
    folder saved with ``save_pretrained`` (a converted CLIPModel with its processor). Once per process."""
    if path is None:
        raise ValueError("hpsv2 needs path=FILE (HPS_v2.1_compressed.pt, an open_clip state dict) or path=DIR "
                         "(a CLIPModel folder)")
    dt = parse_dtype(dtype)
    if Path(os.path.expanduser(str(path))).is_dir():
        return load_clip(path, device, dtype, tokenizer, "hpsv2")
    file = local_file(path, "hpsv2", "path")
    tok = tokenizer or HPS_TOKENIZER

    def build() -> ClipEmbedder:
        from ._openclip import load_openclip_as_clip

        model = load_openclip_as_clip(load_state_dict(file), head_width=head_width)
        size = model.config.vision_config.image_size  # open_clip's val transform: Resize(size) + CenterCrop(size)
        return ClipEmbedder(model, ImageTransform(shortest_edge=size, crop=(size, size)), tok, device, dt, "hpsv2")

    return cached(("hps", str(file.resolve()), tok, str(torch.device(device)), str(dt), head_width), build)


@register_reward("hpsv2", "HPS v2/v2.1: cosine of the fine-tuned open_clip ViT-H-14 image and prompt embeddings: "
                          "about 0.2..0.35, higher = preferred by people (needs path=checkpoint or folder)", needs_model=True)
def hpsv2(device: str | torch.device = "cpu", path: str | None = None, dtype: Any = None,
          tokenizer: str | None = None, head_width: int = 64) -> Any:
    """HPS v2 score: ``cos(E_image, E_prompt)`` (the diagonal of HPS's ``image_features @ text_features.T``
    on unit features). Range about 0.2..0.35 for real images, higher = preferred. Differentiable.

    ``path``: the open_clip checkpoint (``{"state_dict": ...}`` or a bare state dict, loaded with
    ``torch.load(weights_only=True)``; or a .safetensors) or a converted CLIPModel folder.
    ``tokenizer``: a folder / hub id with the CLIP BPE tokenizer (default ``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``).
    ``head_width``: open_clip's per-head width (64 for every released ViT) to infer the head count.
    """
    clip = load_hps(path, device, dtype, tokenizer, head_width)

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        return prompt_cosine(clip, images, prompts, "hpsv2").to(images.device), {}

    return fn
