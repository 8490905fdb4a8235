"""The diffusion model as an RL policy: a UNet with a LoRA adapter, its prompt encoder and decoder.

Any diffusers text-to-image pipeline with a ``unet``, an SD-like ``encode_prompt`` and a DDIM/DDPM
style ``scheduler`` (optionally a ``vae``) becomes a :class:`DiffusionPolicy` with
:meth:`DiffusionPolicy.from_pipeline`; tests build one by hand from a tiny UNet.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from diffblend.core import NoiseSchedule

__all__ = ["DiffusionPolicy", "unet_denoiser"]


def unet_denoiser(unet: Callable) -> Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]:
    """The core's denoiser contract over a diffusers UNet: ``(x_t, t, cond) -> prediction``.

    ``cond`` is the prompt embedding (B, L, D) passed as ``encoder_hidden_states``. ``unet`` may be
    wrapped (DistributedDataParallel under accelerate): only its call is used.
    """

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        return unet(x, t, encoder_hidden_states=cond, return_dict=False)[0]

    return denoiser


@dataclass
class DiffusionPolicy:
    """What the trainer needs from a model.

    Attributes:
        unet: the noise-prediction network (a diffusers model with peft adapter support).
        schedule: its noise schedule (prediction type included).
        encode: ``prompts -> (B, L, D)`` embeddings; ``encode([""])`` is the unconditional one.
        decode: latents (B, C, h, w) -> images (B, 3 or 1, H, W) in [0, 1].
        latent_shape: (C, h, w) of one latent.
    """

    unet: torch.nn.Module
    schedule: NoiseSchedule
    encode: Callable[[Sequence[str]], torch.Tensor]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, int, int]
    timestep_spacing: str = "leading"  # as the scheduler's config (diffusers' set_timesteps)
    steps_offset: int = 0

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """(num_steps,) descending inference timesteps, as the pipeline's scheduler makes them."""
        return self.schedule.timesteps(num_steps, self.timestep_spacing, self.steps_offset)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None) -> DiffusionPolicy:
        """Wrap a diffusers pipeline (duck-typed: ``unet``, ``scheduler``, ``encode_prompt``, opt. ``vae``).

        The text encoder and VAE are frozen; images are decoded as diffusers does,
        ``vae.decode(z / scaling_factor)`` then [-1, 1] -> [0, 1]; without a VAE the UNet works in
        pixel space and x in [-1, 1] is mapped to [0, 1].
        """
        for name in ("unet", "scheduler"):
            if getattr(pipe, name, None) is None:
                raise ValueError(f"pipe must have a {name!r} (a diffusers text-to-image pipeline), it has none")
        if not hasattr(pipe, "encode_prompt"):
            raise ValueError("pipe must have an SD-like encode_prompt(prompt, device, num_images_per_prompt, cfg)")
        if device is not None:
            pipe.to(device)
        for name in ("text_encoder", "vae"):
            mod = getattr(pipe, name, None)
            if isinstance(mod, torch.nn.Module):
                mod.requires_grad_(False)
        unet = pipe.unet
        dev = lambda: next(unet.parameters()).device  # noqa: E731  (follows later .to() calls)

        @torch.no_grad()
        def encode(prompts: Sequence[str]) -> torch.Tensor:
            return pipe.encode_prompt(list(prompts), dev(), 1, False)[0]

        vae = getattr(pipe, "vae", None)

        def decode(z: torch.Tensor) -> torch.Tensor:
            if vae is not None:
                z = vae.decode(z / vae.config.scaling_factor, return_dict=False)[0]
            return (z / 2 + 0.5).clamp(0, 1)

        size = unet.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        cfg = pipe.scheduler.config
        return cls(unet=unet, schedule=NoiseSchedule.from_scheduler(pipe.scheduler), encode=encode,
                   decode=decode, latent_shape=(unet.config.in_channels, h, w),
                   timestep_spacing=getattr(cfg, "timestep_spacing", "leading"),
                   steps_offset=int(getattr(cfg, "steps_offset", 0)))
