"""Compatibility: the generation helpers moved to :mod:`diffblend.generation` (the application layer);
``shipped_adapters`` lists the embedded model's adapters (``zoo/adapters``)."""

from __future__ import annotations

from ..generation import (adapters_in, generate, image_format, image_grid, load_blend_pipeline, load_pipeline,
                          resolve_weight_names, save_png, score_images, shipped_adapters)

__all__ = ["adapters_in", "shipped_adapters", "load_pipeline", "load_blend_pipeline", "resolve_weight_names",
           "generate", "score_images", "image_grid", "save_png", "image_format"]
