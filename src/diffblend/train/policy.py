"""The diffusion model as an RL policy: the project's one model interface, under its trainer names.

:class:`DiffusionPolicy` is :class:`diffblend.model.DiffusionModel` (a network with adapters, its
schedule, ``encode`` / ``decode``, denoisers and transitions); ``unet_denoiser`` is
:func:`diffblend.model.network_denoiser`. Any pipeline family the model interface supports
(SD 1.5, SDXL, SD3, the embedded digits model) is trained through it.
"""

from __future__ import annotations

from ..model import DiffusionModel, network_denoiser

__all__ = ["DiffusionPolicy", "unet_denoiser"]

DiffusionPolicy = DiffusionModel
unet_denoiser = network_denoiser
