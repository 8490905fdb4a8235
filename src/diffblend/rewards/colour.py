"""``colourfulness`` (Hasler and Suesstrunk 2003), the aesthetic proxy of the colour default model; its
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

__all__ = ["colourfulness", "colourfulness_score"]


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
