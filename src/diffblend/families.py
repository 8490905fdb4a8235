"""Per-family glue from a diffusers pipeline to a :class:`~diffblend.model.DiffusionModel`.

Each family encodes prompts with the pipeline's own ``encode_prompt`` and builds the extra
conditioning its ``__call__`` passes to the network (diffusers 0.42):

- ``sd`` (SD 1.5 and the embedded digits model): ``encoder_hidden_states``.
- ``sdxl``: + ``added_cond_kwargs = {text_embeds: pooled, time_ids}``, the time ids of
  ``_get_add_time_ids((H, W), (0, 0), (H, W))`` at the default size; the unconditional side comes
  from ``encode_prompt(do_classifier_free_guidance=True)`` (zeros under force_zeros_for_empty_prompt).
- ``sd3``: + ``pooled_projections``; flow matching on the scheduler's sigma grid.
- ``flux``: ``encoder_hidden_states`` (T5) + ``pooled_projections`` (CLIP) (+ ``guidance``, the
  distilled guidance embedding, when the transformer has one); latents are 2x2-packed tokens
  (B, N, 4C); the network is called with ``timestep = sigma`` (t / 1000), ``txt_ids`` and ``img_ids``
  built from the shapes (:func:`_flux_prepare`); the sigma grid uses Flux's dynamic shift
  (``mu`` from the number of image tokens), as ``FluxPipeline.__call__``.

A family is chosen from the pipeline: a ``transformer`` is Flux when the class name says so, else
SD3-like; a UNet with ``addition_embed_type == "text_time"`` is SDXL, any other UNet is SD-like.
Classifier-free guidance is the model's (``DiffusionModel.guide``, unconditional = the empty
prompt), except for a guidance-distilled Flux (a transformer with ``guidance_embeds``, e.g.
FLUX.1-dev): there the guidance scale is the transformer's guidance input, as ``FluxPipeline``'s
``guidance_scale`` (``DiffusionModel.guidance_embed``; one pass, no unconditional rows), so the
``--guidance-scale`` of ``finetune`` / ``sweep`` / ``generate`` drives it; ``FLUX_GUIDANCE`` is only the
value of an unguided denoiser's calls.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

from .core.sampling import NoiseSchedule

__all__ = ["FLUX_GUIDANCE", "absent_components", "image_size_multiple", "model_from_pipeline", "pipeline_family",
           "vae_decoder"]

FLUX_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale: a distilled transformer's input until guided

Encode = Callable[[Sequence[str], bool], tuple[Any, Any]]


def pipeline_family(pipe: Any) -> str:
    """"sd", "sdxl", "sd3" or "flux" (module docstring); ValueError for a pipeline none of them fits."""
    if getattr(pipe, "transformer", None) is not None:
        return "flux" if "Flux" in type(pipe).__name__ else "sd3"
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


def _flux(pipe: Any, dev: Callable[[], torch.device]) -> Encode:
    max_len = min(512, int(getattr(pipe.tokenizer_2, "model_max_length", 512)))
    distilled = bool(getattr(pipe.transformer.config, "guidance_embeds", False))

    def one(prompts: Sequence[str]) -> dict:
        e, p, _ = pipe.encode_prompt(prompt=list(prompts), prompt_2=None, device=dev(), num_images_per_prompt=1,
                                     max_sequence_length=max_len)
        cond = {"encoder_hidden_states": e, "pooled_projections": p}
        if distilled:
            cond["guidance"] = torch.full((len(prompts),), FLUX_GUIDANCE, device=e.device, dtype=torch.float32)
        return cond

    def encode(prompts: Sequence[str], cfg: bool):
        return one(prompts), (one([""] * len(prompts)) if cfg else None)

    return encode


def _flux_prepare(pipe: Any, tokens_hw: tuple[int, int]) -> Callable[[torch.Tensor, torch.Tensor, Any], dict]:
    """The Flux transformer's keyword arguments, as ``FluxPipeline.__call__`` builds them."""

    def prepare(x: torch.Tensor, t: torch.Tensor, cond: Any) -> dict:
        kw = dict(cond)
        kw.update(hidden_states=x, timestep=t / 1000,
                  txt_ids=torch.zeros(kw["encoder_hidden_states"].shape[1], 3, device=x.device, dtype=x.dtype),
                  img_ids=pipe._prepare_latent_image_ids(1, *tokens_hw, x.device, x.dtype))
        return kw

    return prepare


_ENCODERS = {"sd": _sd, "sdxl": _sdxl, "sd3": _sd3, "flux": _flux}


