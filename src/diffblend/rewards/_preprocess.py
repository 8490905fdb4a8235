"""Differentiable image pre-processing that reproduces the transformers image processors in torch.

The processors (CLIP, BLIP) resize PIL images with PIL's bicubic filter, centre-crop, rescale and
normalise. Here the same steps run on a (B, 3, H, W) float tensor in [0, 1] so a reward stays
differentiable w.r.t. the pixels: ``F.interpolate(mode="bicubic", antialias=True)`` is PIL's
bicubic filter (a = -0.5, widened support when downscaling), and the output is clamped to [0, 1]
as PIL clips to 0..255. What still differs: PIL rounds the resized image to uint8, so the two agree
to about half a grey level (measured in tests/test_reward_models.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["ImageTransform", "check_images", "to_pil", "batch_prompts"]

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


def check_images(images: Any) -> torch.Tensor:
    """``images`` if it is a (B, 3, H, W) float tensor (grey C = 1 is repeated to RGB), else a ValueError."""
    if not isinstance(images, torch.Tensor) or images.dim() != 4 or images.shape[1] not in (1, 3):
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise ValueError(f"images must be a (B, 3, H, W) float tensor in [0, 1], got {shape}")
    if not images.is_floating_point():
        raise ValueError(f"images must be a float tensor in [0, 1], got dtype {images.dtype}")
    return images.expand(-1, 3, -1, -1) if images.shape[1] == 1 else images


def _size_dict(x: Any) -> dict:
    return x if isinstance(x, dict) else {k: getattr(x, k) for k in ("shortest_edge", "height", "width")
                                          if getattr(x, k, None) is not None}


@dataclass(frozen=True)
class ImageTransform:
    """resize -> centre crop -> normalise, on (B, 3, H, W) in [0, 1], as a transformers image processor.

    ``shortest_edge``: resize so the short side has this length (aspect kept, the long side
    ``int(s * long / short)`` as transformers computes it); else ``size`` = (height, width) exactly.
    ``crop``: (height, width) of the centre crop, top-left at ``(H - h) // 2, (W - w) // 2``; None: no crop.
    """

    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD
    shortest_edge: int | None = 224
    size: tuple[int, int] | None = None
    crop: tuple[int, int] | None = (224, 224)

    @classmethod
    def from_processor(cls, proc: Any) -> ImageTransform:
        """The transform of a transformers image processor (or a processor that holds one)."""
        proc = getattr(proc, "image_processor", proc)
        size = _size_dict(proc.size) if getattr(proc, "do_resize", True) else {}
        crop = _size_dict(proc.crop_size) if getattr(proc, "do_center_crop", False) else None
        if getattr(proc, "do_rescale", True) and abs(float(getattr(proc, "rescale_factor", 1 / 255)) - 1 / 255) > 1e-9:
            raise ValueError(f"image processor rescale_factor {proc.rescale_factor} is not 1/255")
        norm = getattr(proc, "do_normalize", True)
        return cls(mean=tuple(proc.image_mean) if norm else (0.0,) * 3, std=tuple(proc.image_std) if norm else (1.0,) * 3,
                   shortest_edge=size.get("shortest_edge"),
                   size=(size["height"], size["width"]) if "height" in size else None,
                   crop=(crop["height"], crop["width"]) if crop else None)

    def resized_shape(self, h: int, w: int) -> tuple[int, int]:
        if self.shortest_edge is not None:
            s = self.shortest_edge
            short, long = min(h, w), max(h, w)
            new_long = int(s * long / short)
            return (s, new_long) if h <= w else (new_long, s)
        return self.size if self.size is not None else (h, w)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, h, w) normalised pixel values (differentiable)."""
        x = check_images(images)
        h, w = self.resized_shape(x.shape[-2], x.shape[-1])
        if (h, w) != tuple(x.shape[-2:]):
            x = F.interpolate(x, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise ValueError(f"images resized to {h}x{w} are smaller than the crop {ch}x{cw}")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, dtype=x.dtype, device=x.device)[:, None, None]
        std = torch.tensor(self.std, dtype=x.dtype, device=x.device)[:, None, None]
        return (x - mean) / std


def to_pil(images: torch.Tensor) -> list:
    """(B, 3, H, W) in [0, 1] -> B RGB PIL images (uint8, rounded), for non-differentiable models."""
    from PIL import Image

    arr = (check_images(images).detach().float().clamp(0, 1) * 255).round().to(torch.uint8)
    return [Image.fromarray(a) for a in arr.permute(0, 2, 3, 1).cpu().numpy()]


def batch_prompts(prompts: Sequence[str] | str | None, batch: int, reward: str) -> list[str]:
    """The B prompts as a list of strings, or a ValueError naming ``reward``."""
    if isinstance(prompts, str):
        prompts = [prompts] * batch
    if prompts is None or len(prompts) != batch or not all(isinstance(p, str) for p in prompts):
        n = "None" if prompts is None else f"{len(prompts)} items"
        raise ValueError(f"{reward} needs one prompt string per image: {batch} images, prompts: {n}")
    return list(prompts)
