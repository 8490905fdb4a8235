"""Load LoRA adapters by name onto one shared base model (a diffusers UNet or transformer).

Accepted sources (read by :mod:`.files`, layouts converted by :mod:`.formats` with diffusers' own
``<PipelineClass>.lora_state_dict``, as ``pipe.load_lora_weights`` does):
  * a diffusers LoRA safetensors file, as written by ``pipe.save_lora_weights`` (keys
    ``unet.<module>.lora_A.weight`` ..., possibly with text-encoder components in the same file,
    and diffusers' ``lora_adapter_metadata`` holding the LoraConfig, e.g. ``lora_alpha``; without
    it diffusers' defaults apply: lora_alpha = rank), or a directory holding exactly one such file;
  * an old diffusers attention-processor file (``unet.<...>.processor.to_q_lora.down.weight``);
  * a kohya / sd-scripts file (``lora_unet_<module>.lora_down.weight``, ``.lora_up.weight``,
    ``.alpha``; LyCORIS LoCon too; SDXL's sgm block names), alphas applied as diffusers applies them;
  * a peft adapter directory (``adapter_config.json`` + ``adapter_model.safetensors``).

Every adapter is checked against the base *before* anything is injected, and refused with an
:class:`AdapterError` naming the adapter and the mismatch: an empty, truncated or corrupt file,
NaN / inf values, adapter types that are not LoRA (LoKr, LoHa, ...), modules the base does not have,
shapes that do not match the base layer, a rank that differs between A and B, an A without its B
(or the reverse), non-LoRA tensors (a fused / merged checkpoint), pickle files (``.bin``, ``.ckpt``,
``.pt``, ``.pth``, ``.pkl``, or a pickle under a ``.safetensors`` name) unless ``allow_pickle=True``,
and text-encoder components (kohya ``lora_te_`` keys too) unless ``text_encoder="ignore"`` (the
blend acts on the denoiser's predictions only).
"""

from __future__ import annotations

import contextlib
import re
import warnings
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch

from .files import PICKLE_SUFFIXES, AdapterError, read_adapter
from .formats import convert, drop_kohya_text_encoders, refuse_foreign, split_components

_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_A|lora_B|lora_magnitude_vector)(?:\.(?P<leaf>weight|bias))?$")

__all__ = ["AdapterError", "read_adapter", "check_fits", "check_ranks", "load_adapter", "PICKLE_SUFFIXES"]


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


def installed_config(meta: dict | None, name: str) -> dict | None:
    """The metadata's LoraConfig as the installed peft / diffusers read it: fields this peft does not know
    are dropped (a file written by a newer peft carries its new fields, at their defaults as a rule: a
    warning names any that is set), and ``rank_pattern`` / ``alpha_pattern`` are present (diffusers < 0.36
    indexes them, a minimal adapter_config.json may lack them)."""
    if not meta:
        return meta
    import dataclasses

    import peft
    from peft import LoraConfig

    known = {f.name for f in dataclasses.fields(LoraConfig)}
    unknown = {k: v for k, v in meta.items() if k not in known}
    bookkeeping = {"peft_version", "revision", "base_model_name_or_path", "auto_mapping", "task_type"}
    set_ = {k: v for k, v in unknown.items() if v not in (None, False, "", [], {}) and k not in bookkeeping}
    if set_:
        warnings.warn(f"adapter {name!r}: its LoraConfig sets {sorted(set_)} which peft {peft.__version__} does not "
                      f"know; they are ignored (upgrade peft if the adapter needs them)", stacklevel=3)
    out = {k: v for k, v in meta.items() if k in known}
    out.setdefault("rank_pattern", {})
    out.setdefault("alpha_pattern", {})
    return out


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


def _prepare(model: torch.nn.Module, name: str, path: str | Path, component: str, allow_pickle: bool,
             text_encoder: str, pipeline_class: Any) -> tuple[dict, dict | None, dict | None, dict[str, int]]:
    """Read, convert and check one adapter: (peft-layout state dict of the denoiser, its LoraConfig
    metadata or None, diffusers' network alphas or None, {module: rank}). Nothing is injected."""
    sd, meta = read_adapter(path, name, allow_pickle=allow_pickle)
    where = str(path)
    refuse_foreign(list(sd), name, where)
    sd = drop_kohya_text_encoders(sd, name, component, text_encoder)
    sd, alphas = convert(sd, model, component, pipeline_class, name, where)
    sd, meta = split_components(sd, meta, component, name, text_encoder)
    meta = installed_config(meta, name)
    sd = _to_peft_keys(sd)
    ranks = check_fits(model, sd, name, component)
    check_ranks(ranks, meta, name)
    if alphas and meta:
        raise AdapterError(f"adapter {name!r}: {where} holds both kohya alphas and a LoraConfig in its metadata; "
                           f"diffusers' loader refuses such files too")
    return sd, meta, alphas, ranks


