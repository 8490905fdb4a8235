"""LoRA file layouts: name the format, refuse the ones that are not LoRA, convert the rest with
diffusers' own public conversion (``<PipelineClass>.lora_state_dict``), which is what
``pipe.load_lora_weights`` runs, and split off the denoiser's part.

Layouts read (as diffusers' loader reads them):
  * diffusers files (``unet.<module>.lora_A.weight``, with or without ``lora_adapter_metadata``);
  * old diffusers attention-processor files (``unet.<...>.processor.to_q_lora.down.weight``,
    ``.lora.down.weight``, ``lora_linear_layer``);
  * kohya / sd-scripts files (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``), including LyCORIS LoCon (the same keys on convolutions too) and SDXL's sgm block
    names (``lora_unet_input_blocks_4_1_...``, remapped with the UNet's config);
  * peft adapter directories (keys without a component prefix).
The alphas of kohya files come back from diffusers as ``network_alphas`` and are handed to
diffusers' ``load_lora_adapter`` with the tensors, so the per-module scaling is diffusers' own.
"""

from __future__ import annotations

import inspect
import re
from typing import Any

import torch

from .files import AdapterError

TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_COMPONENTS = ("unet", "transformer")
KOHYA_PREFIXES = {"lora_unet_": "unet", "lora_te_": "text_encoder", "lora_te1_": "text_encoder",
                  "lora_te2_": "text_encoder_2"}
# Key parts (between dots) of adapter types that are not LoRA (the LyCORIS family and others): refused
# by name. diffusers' SD / SDXL loaders refuse them as well ("keys have not been correctly renamed"),
# except dora_scale, which they drop with a warning, loading the rest as a plain LoRA: another model.
FOREIGN = (
    (r"lokr_(w\d.*|t\d)", "a LoKr (LyCORIS Kronecker-product) file"),
    (r"hada_(w\d.*|t\d)", "a LoHa (LyCORIS Hadamard-product) file"),
    (r"lora_mid", "a LyCORIS LoCon file with CP (Tucker) decomposition (lora_mid)"),
    (r"oft_.+", "an OFT file"),
    (r"dora_scale", "a DoRA file in kohya / LyCORIS layout (dora_scale), which diffusers' loader would read as "
                    "a plain LoRA without its magnitudes"),
    (r"diff(_b)?", "a LyCORIS full-difference file (diff, diff_b)"),
    (r"[wb]_norm", "a LyCORIS norm-layer file (w_norm, b_norm)"),
)

__all__ = ["describe", "refuse_foreign", "drop_kohya_text_encoders", "convert", "split_components",
           "TEXT_COMPONENTS", "DENOISER_COMPONENTS"]


def _is_kohya(keys: list[str]) -> bool:
    """diffusers' own test for a non-diffusers (kohya / A1111) file: every key has a kohya prefix."""
    return bool(keys) and all(k.startswith(tuple(KOHYA_PREFIXES)) for k in keys)


def describe(keys: list[str]) -> str:
    """A short name of the layout of a LoRA state dict's keys, for messages."""
    if _is_kohya(keys):
        return "kohya / sd-scripts LoRA"
    if any(".lora_A." in k or ".lora_B." in k for k in keys):
        prefixed = any(k.split(".", 1)[0] in DENOISER_COMPONENTS + TEXT_COMPONENTS for k in keys)
        return "diffusers LoRA" if prefixed else "peft LoRA"
    if any(".lora.down." in k or "_lora.down." in k or "lora_linear_layer" in k for k in keys):
        return "old diffusers attention-processor LoRA"
    return "unrecognised"


def refuse_foreign(keys: list[str], name: str, where: str) -> None:
    """Refuse adapter types that are not LoRA, naming the format seen and one key."""
    for pattern, what in FOREIGN:
        regex = re.compile(pattern)
        hit = next((k for k in keys if any(regex.fullmatch(part) for part in k.split(".")[1:])), None)
        if hit is not None:
            raise AdapterError(
                f"adapter {name!r}: {where} looks like {what} (e.g. key {hit!r}), not a LoRA; Diffusion Blend "
                f"blends LoRA adapters only (lora_A/lora_B or lora_down/lora_up)")


def text_encoder_refusal(name: str, components: list[str], denoiser: str, how: str = "") -> AdapterError:
    return AdapterError(
        f"adapter {name!r} also holds LoRA weights for {components}{how}; Diffusion Blend combines the "
        f"{denoiser}'s predictions and does not blend text encoders. Pass text_encoder='ignore' to load only "
        f"the {denoiser} part")


