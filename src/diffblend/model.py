"""One model interface for every diffusers family: what the trainer, the sweep and generation need.

A :class:`DiffusionModel` is a denoising network (a UNet or a transformer, where adapters go) with

- its schedule: a discrete VP schedule (SD 1.5, SDXL, the embedded digits model: DDIM grid of
  integer timesteps) or a flow-matching sigma grid (SD3, Flux: the model sees ``sigma * T``);
- ``encode(prompts)``: the conditioning as the network's keyword arguments, batch-first
  (``encoder_hidden_states``; SDXL adds ``added_cond_kwargs`` = pooled text embeds + time ids;
  SD3 ``pooled_projections``), and :meth:`DiffusionModel.uncond`, the unconditional one;
- ``decode(latents) -> images`` in [0, 1] (the VAE's scaling / shift, optionally in chunks);
- denoisers in the core's ``(x_t, t, cond) -> prediction`` contract (:meth:`denoiser`), guided
  once, as a closure (:meth:`guide` over ``core.cfg_denoiser``), and a stochastic transition per
  step with its log-probability (:meth:`transition`: DDIM with eta, or the flow SDE with a noise level).

Build one from a pipeline with :meth:`DiffusionModel.from_pipeline` (families in
:mod:`diffblend.families`); tests build one by hand from a tiny UNet and an ``encode`` function.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .core.flow import flow_sde_step, sample_flow
from .core.sampling import (NoiseSchedule, SampleOutput, StepOutput, _bcast, cfg_denoiser, ddim_step, map_cond,
                            sample)

__all__ = ["DiffusionModel", "network_denoiser", "cond_kwargs"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, Any], torch.Tensor]


def cond_kwargs(cond: Any) -> dict:
    """The network's keyword arguments for a conditioning: a dict as it is, a tensor as
    ``encoder_hidden_states``, None as nothing."""
    if cond is None:
        return {}
    return dict(cond) if isinstance(cond, dict) else {"encoder_hidden_states": cond}


Prepare = Callable[[torch.Tensor, torch.Tensor, Any], dict]


def network_denoiser(network: Callable, prepare: Prepare | None = None) -> Denoiser:
    """The core's denoiser contract over a diffusers UNet / transformer: ``(x_t, t, cond) -> prediction``.

    ``network`` may be wrapped (DistributedDataParallel under accelerate): only its call is used.
    ``prepare(x, t, cond) -> kwargs``: the network's whole keyword arguments, for families whose call
    needs more than ``(x, timestep=t, **cond)`` (Flux: ids from the shapes, timestep / 1000).
    """

    def denoiser(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        if prepare is not None:
            return network(**prepare(x, t, cond), return_dict=False)[0]
        return network(x, timestep=t, **cond_kwargs(cond), return_dict=False)[0]

    return denoiser


def _embedded_guidance(denoiser: Denoiser, guidance_scale: float) -> Denoiser:
    """``denoiser`` with the conditioning's ``guidance`` input set to ``guidance_scale`` for every row."""
    scale = float(guidance_scale)

    def guided(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
        return denoiser(x, t, {**cond, "guidance": torch.full((x.shape[0],), scale, device=x.device,
                                                              dtype=torch.float32)})

    guided.blend = getattr(denoiser, "blend", None)  # type: ignore[attr-defined]
    return guided


@dataclass
class DiffusionModel:
    """A denoising network with its schedule, conditioning and decoder (module docstring).

    Attributes:
        network: the UNet / transformer (a diffusers model with peft adapter support).
        schedule: the VP noise schedule (prediction type included); None for flow matching.
        encode: ``prompts -> cond`` (a tensor (B, L, D) or a dict of the network's keyword arguments).
        decode: latents (B, C, h, w) -> images (B, 3 or 1, H, W) in [0, 1].
        latent_shape: (C, h, w) of one latent.
        timestep_spacing, steps_offset: the VP scheduler's grid (diffusers' set_timesteps).
        flow_sigmas: flow matching: ``num_steps -> (N + 1,)`` descending sigmas ending at 0.
        time_scale: flow matching: the network sees ``sigma * time_scale``.
        uncond_fn: the unconditional conditioning (batch 1); default ``encode([""])``.
        component, pipeline_class: where adapter files go (``unet`` / ``transformer``) and the
            pipeline class whose ``save_lora_weights`` writes them.
        prepare: ``(x, t, cond) -> the network's keyword arguments`` when the plain call does not
            fit (Flux); see :func:`network_denoiser`.
        guidance_embed: the network takes the guidance scale as an input (guidance-distilled Flux):
            :meth:`guide` sets it instead of running classifier-free guidance.
    """

    network: torch.nn.Module
    schedule: NoiseSchedule | None
    encode: Callable[[Sequence[str]], Any]
    decode: Callable[[torch.Tensor], torch.Tensor]
    latent_shape: tuple[int, ...]
    timestep_spacing: str = "leading"
    steps_offset: int = 0
    flow_sigmas: Callable[[int], torch.Tensor] | None = None
    time_scale: float = 1000.0
    uncond_fn: Callable[[], Any] | None = None
    component: str = "unet"
    pipeline_class: Any = None
    family: str = "custom"
    prepare: Prepare | None = None
    guidance_embed: bool = False
    _uncond: Any = field(default=None, repr=False)

    # -- identity ---------------------------------------------------------------------------------
    @property
    def unet(self) -> torch.nn.Module:
        """The network (the trainer's historical name for it, whatever the family)."""
        return self.network

    @property
    def is_flow(self) -> bool:
        return self.flow_sigmas is not None

    @property
    def device(self) -> torch.device:
        return next(self.network.parameters()).device

    @classmethod
    def from_pipeline(cls, pipe: Any, device: torch.device | str | None = None, *,
                      decode_chunk: int | None = None) -> DiffusionModel:
        """Wrap a diffusers pipeline (SD 1.5, SDXL, SD3, Flux, the embedded digits model; see
        :mod:`diffblend.families`). Text encoders and VAE are frozen."""
        from .families import model_from_pipeline

        return model_from_pipeline(cls, pipe, device, decode_chunk)

    # -- conditioning -----------------------------------------------------------------------------
    def uncond(self) -> Any:
        """The unconditional conditioning, batch 1 (computed once)."""
        if self._uncond is None:
            self._uncond = self.uncond_fn() if self.uncond_fn is not None else self.encode([""])
        return self._uncond

    def denoiser(self, network: Callable | None = None) -> Denoiser:
        """``(x_t, t, cond) -> prediction`` of ``network`` (default this model's; e.g. its DDP wrapper)."""
        return network_denoiser(self.network if network is None else network, self.prepare)

    def guide(self, denoiser: Denoiser, guidance_scale: float, uncond: Any = None) -> Denoiser:
        """``denoiser`` with classifier-free guidance (``core.cfg_denoiser``; the unconditional
        conditioning expanded to each call's batch); the denoiser itself when the scale is 1.
        A guidance-distilled network (``guidance_embed``) gets the scale as its ``guidance`` input
        instead, as ``FluxPipeline``'s ``guidance_scale``: one pass, no unconditional rows."""
        if self.guidance_embed:
            return _embedded_guidance(denoiser, guidance_scale)
        if guidance_scale == 1.0:
            return denoiser
        u = self.uncond() if uncond is None else uncond
        closures: dict[int, Denoiser] = {}

        def guided(x: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor:
            B = x.shape[0]
            if B not in closures:
                closures[B] = cfg_denoiser(denoiser, guidance_scale, map_cond(u, lambda v: v.expand(B, *v.shape[1:])))
            return closures[B](x, t, cond)

        guided.blend = getattr(denoiser, "blend", None)  # type: ignore[attr-defined]
        return guided

    # -- the step grid ----------------------------------------------------------------------------
    def grid(self, num_steps: int) -> torch.Tensor:
        """VP: (N,) descending integer timesteps; flow: (N + 1,) descending sigmas ending at 0."""
        if self.is_flow:
            return torch.as_tensor(self.flow_sigmas(num_steps), dtype=torch.float32).cpu()
        return self.schedule.timesteps(num_steps, self.timestep_spacing, self.steps_offset)

    def timesteps(self, num_steps: int) -> torch.Tensor:
        """(N,) the values the network is called with at each step (VP: t; flow: sigma * time_scale)."""
        g = self.grid(num_steps)
        return g[:-1] * self.time_scale if self.is_flow else g

    def pairs(self, grid: torch.Tensor) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """(from, to) of each transition: (t, t_prev) with -1 after the last VP step; (sigma, sigma_next)."""
        if self.is_flow:
            return [(grid[i], grid[i + 1]) for i in range(len(grid) - 1)]
        return [(grid[i], grid[i + 1] if i + 1 < len(grid) else torch.tensor(-1)) for i in range(len(grid))]

    def model_time(self, point: torch.Tensor) -> torch.Tensor:
        """The network's timestep at a grid point."""
        return point * self.time_scale if self.is_flow else point

    # -- steps and sampling -----------------------------------------------------------------------
    def transition(self, pred: torch.Tensor, point: torch.Tensor, nxt: torch.Tensor, x_t: torch.Tensor,
                   stochasticity: float, *, generator: Any = None, prev_sample: torch.Tensor | None = None,
                   noise: torch.Tensor | None = None) -> StepOutput:
        """One step point -> nxt with its Gaussian (DDIM eta = stochasticity, or the flow SDE with
        noise_level = stochasticity); ``prev_sample`` re-scores a stored transition."""
        if self.is_flow:
            return flow_sde_step(pred, point, nxt, x_t, stochasticity, generator, prev_sample, noise=noise)
        return ddim_step(pred, point, x_t, self.schedule, nxt, stochasticity, generator=generator,
                         prev_sample=prev_sample, noise=noise)

    def to_eps(self, pred: torch.Tensor, x_t: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """The noise estimate of a prediction (flow: eps = x + (1 - sigma) v); point scalar or (B,)."""
        if self.is_flow:
            return x_t + (1 - _bcast(point, x_t)) * pred
        return self.schedule.to_eps_x0(pred, x_t, point)[0]

    def add_noise(self, x0: torch.Tensor, noise: torch.Tensor, point: torch.Tensor) -> torch.Tensor:
        """The forward process at grid points (scalar or (B,)): VP sqrt(alpha_bar) x0 + sqrt(1 - alpha_bar) noise;
        flow (1 - sigma) x0 + sigma noise."""
        if self.is_flow:
            sigma = _bcast(point, x0)
            return (1 - sigma) * x0 + sigma * noise
        return self.schedule.add_noise(x0, noise, point)

    def sample(self, denoiser: Denoiser, x: torch.Tensor, grid: torch.Tensor, cond: Any, stochasticity: float, *,
               generators: Any = None, keep_trajectory: bool = False, callback: Any = None) -> SampleOutput:
        """The reverse process from x over ``grid`` (see :meth:`grid`): DDIM or the flow SDE / ODE."""
        if self.is_flow:
            return sample_flow(denoiser, x, grid, cond, noise_level=stochasticity, generators=generators,
                               keep_trajectory=keep_trajectory, callback=callback, time_scale=self.time_scale)
        return sample(denoiser, x, self.schedule, grid, cond, eta=stochasticity, generators=generators,
                      keep_trajectory=keep_trajectory, callback=callback)

    # -- adapters -----------------------------------------------------------------------------------
    def save_adapter(self, path: Any) -> Any:
        """Write the network's trained adapter as a diffusers LoRA file its pipeline class loads."""
        from .train.lora import save_lora

        return save_lora(self.network, path, pipeline_class=self.pipeline_class, component=self.component)
