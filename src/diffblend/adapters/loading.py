"""Load LoRA adapters by name onto one shared base model (a diffusers UNet or transformer).

Accepted sources:
  * a diffusers LoRA safetensors file, as written by ``pipe.save_lora_weights`` (keys
    ``unet.<module>.lora_A.weight`` ..., possibly with text-encoder components in the same file,
    and diffusers' ``lora_adapter_metadata`` holding the LoraConfig, e.g. ``lora_alpha``), or a
    directory holding exactly one such file;
  * a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

Every adapter is checked against the base *before* anything is injected, and refused with an
:class:`AdapterError` naming the adapter and the mismatch: modules the base does not have, shapes
that do not match the base layer, a rank that differs between A and B, an A without its B (or the
reverse), non-LoRA tensors (a fused / merged checkpoint), pickle files (``.bin``, ``.ckpt``, ``.pt``,
``.pth``, ``.pkl``) unless ``allow_pickle=True``, and text-encoder components unless
``text_encoder="ignore"`` (the blend acts on the denoiser's predictions only).
"""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from collections import defaultdict
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
TEXT_COMPONENTS = ("text_encoder", "text_encoder_2", "text_encoder_3")
DENOISER_COMPONENTS = ("unet", "transformer")
_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.(?P<leaf>weight|bias))?$")

__all__ = ["AdapterError", "read_adapter", "check_fits", "check_ranks", "load_adapter", "PICKLE_SUFFIXES"]


class AdapterError(ValueError):
    """An adapter that cannot be used on this base model; the message names the adapter and why."""


def _load_tensors(path: Path, name: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, parsed diffusers LoRA metadata or None) of one weights file."""
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise AdapterError(
                f"adapter {name!r}: {path.name} is a pickle file, which can run arbitrary code when loaded; "
                f"convert it to .safetensors or pass allow_pickle=True if you trust it")
        return torch.load(path, map_location="cpu", weights_only=True), None
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter {name!r}: unsupported file type {path.name!r}; expected .safetensors")
    from safetensors import safe_open
    from safetensors.torch import load_file

    with safe_open(str(path), framework="pt") as fh:
        raw = fh.metadata() or {}
    meta = json.loads(raw["lora_adapter_metadata"]) if raw.get("lora_adapter_metadata") else None
    return load_file(str(path)), meta


def read_adapter(path: str | Path, name: str = "adapter", *, allow_pickle: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read an adapter's tensors and LoRA metadata (keys as in the file; peft dirs: unprefixed).

    Returns:
        (state_dict, metadata): metadata maps ``"<component>.<LoraConfig field>"`` (diffusers files)
        or ``"<LoraConfig field>"`` (peft dirs) to values, or is None when the file has none.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {name!r}: {str(path)!r} does not exist")
    if path.is_dir():
        config = path / "adapter_config.json"
        if config.exists():  # a peft adapter directory
            cfg = json.loads(config.read_text())
            if cfg.get("peft_type", "LORA") != "LORA":
                raise AdapterError(f"adapter {name!r}: peft type {cfg.get('peft_type')!r} is not LoRA")
            files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
            weights = next((f for f in files if f.exists()), None)
            if weights is None:
                raise AdapterError(f"adapter {name!r}: {path.name} has adapter_config.json but no adapter_model file")
            sd, _ = _load_tensors(weights, name, allow_pickle)
            sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
            keep = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
                    "lora_bias", "fan_in_fan_out", "bias", "init_lora_weights")
            return sd, {k: cfg[k] for k in keep if k in cfg}
        found = sorted(path.glob("*.safetensors")) or sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
        if len(found) != 1:
            raise AdapterError(
                f"adapter {name!r}: directory {path.name!r} must hold exactly one LoRA weights file or a peft "
                f"adapter_config.json, found {[f.name for f in found]}")
        path = found[0]
    return _load_tensors(path, name, allow_pickle)


def split_components(sd: dict[str, torch.Tensor], meta: dict | None, denoiser: str, name: str,
                     text_encoder: str = "refuse") -> tuple[dict[str, torch.Tensor], dict | None]:
    """The denoiser's part of a (possibly multi-component) LoRA state dict, prefix removed."""
    if text_encoder not in ("refuse", "ignore"):
        raise ValueError(f"text_encoder must be 'refuse' or 'ignore', got {text_encoder!r}")
    prefixes = {k.split(".", 1)[0] for k in sd}
    if not prefixes & set(DENOISER_COMPONENTS + TEXT_COMPONENTS):
        return sd, meta  # unprefixed: the whole dict is the denoiser's (a peft directory)
    text = sorted(prefixes & set(TEXT_COMPONENTS))
    if text and text_encoder == "refuse":
        raise AdapterError(
            f"adapter {name!r} also holds LoRA weights for {text}; Diffusion Blend combines the "
            f"{denoiser}'s predictions and does not blend text encoders. Pass text_encoder='ignore' "
            f"to load only the {denoiser} part")
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


