"""CLIP-based rewards: ``clip_score`` (CLIPScore, Hessel et al. 2021) and ``pickscore`` (Kirstain et al. 2023).

Both load a transformers ``CLIPModel`` and its processor from ``path`` (a folder saved with
``save_pretrained`` or a hub id) once per process, pre-process the images in torch (differentiable,
see :mod:`._preprocess`) and compare L2-normalised image and prompt embeddings.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ._loading import cached, features, load_pretrained, local_or_hub, parse_dtype
from ._preprocess import ImageTransform, batch_prompts, check_images
from .registry import register_reward

__all__ = ["ClipEmbedder", "load_clip", "prompt_cosine", "clip_score", "pickscore"]

PICKSCORE_PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class ClipEmbedder:
    """A frozen CLIPModel with its processor: ``image_embeds`` (differentiable) and ``text_embeds`` (cached).

    Both return L2-normalised float32 (B, D) embeddings on the model's device.
    """

    def __init__(self, model: Any, transform: ImageTransform, tokenizer: str, device: str | torch.device,
                 dtype: torch.dtype, what: str):
        self.model = model.to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.transform, self.tokenizer_path, self.what = transform, tokenizer, what
        self.device, self.dtype = torch.device(device), dtype
        self._tokenizer: Any = None
        self._text: dict[str, torch.Tensor] = {}

    @classmethod
    def from_pretrained(cls, path: str, device: str | torch.device, dtype: torch.dtype, processor: str | None,
                        what: str) -> ClipEmbedder:
        """A CLIPModel saved in ``path`` with its processor (or the processor in ``processor``)."""
        from transformers import AutoImageProcessor, CLIPModel

        model = load_pretrained(CLIPModel, path, what)
        transform = ImageTransform.from_processor(load_pretrained(AutoImageProcessor, processor or path, what))
        return cls(model, transform, processor or path, device, dtype, what)

    def image_embeds(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, D) unit image embeddings (the projection of the pooled CLS token)."""
        pixels = self.transform(images.to(self.device, torch.float32)).to(self.dtype)
        emb = features(self.model.get_image_features(pixel_values=pixels)).float()
        return emb / emb.norm(dim=-1, keepdim=True)

    @torch.no_grad()
    def text_embeds(self, prompts: Sequence[str]) -> torch.Tensor:
        """B prompts -> (B, D) unit text embeddings; each distinct prompt is encoded once per process."""
        if self._tokenizer is None:
            from transformers import AutoTokenizer

            self._tokenizer = load_pretrained(AutoTokenizer, self.tokenizer_path, self.what)
        new = [p for p in dict.fromkeys(prompts) if p not in self._text]
        if new:
            tok = self._tokenizer(new, padding=True, truncation=True,
                                  max_length=self.model.config.text_config.max_position_embeddings, return_tensors="pt")
            emb = features(self.model.get_text_features(
                input_ids=tok["input_ids"].to(self.device), attention_mask=tok["attention_mask"].to(self.device))).float()
            emb = emb / emb.norm(dim=-1, keepdim=True)
            if len(self._text) > 10_000:  # prompts of a long sweep: keep memory bounded
                self._text.clear()
            self._text.update(zip(new, emb))
        return torch.stack([self._text[p] for p in prompts])


def load_clip(path: Any, device: str | torch.device = "cpu", dtype: Any = None, processor: str | None = None,
              what: str = "clip") -> ClipEmbedder:
    """The :class:`ClipEmbedder` for ``path`` on ``device`` in ``dtype``, loaded once per process."""
    path = local_or_hub(path, what)
    processor = local_or_hub(processor, what, "processor") if processor else None
    dt = parse_dtype(dtype)
    key = ("clip", path, processor, str(torch.device(device)), str(dt))
    return cached(key, lambda: ClipEmbedder.from_pretrained(path, device, dt, processor, what))


def prompt_cosine(clip: ClipEmbedder, images: torch.Tensor, prompts: Any, what: str) -> torch.Tensor:
    prompts = batch_prompts(prompts, check_images(images).shape[0], what)
    return (clip.image_embeds(images) * clip.text_embeds(prompts)).sum(-1)  # (B,)


@register_reward("clip_score", "CLIPScore w * max(cos(image, prompt), 0) with w = 2.5: in [0, 2.5], higher = "
                               "closer to the prompt (needs path=CLIP folder or hub id)", needs_model=True)
def clip_score(device: str | torch.device = "cpu", path: str = "openai/clip-vit-large-patch14", dtype: Any = None,
               w: float = 2.5, processor: str | None = None) -> Any:
    """CLIPScore (Hessel et al. 2021): ``w * max(cos(E_image, E_prompt), 0)``, with the paper's w = 2.5.

    Range [0, w], higher = the image matches the prompt better (torchmetrics' CLIPScore is the same
    with w = 100). Differentiable w.r.t. the images (zero gradient where cos < 0). ``info["cosine"]``:
    the raw cosine. ``processor``: a folder for the processor/tokenizer if not in ``path``.
    """
    clip = load_clip(path, device, dtype, processor, "clip_score")

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        cos = prompt_cosine(clip, images, prompts, "clip_score")
        return (float(w) * cos.clamp(min=0)).to(images.device), {"cosine": cos.detach().to(images.device)}

    return fn


@register_reward("pickscore", "PickScore logit_scale.exp() * cos(image, prompt) - offset: about 15..25 for "
                              "offset 0, higher = preferred by people (needs path=PickScore folder or hub id)", needs_model=True)
def pickscore(device: str | torch.device = "cpu", path: str = "yuvalkirstain/PickScore_v1", dtype: Any = None,
              offset: float = 0.0, processor: str | None = None) -> Any:
    """PickScore (Kirstain et al. 2023): ``exp(logit_scale) * cos(E_image, E_prompt) - offset``.

    PickScore_v1's logit scale is 100, so scores are about 15..25; ``offset`` (default 0) is a
    constant subtracted to centre them (e.g. 19). The released model ships without a processor:
    ``processor`` names the folder / hub id of one; by default ``path`` when it is a folder holding a
    ``preprocessor_config.json`` or ``processor_config.json``, else the CLIP-ViT-H-14 processor PickScore was trained with
    (``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``). Differentiable w.r.t. the images.
    """
    folder = Path(str(path)).expanduser()
    if processor is None and not any((folder / f).is_file() for f in ("preprocessor_config.json", "processor_config.json")):
        processor = PICKSCORE_PROCESSOR
    clip = load_clip(path, device, dtype, processor, "pickscore")
    scale = clip.model.logit_scale.detach().float().exp()

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        cos = prompt_cosine(clip, images, prompts, "pickscore")
        return (scale * cos - float(offset)).to(images.device), {"cosine": cos.detach().to(images.device)}

    return fn
