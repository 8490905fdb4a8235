"""Image measures of the colour default model: ``rms_contrast`` (Peli 1990), the aesthetic proxy of its demo pair
(bold, detailed images, which JPEG pays for), and ``colourfulness`` (Hasler and Suesstrunk 2003); its
``prompt_alignment`` reward is the zoo's (``zoo/colour/alignment.py``, registered by the zoo plug-in).

Registered ``listed=False``: it resolves by name everywhere, but stay out of ``available_rewards()``'s
default list, which the digits model's paths score every image with. Each factory returns ``fn(images, prompts, metadata) -> (scores, info)`` with images (B, C, H, W)
float in [0, 1] and scores (B,) float32 on the images' device, higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import register_reward

__all__ = ["colourfulness", "colourfulness_score", "rms_contrast", "rms_contrast_score"]


def colourfulness_score(images: torch.Tensor) -> torch.Tensor:
    """Hasler and Suesstrunk's (2003) colourfulness M of each image, on their 0..255 pixel scale.

    rg = R - G, yb = (R + G) / 2 - B over the pixels; M = sqrt(sd_rg^2 + sd_yb^2) + 0.3 sqrt(mu_rg^2 + mu_yb^2)
    (population standard deviations). 0 for a grey image; their 'extremely colourful' starts near 109.
    Differentiable (except where an image is exactly grey, where the square root's gradient is infinite).
    """
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    if images.shape[1] == 1:  # grey: no colour at all
        return torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
    if images.shape[1] != 3:
        raise ValueError(f"colourfulness needs RGB (C = 3) or grey (C = 1) images, got C = {images.shape[1]}")
    x = images.float().clamp(0, 1) * 255
    r, g, b = x[:, 0].flatten(1), x[:, 1].flatten(1), x[:, 2].flatten(1)
    rg, yb = r - g, (r + g) / 2 - b
    sd = (rg.var(1, unbiased=False) + yb.var(1, unbiased=False)).sqrt()
    mu = (rg.mean(1) ** 2 + yb.mean(1) ** 2).sqrt()
    return sd + 0.3 * mu


@register_reward("colourfulness",
                 "Hasler-Suesstrunk (2003) colourfulness on the 0..255 scale: >= 0, higher = more colourful",
                 aliases=("colorfulness",), listed=False)
def colourfulness(device: str | torch.device = "cpu") -> Any:
    """The aesthetic proxy of the colour model: :func:`colourfulness_score`. Differentiable."""

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        return colourfulness_score(images), {}

    return fn


# ITU-R BT.601 luma weights: the Y that JPEG codes (and PIL's convert("L")).
LUMA = (0.299, 0.587, 0.114)


def rms_contrast_score(images: torch.Tensor) -> torch.Tensor:
    """RMS contrast (Peli 1990) of each image: the population standard deviation of its luma Y in [0, 1]
    (Y = 0.299 R + 0.587 G + 0.114 B on the [0, 1] values, JPEG's luma). 0 for a flat image, 0.5 at most (half the
    pixels black, half white). Grey images (C = 1) are their own luma. Differentiable (except at a flat image)."""
    if images.dim() != 4:
        raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
    x = images.float().clamp(0, 1)
    if x.shape[1] == 3:
        y = sum(w * x[:, i] for i, w in enumerate(LUMA))
    elif x.shape[1] == 1:
        y = x[:, 0]
    else:
        raise ValueError(f"rms_contrast needs RGB (C = 3) or grey (C = 1) images, got C = {images.shape[1]}")
    return y.flatten(1).var(1, unbiased=False).sqrt()


@register_reward("rms_contrast",
                 "RMS contrast (Peli 1990): sd of the luma in [0, 1], 0..0.5, higher = bolder, more detailed image",
                 aliases=("contrast",), listed=False)
def rms_contrast(device: str | torch.device = "cpu") -> Any:
    """The aesthetic proxy of the colour model's demo pair: :func:`rms_contrast_score`. Differentiable."""

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        return rms_contrast_score(images), {}

    return fn
