"""Rewarded Soup (Rame et al., NeurIPS 2023), the main baseline of Diffusion Blend (Sec. 5).

One model whose weights interpolate the fine-tuned ones: ``theta(w) = theta_pre + sum_i w_i (theta_i -
theta_pre)``. With LoRA adapters, adapter i changes a base weight W by ``dW_i = s_i B_i A_i``
(s_i = lora_alpha / r), so the soup of the adapters is, for every adapted layer,

    W(w, lambda) = W + lambda * sum_i w_i * s_i * B_i A_i                                   (exact)

with lambda the same KL strength as DB-KLA (lambda = 1: the plain soup). This is what peft's
``add_weighted_adapter(..., combination_type="cat")`` builds (A and B concatenated along the rank,
so that B_cat A_cat = sum_i w_i B_i A_i). diffblend evaluates it without building anything: the
layer runs ``W x + sum_i (lambda w_i s_i) B_i A_i x`` (all adapters active, scalings multiplied by
lambda * w_i; ``adapters._compat.scaled_sum``), so changing w costs nothing and one forward per
step is needed (cost ~1x the base plus m small rank-r products).

How the authors' public code differs: it interpolates the LoRA factors separately,
``A(w) = sum_i w_i A_i`` and ``B(w) = sum_i w_i B_i``, so its update is
``B(w) A(w) = sum_i sum_j w_i w_j B_i A_j``: the cross terms B_i A_j (i != j) are not an
interpolation of the fine-tuned models (for w = (0.5, 0.5) each adapter's own update enters with
weight 0.25 and the cross terms make up the rest). Their numbers for RS are for that variant.

Use it through the same API as the blend: ``BlendPipeline(...)(prompt, weights=w, method="soup")``,
or :func:`soup_delta` to export the merged update of one layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

__all__ = ["soup_delta", "factor_interpolation_delta"]


def soup_delta(layer: torch.nn.Module, scales: Mapping[str, float]) -> torch.Tensor:
    """sum_i scales[i] * s_i * B_i A_i for one peft LoRA Linear layer; (out_features, in_features).

    Args:
        layer: a peft ``lora.Linear`` holding the adapters named in ``scales``.
        scales: ``{adapter: lambda * w_i}``.
    """
    out = None
    for name, scale in scales.items():
        if name not in layer.lora_A:
            continue
        a, b = layer.lora_A[name].weight, layer.lora_B[name].weight  # (r, in), (out, r)
        term = float(scale) * layer.scaling[name] * (b.flatten(1) @ a.flatten(1))
        out = term if out is None else out + term
    if out is None:
        base = layer.get_base_layer().weight
        out = torch.zeros(base.shape[0], base[0].numel(), dtype=base.dtype, device=base.device)
    return out


def factor_interpolation_delta(layer: torch.nn.Module, scales: Mapping[str, float]) -> torch.Tensor:
    """The authors' variant, for comparison only: (sum_i w_i s_i B_i) (sum_i w_i A_i).

    Not a soup of the adapters' updates (it has the cross terms B_i A_j); see the module docstring.
    """
    names = [n for n in scales if n in layer.lora_A]
    a = sum(float(scales[n]) * layer.lora_A[n].weight.flatten(1) for n in names)
    b = sum(float(scales[n]) * layer.scaling[n] * layer.lora_B[n].weight.flatten(1) for n in names)
    return b @ a
