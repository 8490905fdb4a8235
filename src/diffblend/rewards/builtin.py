"""The built-in rewards: ``jpeg_compressibility``, ``boldness`` (the zoo plug-in adds ``legibility``).

Each factory returns ``fn(images, prompts, metadata) -> (scores, info)`` with images (B, C, H, W)
float in [0, 1] and scores (B,) float32 on the images' device, higher is better.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from typing import Any

import torch

from .registry import register_reward

__all__ = ["jpeg_compressibility", "boldness"]


def _to_uint8(images: torch.Tensor) -> torch.Tensor:
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).cpu()


@register_reward(
    "jpeg_compressibility",
    "minus the JPEG size in kB (quality 95, after a 4x bilinear upscale): <= 0, higher = more compressible",
    aliases=("compressibility",),
)
def jpeg_compressibility(device: str | torch.device = "cpu", quality: int = 95, upscale: int = 4) -> Any:
    """DDPO's compressibility reward: ``-size_kB`` of each image saved as a JPEG.

    Range (-inf, 0], higher = more compressible. As in DDPO, quality 95 and 1 kB = 1000 bytes.
    The 16x16 digits are first upscaled ``upscale`` times (bilinear, what a viewer would show):
    at 16x16 the file is mostly its fixed header (about 0.33 kB for a grey image), so the size of
    the picture's content would be a small part of the score. Grey images (C = 1) are saved as
    8-bit grey JPEGs, C = 3 as RGB. An image with a NaN or inf pixel scores NaN. Not differentiable.
    """
    from PIL import Image

    if not 1 <= int(quality) <= 100:
        raise ValueError(f"quality must be in 1..100, got {quality}")
    if int(upscale) < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        x = images.detach().float()
        if upscale > 1:
            x = torch.nn.functional.interpolate(x, scale_factor=int(upscale), mode="bilinear", align_corners=False)
        arr = _to_uint8(x).permute(0, 2, 3, 1).numpy()  # (B, H, W, C)
        sizes = []
        for a in arr:
            img = Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB")
            buf = io.BytesIO()
            img.save(buf, format="JPEG", quality=int(quality))
            sizes.append(buf.tell() / 1000.0)
        kb = torch.tensor(sizes, dtype=torch.float32)
        kb[~torch.isfinite(images.detach().float().cpu()).flatten(1).all(1)] = float("nan")  # no image to compress
        kb = kb.to(images.device)
        return -kb, {"jpeg_kb": kb}

    return fn


@register_reward("boldness", "mean ink intensity (stroke mass) in [0, 1]: higher = bolder strokes")
def boldness(device: str | torch.device = "cpu") -> Any:
    """Ink mass: the mean pixel value of the (grey) image, in [0, 1], higher = bolder.

    With the digits' convention (ink = 1 on a black background) this is the share of the canvas
    covered by ink. RGB images are averaged over channels. Differentiable.
    """

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        return images.float().clamp(0, 1).mean(dim=(1, 2, 3)), {}

    return fn