def _inject(model: torch.nn.Module, name: str, sd: dict, meta: dict | None, alphas: dict | None,
            component: str) -> None:
    """diffusers' ``load_lora_adapter`` with the component prefix put back: it applies the network
    alphas (kohya) or the metadata's LoraConfig exactly as ``pipe.load_lora_weights`` does."""
    if not hasattr(model, "load_lora_adapter"):
        raise RuntimeError(f"{type(model).__name__} has no load_lora_adapter (diffusers PeftAdapterMixin)")
    kwargs: dict[str, Any] = {}
    if meta:
        kwargs["metadata"] = {f"{component}.{k}": v for k, v in meta.items()}
    if alphas:
        kwargs["network_alphas"] = alphas
    with _quiet_loading():
        model.load_lora_adapter({f"{component}.{k}": v for k, v in sd.items()}, prefix=component,
                                adapter_name=name, **kwargs)


def _warn_alpha_mismatch(model: torch.nn.Module, name: str, alphas: dict[str, float] | None, component: str) -> None:
    """Warn where diffusers' scaling of a module is not its kohya ``alpha / rank``. diffusers 0.42 keeps
    a per-module alpha that differs from the file's most common one for modules named as such
    (``time_emb_proj``) but not for attention projections (its alpha_pattern keys keep the
    ``processor.to_q_lora.down.weight`` spelling, which matches no module), which then get the
    common alpha. The model stays diffusers' (as ``pipe.load_lora_weights`` builds it); this says so."""
    if not alphas:
        return
    from diffusers.utils import convert_unet_state_dict_to_peft

    prefix = component + "."
    per_key = {k[len(prefix):-len(".alpha")]: v for k, v in alphas.items()
               if k.startswith(prefix) and k.endswith(".alpha")}
    per_module = {k.split(".lora_A")[0]: v for k, v in convert_unet_state_dict_to_peft(per_key).items()}
    off = []
    for module, alpha in per_module.items():
        try:
            layer = model.get_submodule(module)
        except AttributeError:
            continue
        if name not in getattr(layer, "scaling", {}):
            continue
        want, got = float(alpha) / layer.r[name], float(layer.scaling[name])
        if abs(got - want) > 1e-6 * abs(want):
            off.append(f"{module}: {got:g} (alpha {float(alpha):g} / rank {layer.r[name]} = {want:g})")
    if off:
        warnings.warn(f"adapter {name!r}: diffusers' loader scales {len(off)} module(s) otherwise than their kohya "
                      f"alpha / rank, e.g. {'; '.join(off[:3])}; the adapter is loaded as pipe.load_lora_weights "
                      f"loads it", stacklevel=3)


def load_adapter(model: torch.nn.Module, name: str, path: str | Path, *, component: str = "unet",
                 allow_pickle: bool = False, text_encoder: str = "refuse", pipeline_class: Any = None) -> None:
    """Check and inject one LoRA adapter into ``model`` (a diffusers model with ``load_lora_adapter``).

    Args:
        model: the shared base, e.g. ``pipe.unet`` or ``pipe.transformer``.
        name: the adapter's name (unique, not ``"__base__"``).
        path: a LoRA file (diffusers, old attention-processor, kohya / sd-scripts) / a directory
            holding one, or a peft adapter directory.
        component: the denoiser's component name in multi-component files ("unet" / "transformer").
        allow_pickle: also accept pickle files (only for files you trust).
        text_encoder: "refuse" (default) or "ignore" text-encoder components of the file.
        pipeline_class: the pipeline's class (e.g. ``type(pipe)``), whose ``lora_state_dict`` converts
            the file as ``pipe.load_lora_weights`` would. None (a bare model): diffusers'
            StableDiffusionLoraLoaderMixin for a UNet; for a transformer no conversion (diffusers and
            peft layouts only).
    """
    from ._compat import check_versions, is_merged, lora_layers

    check_versions()
    if not isinstance(name, str) or not name or name == "__base__":
        raise AdapterError(f"adapter name must be a non-empty string other than '__base__', got {name!r}")
    if text_encoder not in ("refuse", "ignore"):
        raise ValueError(f"text_encoder must be 'refuse' or 'ignore', got {text_encoder!r}")
    if name in getattr(model, "peft_config", {}):
        raise AdapterError(f"adapter name {name!r} is already loaded on this {component}")
    if is_merged(lora_layers(model)):
        raise AdapterError(
            f"cannot load adapter {name!r}: the {component} has fused (merged) LoRA weights, so its weights are not "
            f"the base; unfuse them first (pipe.unfuse_lora())")
    sd, meta, alphas, ranks = _prepare(model, name, path, component, allow_pickle, text_encoder, pipeline_class)
    _inject(model, name, sd, meta, alphas, component)
    _warn_alpha_mismatch(model, name, alphas, component)
    # Verify ourselves (diffusers' own missing-key report matches adapter names as substrings of
    # key names, so it is noisy for short names and silenced above).
    not_loaded = [m for m in ranks if name not in getattr(model.get_submodule(m), "lora_A", {})]
    if not_loaded:
        raise AdapterError(f"adapter {name!r}: {len(not_loaded)} module(s) did not receive weights, e.g. "
                           f"{not_loaded[:3]}")
    for layer in lora_layers(model):  # inference: the loaded weights are not trained here
        for mod in (layer.lora_A, layer.lora_B):
            if name in mod:
                mod[name].requires_grad_(False)
