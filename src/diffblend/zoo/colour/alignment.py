"""The colour default model's ``prompt_alignment`` reward (the role of ImageReward in the paper), registered
by the zoo plug-in (``zoo/plugin.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["PROMPT_ALIGNMENT", "prompt_alignment"]

PROMPT_ALIGNMENT = ("sum over the attributes a colour-scene prompt names of their log-probability under the shipped "
                    "attribute classifier: <= 0, higher = closer to the prompt")


def prompt_alignment(device: str | torch.device = "cpu", path: str | None = None) -> Any:
    """``sum_a log p(a = prompted value | image)`` over the attributes the prompt names (``zoo.colour``).

    Prompts follow ``zoo.colour.data``'s grammar (``"a small red triangle on a striped blue background"``;
    partial prompts score only what they name). ``path``: a classifier folder (default: the shipped one).
    Differentiable. ``info``: ``correct`` (1 when every named attribute is the classifier's argmax) and
    ``prob_<attribute>`` (p of the prompted value; NaN where the prompt does not name it).
    """
    from .classifier import load_attribute_classifier
    from .data import ATTRIBUTES, attribute_targets

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