def vae_decoder(vae: Any, chunk: int | None = None, unpack: Callable | None = None
                ) -> Callable[[torch.Tensor], torch.Tensor]:
    """latents -> images in [0, 1] as the pipelines decode: ``z / scaling (+ shift)`` (SDXL's
    latents_mean / std when configured), ``vae.decode``, [-1, 1] -> [0, 1]; without a VAE the
    network works in pixel space. ``chunk``: decode that many latents at a time (memory); ``unpack``:
    packed tokens -> (B, C, h, w) first (Flux)."""
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"decode_chunk must be an int >= 1 or None, got {chunk!r}")

    def decode(z: torch.Tensor) -> torch.Tensor:
        z = z if unpack is None else unpack(z)
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


def _flow_grid(scheduler: Any, image_seq_len: int) -> Callable[[int], torch.Tensor]:
    """num_steps -> the scheduler's (N + 1,) sigmas (a fresh copy of it, so the pipeline's is untouched);
    with dynamic shifting, sigmas linspace(1, 1/N, N) and mu from the image's token count, as Flux /
    SD3's ``__call__`` pass them."""
    cfg = scheduler.config

    def sigmas(num_steps: int) -> torch.Tensor:
        import numpy as np
        from diffusers.pipelines.flux.pipeline_flux import calculate_shift

        s = type(scheduler).from_config(cfg)
        if getattr(cfg, "use_dynamic_shifting", False):
            mu = calculate_shift(image_seq_len, cfg.get("base_image_seq_len", 256), cfg.get("max_image_seq_len", 4096),
                                 cfg.get("base_shift", 0.5), cfg.get("max_shift", 1.15))
            s.set_timesteps(sigmas=np.linspace(1.0, 1 / num_steps, num_steps), device="cpu", mu=mu)
        else:
            s.set_timesteps(num_steps, device="cpu")
        return s.sigmas.float()

    return sigmas


def _schedule_kwargs(pipe: Any, family: str, image_seq_len: int) -> dict:
    sched = pipe.scheduler
    if family in ("sd3", "flux"):
        return {"schedule": None, "flow_sigmas": _flow_grid(sched, image_seq_len),
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
    component = "unet" if family in ("sd", "sdxl") else "transformer"
    network = getattr(pipe, component)
    enc = _ENCODERS[family](pipe, lambda: next(network.parameters()).device)
    shape, extra = _latent_layout(pipe, family, network, decode_chunk)

    @torch.no_grad()
    def encode(prompts: Sequence[str]) -> Any:
        return enc(prompts, False)[0]

    @torch.no_grad()
    def uncond() -> Any:
        return enc([""], True)[1]

    seq_len = shape[0] if family == "flux" else shape[1] * shape[2] // getattr(network.config, "patch_size", 1) ** 2
    embed = family == "flux" and bool(getattr(network.config, "guidance_embeds", False))
    return cls(network=network, encode=encode, latent_shape=shape, uncond_fn=uncond, component=component,
               pipeline_class=type(pipe), family=family, guidance_embed=embed, **extra,
               **_schedule_kwargs(pipe, family, seq_len))


def _latent_layout(pipe: Any, family: str, network: Any, decode_chunk: int | None) -> tuple[tuple, dict]:
    """(latent shape, {decode, prepare}): (C, h, w) at the network's sample size; Flux: (N, 4C) tokens
    of the pipeline's default size (``default_sample_size * vae_scale_factor`` pixels)."""
    vae = getattr(pipe, "vae", None)
    if family != "flux":
        size = network.config.sample_size
        h, w = (size, size) if isinstance(size, int) else tuple(size)
        return (network.config.in_channels, h, w), {"decode": vae_decoder(vae, decode_chunk)}
    pixels = pipe.default_sample_size * pipe.vae_scale_factor
    hw = (pixels // (pipe.vae_scale_factor * 2),) * 2  # token grid: latents are 2x2-packed
    unpack = lambda z: pipe._unpack_latents(z, pixels, pixels, pipe.vae_scale_factor)  # noqa: E731
    return (hw[0] * hw[1], network.config.in_channels), {"decode": vae_decoder(vae, decode_chunk, unpack),
                                                         "prepare": _flux_prepare(pipe, hw)}


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


def image_size_multiple(pipe: Any) -> int:
    """What a pipeline's ``height`` and ``width`` must be multiples of: the VAE's downscale factor
    (``vae_scale_factor``; 1 without a VAE), times 2 for Flux's 2x2 latent packing or SD3's patch size."""
    factor = int(getattr(pipe, "vae_scale_factor", None) or 1)
    transformer = getattr(pipe, "transformer", None)
    if transformer is None:
        return factor
    if "Flux" in type(pipe).__name__:
        return factor * 2
    return factor * int(getattr(pipe, "patch_size", None) or getattr(transformer.config, "patch_size", 2))
