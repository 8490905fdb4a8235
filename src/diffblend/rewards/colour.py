"""Rewards of the colour default model: ``colourfulness`` (the aesthetic proxy) and ``prompt_alignment``.

Registered ``listed=False``: they resolve by name everywhere, but stay out of ``available_rewards()``'s
default list, which the digits model's paths score every image with. Each factory returns ``fn(images, prompts, metadata) -> (scores, info)`` with images (B, C, H, W)
float in [0, 1] and scores (B,) float32 on the images' device, higher is better.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .registry import register_reward

__all__ = ["colourfulness", "colourfulness_score", "prompt_alignment"]


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


@register_reward(
    "prompt_alignment",
    "sum over the attributes a colour-scene prompt names of their log-probability under the shipped "
    "attribute classifier: <= 0, higher = closer to the prompt",
    listed=False,
)
def prompt_alignment(device: str | torch.device = "cpu", path: str | None = None) -> Any:
    """``sum_a log p(a = prompted value | image)`` over the attributes the prompt names (``zoo.colour``).

    Prompts follow ``zoo.colour.data``'s grammar (``"a small red triangle on a striped blue background"``;
    partial prompts score only what they name). ``path``: a classifier folder (default: the shipped one).
    Differentiable. ``info``: ``correct`` (1 when every named attribute is the classifier's argmax) and
    ``prob_<attribute>`` (p of the prompted value; NaN where the prompt does not name it).
    """
    from ..zoo.colour.classifier import load_attribute_classifier
    from ..zoo.colour.data import ATTRIBUTES, attribute_targets

    clf = load_attribute_classifier(path, device=device)
    dev = next(clf.parameters()).device

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        if len(prompts) != images.shape[0]:
            raise ValueError(f"prompt_alignment needs one prompt per image: {len(prompts)} prompts, "
                             f"{images.shape[0]} images")
        targets = attribute_targets(prompts)
        logits = clf(images.float().to(dev))
        score = torch.zeros(images.shape[0], device=dev)
        correct = torch.ones(images.shape[0], dtype=torch.bool, device=dev)
        info = {}
        for k in ATTRIBUTES:
            y = targets[k].to(dev)
            named = y >= 0
            logp = torch.log_softmax(logits[k], 1).gather(1, y.clamp(min=0)[:, None])[:, 0]
            score = score + torch.where(named, logp, torch.zeros_like(logp))
            correct &= ~named | (logits[k].argmax(1) == y)
            info[f"prob_{k}"] = torch.where(named, logp.exp(), torch.full_like(logp, float("nan"))).detach().to(images.device)
        info["correct"] = correct.float().to(images.device)
        return score.to(images.device), info

    return fn
