"""Per-family glue from a diffusers pipeline to a :class:`~diffblend.model.DiffusionModel`.

Each family encodes prompts with the pipeline's own ``encode_prompt`` and builds the extra
conditioning its ``__call__`` passes to the network (diffusers 0.42):

- ``sd`` (SD 1.5 and the embedded digits model): ``encoder_hidden_states``.
- ``sdxl``: + ``added_cond_kwargs = {text_embeds: pooled, time_ids}``, the time ids of
  ``_get_add_time_ids((H, W), (0, 0), (H, W))`` at the default size; the unconditional side comes
  from ``encode_prompt(do_classifier_free_guidance=True)`` (zeros under force_zeros_for_empty_prompt).
- ``sd3``: + ``pooled_projections``; flow matching on the scheduler's sigma grid (static shift).

A family is chosen from the network: a ``transformer`` is SD3-like (Flux pipelines are refused
with a clear error: their packed latents and ids are not wired here), a UNet with
``addition_embed_type == "text_time"`` is SDXL, any other UNet is SD-like.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .core.sampling import NoiseSchedule

__all__ = ["model_from_pipeline", "pipeline_family", "vae_decoder"]

Encode = Callable[[Sequence[str], bool], tuple[Any, Any]]


def pipeline_family(pipe: Any) -> str:
    """"sd", "sdxl" or "sd3" (module docstring); ValueError for a pipeline none of them fits."""
    if getattr(pipe, "transformer", None) is not None:
        if "Flux" in type(pipe).__name__:
            raise ValueError(f"{type(pipe).__name__}: Flux pipelines (packed latents, txt/img ids) are not "
                             f"supported by DiffusionModel yet; supported: SD 1.5, SDXL, SD3 and the digits model")
        return "sd3"
    unet = getattr(pipe, "unet", None)
    if unet is None:
        raise ValueError(f"pipe must have a 'unet' or a 'transformer' (a diffusers text-to-image pipeline), "
                         f"{type(pipe).__name__} has neither")
    if not hasattr(pipe, "encode_prompt"):
        raise ValueError("pipe must have the pipeline's encode_prompt (prompt, device, n, do_cfg)")
    return "sdxl" if getattr(unet.config, "addition_embed_type", None) == "text_time" else "sd"


def _sd(pipe: Any, dev: Callable[[], torch.device]) -> Encode:
    def encode(prompts: Sequence[str], cfg: bool):
        c, u = pipe.encode_prompt(list(prompts), dev(), 1, cfg)[:2]
        return {"encoder_hidden_states": c}, ({"encoder_hidden_states": u} if cfg else None)

    return encode


def _sdxl_time_ids(pipe: Any, pooled: torch.Tensor) -> torch.Tensor:
    size = (pipe.default_sample_size * pipe.vae_scale_factor,) * 2
    te2 = getattr(pipe, "text_encoder_2", None)
    proj = int(pooled.shape[-1]) if te2 is None else te2.config.projection_dim
    return pipe._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype, text_encoder_projection_dim=proj)


def _sdxl(pipe: Any, dev: Callable[[], torch.device]) -> Encode:
    def encode(prompts: Sequence[str], cfg: bool):
        c, u, pc, pu = pipe.encode_prompt(list(prompts), device=dev(), num_images_per_prompt=1,
                                          do_classifier_free_guidance=cfg)
        ids = _sdxl_time_ids(pipe, pc).to(pc.device)

        def cond(e: torch.Tensor, p: torch.Tensor) -> dict:
            return {"encoder_hidden_states": e,
                    "added_cond_kwargs": {"text_embeds": p, "time_ids": ids.repeat(p.shape[0], 1)}}

        return cond(c, pc), (cond(u, pu) if cfg else None)

    return encode


def _sd3(pipe: Any, dev: Callable[[], torch.device]) -> Encode:
    def encode(prompts: Sequence[str], cfg: bool):
        c, u, pc, pu = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, prompt_3=None, device=dev(),
                                          num_images_per_prompt=1, do_classifier_free_guidance=cfg)
        return ({"encoder_hidden_states": c, "pooled_projections": pc},
                {"encoder_hidden_states": u, "pooled_projections": pu} if cfg else None)

    return encode


_ENCODERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3}


def vae_decoder(vae: Any, chunk: int | None = None) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents -> images in [0, 1] as the pipelines decode: ``z / scaling (+ shift)`` (SDXL's
    latents_mean / std when configured), ``vae.decode``, [-1, 1] -> [0, 1]; without a VAE the
    network works in pixel space. ``chunk``: decode that many latents at a time (memory)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"decode_chunk must be an int >= 1 or None, got {chunk!r}")

    def decode(z: torch.Tensor) -> torch.Tensor:
        if vae is not None:
            cfg = vae.config
            mean, std = getattr(cfg, "latents_mean", None), getattr(cfg, "latents_std", None)
            if mean is not None and std is not None:
                shape = (1, -1) + (1,) * (z.dim() - 2)
                z = z * torch.tensor(std).view(shape).to(z) / cfg.scaling_factor + torch.tensor(mean).view(shape).to(z)
            else:
                z = z / cfg.scaling_factor + (getattr(cfg, "shift_factor", None) or 0.0)
            dtype = next(vae.parameters()).dtype
            z = torch.cat([vae.decode(p.to(dtype), return_dict=False)[0] for p in z.split(chunk or len(z))])
        return (z.float() / 2 + 0.5).clamp(0, 1)

    return decode


def _flow_grid(scheduler: Any) -> Callable[[int], torch.Tensor]:
    """num_steps -> the scheduler's (N + 1,) sigmas (a fresh copy of it, so the pipeline's is untouched)."""
    if getattr(scheduler.config, "use_dynamic_shifting", False):
        raise ValueError(f"{type(scheduler).__name__} uses dynamic shifting (resolution-dependent mu), which "
                         f"DiffusionModel does not wire; use a static-shift flow scheduler")

    def sigmas(num_steps: int) -> torch.Tensor:
        s = type(scheduler).from_config(scheduler.config)
        s.set_timesteps(num_steps, device="cpu")
        return s.sigmas.float()

    return sigmas


def _schedule_kwargs(pipe: Any, family: str) -> dict:
    sched = pipe.scheduler
    if family == "sd3":
        return {"schedule": None, "flow_sigmas": _flow_grid(sched),
                "time_scale": float(getattr(sched.config, "num_train_timesteps", 1000))}
    cfg = sched.config
    return {"schedule": NoiseSchedule.from_scheduler(sched),
            "timestep_spacing": getattr(cfg, "timestep_spacing", "leading"),
            "steps_offset": int(getattr(cfg, "steps_offset", 0))}


def model_from_pipeline(cls: type, pipe: Any, device: Any = None, decode_chunk: int | None = None) -> Any:
    """The :class:`~diffblend.model.DiffusionModel` of ``pipe`` (see the module docstring)."""
    if getattr(pipe, "scheduler", None) is None:
        raise ValueError("pipe must have a 'scheduler' (a diffusers text-to-image pipeline), it has none")
    family = pipeline_family(pipe)
    if device is not None:
        pipe.to(device)
    for name in ("text_encoder", "text_encoder_2", "text_encoder_3", "vae"):
        mod = getattr(pipe, name, None)
        if isinstance(mod, torch.nn.Module):
            mod.requires_grad_(False)
    component = "transformer" if family == "sd3" else "unet"
    network = getattr(pipe, component)
    enc = _ENCODERS[family](pipe, lambda: next(network.parameters()).device)

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Any:
        return enc(prompts, False)[0]

    @torch.no_grad()
    def uncond() -> Any:
        return enc([""], True)[1]

    size = network.config.sample_size
    h, w = (size, size) if isinstance(size, int) else tuple(size)
    return cls(network=network, encode=encode, decode=vae_decoder(getattr(pipe, "vae", None), decode_chunk),
               latent_shape=(network.config.in_channels, h, w), uncond_fn=uncond, component=component,
               pipeline_class=type(pipe), family=family, **_schedule_kwargs(pipe, family))


def absent_components(folder: Any) -> dict[str, None]:
    """``{name: None}`` for the components a pipeline folder's class takes but its model_index.json
    does not list or lists as ``[null, null]`` (e.g. SD3 saved without its T5: ``text_encoder_3`` /
    ``tokenizer_3``, which diffusers 0.42 then refuses to load unless passed), so that
    ``from_pretrained(folder, **absent_components(folder))`` loads it as it was saved."""
    import importlib
    import inspect
    import json
    from pathlib import Path

    index = json.loads((Path(folder) / "model_index.json").read_text())
    cls = getattr(importlib.import_module("diffusers"), str(index.get("_class_name")), None)
    if cls is None:
        return {}
    params = inspect.signature(cls.__init__).parameters
    return {n: None for n, p in params.items() if n != "self" and p.default is inspect.Parameter.empty
            and p.kind is p.POSITIONAL_OR_KEYWORD and (index.get(n) or [None])[0] is None}