def drop_kohya_text_encoders(sd: dict[str, torch.Tensor], name: str, denoiser: str,
                             text_encoder: str) -> dict[str, torch.Tensor]:
    """A kohya file without its text-encoder keys (``lora_te_``, ``lora_te1_``, ``lora_te2_``), or the
    refusal when ``text_encoder="refuse"``. Other files go through :func:`split_components`."""
    if not _is_kohya(list(sd)):
        return sd
    text = {k: KOHYA_PREFIXES[p] for k in sd for p in KOHYA_PREFIXES if k.startswith(p) and p != "lora_unet_"}
    if not text:
        return sd
    if text_encoder == "refuse":
        prefixes = sorted({p for k in text for p in KOHYA_PREFIXES if k.startswith(p)})
        raise text_encoder_refusal(name, sorted(set(text.values())), denoiser, f" (kohya keys {prefixes})")
    kept = {k: v for k, v in sd.items() if k not in text}
    if not kept:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights for the {denoiser} (only kohya text-encoder keys)")
    return kept


def _loader(pipeline_class: Any, component: str) -> Any:
    """The class whose ``lora_state_dict`` converts files for this base: the pipeline's own; with none
    (a bare model) diffusers' StableDiffusionLoraLoaderMixin for a UNet, nothing for a transformer."""
    if pipeline_class is not None and hasattr(pipeline_class, "lora_state_dict"):
        return pipeline_class
    if component == "unet":
        from diffusers.loaders import StableDiffusionLoraLoaderMixin

        return StableDiffusionLoraLoaderMixin
    return None


def convert(sd: dict[str, torch.Tensor], model: torch.nn.Module, component: str, pipeline_class: Any,
            name: str, where: str) -> tuple[dict[str, torch.Tensor], dict[str, float] | None]:
    """(state dict in diffusers' layout, network alphas or None) by ``lora_state_dict`` of the
    pipeline class, as ``load_lora_weights`` gets them (SDXL's passes its UNet config, to map sgm
    block names; so do we for every UNet)."""
    loader = _loader(pipeline_class, component)
    if loader is None:
        if _is_kohya(list(sd)):
            raise AdapterError(f"adapter {name!r}: {where} is a kohya / sd-scripts file, which needs a pipeline's "
                               f"LoRA loader to convert; load it through BlendPipeline(pipe, ...)")
        return sd, None
    kwargs: dict[str, Any] = {"return_lora_metadata": True}
    params = inspect.signature(loader.lora_state_dict).parameters
    if "return_alphas" in params:
        kwargs["return_alphas"] = True
    if component == "unet" and getattr(model, "config", None) is not None:
        kwargs["unet_config"] = model.config
    try:
        out = loader.lora_state_dict(dict(sd), **kwargs)
    except (ValueError, KeyError, IndexError) as e:
        reason = (f"KeyError: key {e.args[0]!r} is missing (a lora_down without its lora_up?)"
                  if isinstance(e, KeyError) else f"{type(e).__name__}: {str(e).strip()[:300]}")
        raise AdapterError(f"adapter {name!r}: diffusers' {loader.__name__}.lora_state_dict could not convert "
                           f"{where} (read as a {describe(list(sd))} file): {reason}") from None
    converted, alphas = out[0], (out[1] if len(out) == 3 else None)
    return converted, (dict(alphas) if alphas else None)


def split_components(sd: dict[str, torch.Tensor], meta: dict | None, denoiser: str, name: str,
                     text_encoder: str = "refuse") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The denoiser's part of a (possibly multi-component) LoRA state dict, prefix removed."""
    prefixes = {k.split(".", 1)[0] for k in sd}
    if not prefixes & set(DENOISER_COMPONENTS + TEXT_COMPONENTS):
        return sd, meta  # unprefixed: the whole dict is the denoiser's (a peft directory)
    text = sorted(prefixes & set(TEXT_COMPONENTS))
    if text and text_encoder == "refuse":
        raise text_encoder_refusal(name, text, denoiser)
    other = sorted(prefixes - set(TEXT_COMPONENTS) - {denoiser})
    if other:
        raise AdapterError(
            f"adapter {name!r} holds weights for component(s) {other}, but the base model is a {denoiser}")
    part = {k[len(denoiser) + 1:]: v for k, v in sd.items() if k.startswith(denoiser + ".")}
    if not part:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights for the {denoiser} (only for {text})")
    if meta is not None and any(k.startswith(denoiser + ".") for k in meta):
        meta = {k[len(denoiser) + 1:]: v for k, v in meta.items() if k.startswith(denoiser + ".")}
    return part, meta
