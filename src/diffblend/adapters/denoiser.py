"""A blended model as a denoiser for the project's own sampler (``core.sample``)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..core.blend import Blend
from ..core.sampling import Denoiser, cfg_denoiser
from .blender import Blender

__all__ = ["blend_denoiser"]


def blend_denoiser(model: torch.nn.Module, blend: Blend | None, *, mode: str = "auto", groups: int = 1,
                   guidance_scale: float = 1.0, uncond: Any = None, blender: Blender | None = None,
                   prepare: Any = None) -> Denoiser:
    """``denoiser(x_t, t, cond) -> pred`` running ``model`` (a UNet / transformer with LoRA adapters) as a blend.

    Args:
        model: the shared base with the adapters loaded (e.g. ``BlendPipeline.model``).
        blend: w, lambda, method, seed (:meth:`Blend.create` over the model's adapter names);
            None runs the base model; a one-hot w runs that single adapter.
        mode: "auto", "batched" or "sequential" (same numbers; see :mod:`.blender`).
        groups: how many stacked copies of the samples each call's batch holds: 1, or 2 when the
            caller wraps this denoiser in ``core.cfg_denoiser`` (rows ``[uncond; cond]``), so that
            LS draws the same model for both halves of a sample.
        guidance_scale, uncond: classifier-free guidance done here, in one call of 2B rows
            (then call ``core.sample`` with guidance_scale=1): pred_u + s (pred_c - pred_u).
        blender: reuse a :class:`Blender` (saves re-scanning the model's layers).
        prepare: ``(x, t, cond) -> kwargs``, the model's whole keyword arguments (a family whose call
            needs more than the sample, ``timestep`` and ``cond``, e.g. Flux; ``DiffusionModel.prepare``).

    The conditioning ``cond`` is the model's ``encoder_hidden_states`` tensor (B, L, D), or a dict
    of the model's keyword arguments, e.g. ``{"encoder_hidden_states": e, "added_cond_kwargs":
    {"text_embeds": ..., "time_ids": ...}}`` for SDXL. x_t is (B, C, H, W); t is (B,) or a scalar.
    """
    blender = blender or Blender(model, mode)
    if groups < 1:
        raise ValueError(f"groups must be >= 1, got {groups}")
    if guidance_scale != 1.0 and groups != 1:
        raise ValueError("guidance_scale != 1 does its own CFG: use groups=1")
    if guidance_scale != 1.0 and uncond is None:
        raise ValueError("guidance_scale != 1 needs the unconditional conditioning uncond")
    t_name = "timestep"

    def call(x: torch.Tensor, t: torch.Tensor, cond: Any, g: int) -> torch.Tensor:
        if prepare is not None:
            kw = prepare(x, t, cond)
        else:
            kw = dict(cond) if isinstance(cond, Mapping) else ({} if cond is None else {"encoder_hidden_states": cond})
            kw[blender._sample_arg] = x
            kw[t_name] = t
        kw["return_dict"] = False
        return blender.forward(model.forward, blend, g, (), kw, mode)[0]

    def make(g: int) -> Denoiser:
        def denoiser(x: torch.Tensor, t: torch.Tensor, cond: Any = None) -> torch.Tensor:
            return call(x, t, cond, g)

        denoiser.blend = blend  # type: ignore[attr-defined]
        denoiser.groups = g  # type: ignore[attr-defined]  (core.cfg_denoiser checks it for LS)
        return denoiser

    if guidance_scale == 1.0:
        return make(groups)
    guided = cfg_denoiser(make(2), guidance_scale, uncond)  # the one CFG: rows [uncond; cond] in one call
    guided.blend = blend  # type: ignore[attr-defined]
    return guided
