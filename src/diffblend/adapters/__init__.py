"""Everything that touches diffusers / peft internals: loading LoRA adapters onto one shared base
model and running that model as a blend (per-sample adapter batches or sequential forwards).

Version requirements are checked in :mod:`._compat` (the only module that reads peft layer state).
"""

from .blender import MODES, Blender, resolve_mode
from .denoiser import blend_denoiser
from .loading import AdapterError, check_fits, load_adapter, read_adapter

__all__ = ["MODES", "Blender", "resolve_mode", "blend_denoiser", "AdapterError", "check_fits", "load_adapter",
           "read_adapter"]
