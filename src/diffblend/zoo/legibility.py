"""The ``legibility`` reward of the embedded digits model (registered by :mod:`diffblend.zoo.plugin`)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from .classifier import load_classifier
from .data import parse_digit

__all__ = ["digits_from", "legibility"]

def digits_from(prompts: Sequence[str], metadata: Any, batch: int) -> torch.Tensor:
    """(B,) the digit each image should show: ``metadata[i]["digit"]`` if given, else parsed from the prompt."""
    if isinstance(metadata, dict):
        metadata = [metadata] * batch
    out = []
    for i in range(batch):
        meta = metadata[i] if metadata is not None and i < len(metadata) and metadata[i] else {}
        if "digit" in meta:
            out.append(int(meta["digit"]))
        elif prompts is not None and i < len(prompts):
            out.append(parse_digit(prompts[i]))
        else:
            raise ValueError(f"legibility needs a prompt or metadata['digit'] for image {i}")
    d = torch.tensor(out, dtype=torch.long)
    if ((d < 0) | (d > 9)).any():
        raise ValueError(f"digits must be in 0..9, got {d.tolist()}")
    return d


def legibility(device: str | torch.device = "cpu", path: str | None = None) -> Any:
    """``log p(digit | image)`` under the project's digit classifier (``zoo.classifier``).

    The analogue of prompt alignment for the digits model. Range (-inf, 0], higher = more legible
    (0 = certain). The digit comes from ``metadata["digit"]`` or from the prompt (``"7"``,
    ``"a digit seven"``...). ``path``: a classifier folder (default: the shipped one). Differentiable.
    ``info``: ``prob`` (p of the prompted digit) and ``correct`` (argmax == digit).
    """
    clf = load_classifier(path, device=device)
    dev = next(clf.parameters()).device

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        if images.dim() != 4:
            raise ValueError(f"images must have shape (B, C, H, W), got {tuple(images.shape)}")
        digits = digits_from(prompts, metadata, images.shape[0]).to(dev)
        logp = torch.log_softmax(clf(images.float().to(dev)), dim=1)
        score = logp.gather(1, digits[:, None])[:, 0]
        info = {"prob": score.exp().detach().to(images.device),
                "correct": (logp.argmax(1) == digits).float().to(images.device)}
        return score.to(images.device), info

    return fn
