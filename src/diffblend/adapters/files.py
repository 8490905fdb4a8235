"""Read an adapter's tensors from disk: a safetensors file, a pickle (only when allowed), a directory
holding one such file, or a peft adapter directory. Every failure is an :class:`AdapterError` that
names the adapter and the file (never a raw SafetensorError or unpickling traceback), and an adapter
holding NaN or inf values is refused here: it would turn every image NaN (black) without a word.
"""

from __future__ import annotations

import json
import zipfile
from pathlib import Path

import torch

PICKLE_SUFFIXES = (".bin", ".ckpt", ".pt", ".pth", ".pkl")
PICKLE_HINT = "allow_pickle=True (CLI: --allow-pickle)"
# LoraConfig fields kept from a peft adapter_config.json (the rest is bookkeeping: base model, revision...)
PEFT_FIELDS = ("r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern", "use_dora", "use_rslora",
               "lora_bias", "fan_in_fan_out", "bias", "init_lora_weights")

__all__ = ["AdapterError", "read_adapter", "check_finite", "PICKLE_SUFFIXES", "PICKLE_HINT"]


class AdapterError(ValueError):
    """An adapter that cannot be used on this base model; the message names the adapter and why."""


def _looks_pickled(path: Path) -> bool:
    """A ``torch.save`` file: a zip archive (the default since torch 1.6) or a bare pickle stream."""
    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as fh:
        head = fh.read(2)
    return len(head) == 2 and head[0] == 0x80 and 2 <= head[1] <= 5  # PROTO opcode, protocols 2-5


def _pickle_refusal(name: str, path: Path, what: str) -> AdapterError:
    return AdapterError(
        f"adapter {name!r}: {path} is {what}, which can run arbitrary code when loaded; convert it to "
        f".safetensors, or pass {PICKLE_HINT} if you trust it")


def _load_pickle(path: Path, name: str) -> dict[str, torch.Tensor]:
    """A pickled state dict, unpickled with ``weights_only=True`` (tensors and containers only)."""
    try:
        with open(path, "rb") as fh:  # a file object: torch.load reads a path named .safetensors as safetensors
            obj = torch.load(fh, map_location="cpu", weights_only=True)
    except Exception as e:  # truncated zip, random bytes, a pickle of arbitrary objects
        raise AdapterError(f"adapter {name!r}: {path} could not be read as a PyTorch weights file "
                           f"({type(e).__name__}): truncated, corrupt, or holding objects other than tensors "
                           f"(only tensors are unpickled)") from None
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items()):
        raise AdapterError(f"adapter {name!r}: {path} does not hold a flat {{name: tensor}} state dict "
                           f"(found a {type(obj).__name__})")
    return obj


def _load_safetensors(path: Path, name: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    from safetensors import safe_open
    from safetensors.torch import load_file

    if path.stat().st_size == 0:
        raise AdapterError(f"adapter {name!r}: {path} is empty (0 bytes): an interrupted download or copy?")
    try:
        with safe_open(str(path), framework="pt") as fh:
            raw = fh.metadata() or {}
        sd = load_file(str(path))
    except Exception as e:  # safetensors' SafetensorError: header too small / too large, incomplete...
        if _looks_pickled(path):
            if not allow_pickle:
                raise _pickle_refusal(name, path, "a PyTorch pickle saved under a .safetensors name") from None
            return _load_pickle(path, name), None
        raise AdapterError(
            f"adapter {name!r}: {path} is not a valid safetensors file ({str(e).splitlines()[0]}): truncated "
            f"(an interrupted download) or not a weights file") from None
    try:
        meta = json.loads(raw["lora_adapter_metadata"]) if raw.get("lora_adapter_metadata") else None
    except json.JSONDecodeError as e:
        raise AdapterError(f"adapter {name!r}: {path} has unreadable lora_adapter_metadata ({e})") from None
    return sd, meta


def _load_tensors(path: Path, name: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict | None]:
    """(state dict, parsed diffusers LoRA metadata or None) of one weights file."""
    if path.suffix in PICKLE_SUFFIXES:
        if not allow_pickle:
            raise _pickle_refusal(name, path, "a pickle file")
        return _load_pickle(path, name), None
    if path.suffix != ".safetensors":
        raise AdapterError(f"adapter {name!r}: unsupported file type {path.name!r}; expected .safetensors")
    return _load_safetensors(path, name, allow_pickle)


def check_finite(sd: dict[str, torch.Tensor], name: str, path: str | Path) -> None:
    """Refuse NaN / inf values (a diverged or corrupt adapter), naming the first offending tensor."""
    for key, value in sd.items():
        if value.is_floating_point() and not bool(torch.isfinite(value).all()):
            nan, inf = int(torch.isnan(value).sum()), int(torch.isinf(value).sum())
            raise AdapterError(
                f"adapter {name!r}: tensor {key!r} in {path} holds {nan} NaN and {inf} inf value(s) (of "
                f"{value.numel()}); a diverged or corrupt adapter would make every image NaN (black)")


def _read_peft_dir(path: Path, name: str, allow_pickle: bool) -> tuple[dict[str, torch.Tensor], dict, Path]:
    config = path / "adapter_config.json"
    try:
        cfg = json.loads(config.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise AdapterError(f"adapter {name!r}: {config} is not readable JSON ({e})") from None
    if cfg.get("peft_type", "LORA") != "LORA":
        raise AdapterError(f"adapter {name!r}: peft type {cfg.get('peft_type')!r} is not LoRA")
    files = [path / "adapter_model.safetensors", path / "adapter_model.bin"]
    weights = next((f for f in files if f.exists()), None)
    if weights is None:
        raise AdapterError(f"adapter {name!r}: {path.name} has adapter_config.json but no adapter_model file")
    sd, _ = _load_tensors(weights, name, allow_pickle)
    sd = {k.removeprefix("base_model.model."): v for k, v in sd.items()}
    return sd, {k: cfg[k] for k in PEFT_FIELDS if k in cfg}, weights


def read_adapter(path: str | Path, name: str = "adapter", *, allow_pickle: bool = False
                 ) -> tuple[dict[str, torch.Tensor], dict | None]:
    """Read an adapter's tensors and LoRA metadata (keys as in the file; peft dirs: unprefixed).

    Returns:
        (state_dict, metadata): metadata maps ``"<component>.<LoraConfig field>"`` (diffusers files)
        or ``"<LoraConfig field>"`` (peft dirs) to values, or is None when the file has none.

    Raises:
        AdapterError: a missing, empty, truncated or corrupt file, a pickle (unless ``allow_pickle``),
            or NaN / inf values, naming the adapter and the file.
    """
    path = Path(path)
    if not path.exists():
        raise AdapterError(f"adapter {name!r}: {str(path)!r} does not exist")
    if path.is_dir() and (path / "adapter_config.json").exists():  # a peft adapter directory
        sd, meta, path = _read_peft_dir(path, name, allow_pickle)
    else:
        if path.is_dir():
            found = sorted(path.glob("*.safetensors")) or sorted(p for s in PICKLE_SUFFIXES for p in path.glob(f"*{s}"))
            if len(found) != 1:
                raise AdapterError(
                    f"adapter {name!r}: directory {path.name!r} must hold exactly one LoRA weights file or a peft "
                    f"adapter_config.json, found {[f.name for f in found]}")
            path = found[0]
        sd, meta = _load_tensors(path, name, allow_pickle)
    check_finite(sd, name, path)
    return sd, meta