def _to_peft_keys(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Old diffusers key layouts (``.lora.down.weight``, ``lora_linear_layer``) to peft's."""
    if any(".lora_A." in k or ".lora_B." in k for k in sd):
        return sd
    from diffusers.utils import convert_unet_state_dict_to_peft

    return convert_unet_state_dict_to_peft(dict(sd))


def check_fits(model: torch.nn.Module, sd: dict[str, torch.Tensor], name: str, component: str = "model") -> dict:
    """Check a peft-layout LoRA state dict (unprefixed) against ``model``; return {module: rank}.

    Raises:
        AdapterError: naming the adapter and the first mismatches found.
    """
    groups: dict[str, dict[str, torch.Tensor]] = defaultdict(dict)
    alien = []
    for key, value in sd.items():
        m = _KEY.match(key)
        if m is None:
            alien.append(key)
            continue
        groups[m["module"]][m["part"] + ("." + m["leaf"] if m["leaf"] else "")] = value
    if alien:
        raise AdapterError(
            f"adapter {name!r} holds {len(alien)} non-LoRA tensor(s), e.g. {alien[:3]}: a fused (merged) "
            f"checkpoint or another adapter type, which cannot be blended as a LoRA")
    if not groups:
        raise AdapterError(f"adapter {name!r} holds no LoRA weights for the {component}")
    problems, ranks = [], {}
    for module, parts in groups.items():
        a, b = parts.get("lora_A.weight"), parts.get("lora_B.weight")
        if a is None or b is None:
            problems.append(f"{module}: missing {'lora_A' if a is None else 'lora_B'}")
            continue
        try:
            target = model.get_submodule(module)
        except AttributeError:
            problems.append(f"{module}: no such module in the {component}")
            continue
        base = target.get_base_layer() if hasattr(target, "get_base_layer") else target
        if a.shape[0] != b.shape[1]:
            problems.append(f"{module}: rank layout differs, lora_A has rank {a.shape[0]}, lora_B {b.shape[1]}")
        elif isinstance(base, torch.nn.Linear):
            if a.dim() != 2 or b.dim() != 2 or a.shape[1] != base.in_features or b.shape[0] != base.out_features:
                problems.append(
                    f"{module}: LoRA maps {a.shape[1] if a.dim() > 1 else '?'} -> {b.shape[0]} features, "
                    f"the base Linear maps {base.in_features} -> {base.out_features}")
        elif isinstance(base, torch.nn.Conv2d):
            # peft's Conv2d LoRA: A has the base kernel, B is 1x1
            if (a.dim() != 4 or b.dim() != 4 or a.shape[1] != base.in_channels or b.shape[0] != base.out_channels
                    or tuple(a.shape[2:]) != tuple(base.kernel_size) or tuple(b.shape[2:]) != (1, 1)):
                problems.append(
                    f"{module}: LoRA shapes {tuple(a.shape)}/{tuple(b.shape)} do not fit the base Conv2d "
                    f"{base.in_channels} -> {base.out_channels}, kernel {tuple(base.kernel_size)}")
        else:
            problems.append(f"{module}: the base layer is a {type(base).__name__}, not Linear or Conv2d")
        ranks[module] = int(a.shape[0])
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise AdapterError(f"adapter {name!r} does not fit this {component}: " + "; ".join(problems[:5]) + more)
    return ranks


def check_ranks(ranks: dict[str, int], meta: dict | None, name: str) -> None:
    """Refuse an adapter whose LoraConfig (file metadata / adapter_config.json: ``r``, ``rank_pattern``)
    gives other ranks than its tensors: peft would build layers of the config's rank and fail to load
    the tensors into them (a RuntimeError listing every module)."""
    if not meta or "r" not in meta:
        return  # no config: diffusers takes the ranks from the tensors
    from peft.utils.other import get_pattern_key

    pattern = meta.get("rank_pattern") or {}
    bad = []
    for module, rank in ranks.items():
        want = int(pattern.get(get_pattern_key(pattern.keys(), module), meta["r"]))
        if want != rank:
            bad.append(f"{module}: rank {rank} in the tensors, {want} in the config")
    if bad:
        more = f" (and {len(bad) - 3} more)" if len(bad) > 3 else ""
        raise AdapterError(f"adapter {name!r}: rank layout differs between its LoRA config and its weights: "
                           + "; ".join(bad[:3]) + more)


@contextlib.contextmanager
def _quiet_loading():
    """Silence the expected notices of a multi-adapter load (peft's "Already found a peft_config")."""
    from diffusers.utils import logging as dlogging

    logger = dlogging.get_logger("diffusers.utils.peft_utils")
    level = logger.level
    logger.setLevel(dlogging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="Already found a `peft_config` attribute")
            yield
    finally:
        logger.setLevel(level)


def load_adapter(model: torch.nn.Module, name: str, path: str | Path, *, component: str = "unet",
                 allow_pickle: bool = False, text_encoder: str = "refuse") -> None:
    """Check and inject one LoRA adapter into ``model`` (a diffusers model with ``load_lora_adapter``).

    Args:
        model: the shared base, e.g. ``pipe.unet`` or ``pipe.transformer``.
        name: the adapter's name (unique, not ``"__base__"``).
        path: a diffusers LoRA file / directory, or a peft adapter directory.
        component: the denoiser's component name in multi-component files ("unet" / "transformer").
        allow_pickle: also accept pickle files (only for files you trust).
        text_encoder: "refuse" (default) or "ignore" text-encoder components of the file.
    """
    from ._compat import check_versions, is_merged, lora_layers

    check_versions()
    if not isinstance(name, str) or not name or name == "__base__":
        raise AdapterError(f"adapter name must be a non-empty string other than '__base__', got {name!r}")
    if name in getattr(model, "peft_config", {}):
        raise AdapterError(f"adapter name {name!r} is already loaded on this {component}")
    if is_merged(lora_layers(model)):
        raise AdapterError(
            f"cannot load adapter {name!r}: the {component} has fused (merged) LoRA weights, so its weights are not "
            f"the base; unfuse them first (pipe.unfuse_lora())")
    sd, meta = read_adapter(path, name, allow_pickle=allow_pickle)
    sd, meta = split_components(sd, meta, component, name, text_encoder)
    sd = _to_peft_keys(sd)
    ranks = check_fits(model, sd, name, component)
    check_ranks(ranks, meta, name)
    if not hasattr(model, "load_lora_adapter"):
        raise RuntimeError(f"{type(model).__name__} has no load_lora_adapter (diffusers PeftAdapterMixin)")
    kwargs = {"metadata": meta} if meta else {}
    with _quiet_loading():
        model.load_lora_adapter(sd, prefix=None, adapter_name=name, **kwargs)
    # Verify ourselves (diffusers' own missing-key report matches adapter names as substrings of
    # key names, so it is noisy for short names and silenced above).
    layers = lora_layers(model)
    not_loaded = [m for m in ranks if name not in getattr(model.get_submodule(m), "lora_A", {})]
    if not_loaded:
        raise AdapterError(f"adapter {name!r}: {len(not_loaded)} module(s) did not receive weights, e.g. "
                           f"{not_loaded[:3]}")
    for layer in layers:  # inference: the loaded weights are not trained here
        for mod in (layer.lora_A, layer.lora_B):
            if name in mod:
                mod[name].requires_grad_(False)
