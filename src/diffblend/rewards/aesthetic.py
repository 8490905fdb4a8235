"""``aesthetic``: the LAION aesthetic predictor v2 (an MLP on the L2-normalised CLIP ViT-L/14 image embedding).

The head is the original ``improved-aesthetic-predictor`` MLP (e.g. ``sac+logos+ava1-l14-linearMSE.pth``):
``Linear(D, 1024), Dropout, Linear(1024, 128), Dropout, Linear(128, 64), Dropout, Linear(64, 16), Linear(16, 1)``
with its original state-dict keys ``layers.{0,2,4,6,7}.{weight,bias}``, read from a ``.pth`` (loaded with
``torch.load(weights_only=True)``) or the same keys in a ``.safetensors``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ._loading import cached, load_state_dict, local_file
from .clip import load_clip
from .registry import register_reward

__all__ = ["AestheticHead", "load_aesthetic_head", "aesthetic"]


class AestheticHead(nn.Module):
    """The LAION MLP; ``layers`` indices match the original state dict (dropout is a no-op in eval)."""

    def __init__(self, dim: int = 768):
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(dim, 1024), nn.Dropout(0.2), nn.Linear(1024, 128), nn.Dropout(0.2),
            nn.Linear(128, 64), nn.Dropout(0.1), nn.Linear(64, 16), nn.Linear(16, 1))

    def forward(self, emb: torch.Tensor) -> torch.Tensor:  # (B, D) unit embeddings -> (B,)
        return self.layers(emb)[:, 0]


def load_aesthetic_head(head: Any, device: str | torch.device = "cpu") -> AestheticHead:
    """The head from ``head`` (.pth / .pt / .safetensors with keys ``layers.{0,2,4,6,7}.*``), in float32, eval."""
    file = local_file(head, "aesthetic", "head")
    sd = load_state_dict(file)
    if "layers.0.weight" not in sd:
        raise ValueError(f"aesthetic head {file} has no 'layers.0.weight'; expected the LAION MLP's keys "
                         f"layers.{{0,2,4,6,7}}.{{weight,bias}}, got {sorted(sd)[:6]}")
    model = AestheticHead(sd["layers.0.weight"].shape[1])
    model.load_state_dict(sd)  # strict: a wrong file fails here, naming the keys
    return model.to(device).eval().requires_grad_(False)


@register_reward("aesthetic", "LAION aesthetic predictor v2 on CLIP ViT-L/14: about 1..10, higher = more "
                              "aesthetic (needs path=CLIP folder and head=MLP .pth/.safetensors)", needs_model=True)
def aesthetic(device: str | torch.device = "cpu", path: str = "openai/clip-vit-large-patch14", head: Any = None,
              dtype: Any = None) -> Any:
    """LAION aesthetic score: ``MLP(E_image / |E_image|)`` with E_image the CLIP projected image embedding.

    Range about 1..10 (the AVA rating scale), higher = more aesthetic. The head runs in float32 on
    the embedding; the CLIP model in ``dtype``. Prompts are not used. Differentiable w.r.t. the images.
    """
    mlp = cached(("aesthetic_head", str(head), str(torch.device(device))), lambda: load_aesthetic_head(head, device))
    clip = load_clip(path, device, dtype, None, "aesthetic")
    dim = clip.model.config.projection_dim
    if mlp.layers[0].in_features != dim:
        raise ValueError(f"aesthetic head takes {mlp.layers[0].in_features}-d embeddings but the CLIP model at "
                         f"{path!r} makes {dim}-d ones (the LAION heads expect ViT-L/14: 768)")

    def fn(images: torch.Tensor, prompts: Sequence[str] = (), metadata: Any = None) -> tuple[torch.Tensor, dict]:
        return mlp(clip.image_embeds(images)).to(images.device), {}

    return fn
