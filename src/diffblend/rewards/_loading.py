"""Shared plumbing for the model-based rewards: one load per process, dtype names, clear errors.

Every model reward loads through :func:`cached`, keyed on (kind, path, device, dtype, extra), so a
sweep that builds the same reward many times loads its weights once. Errors a user can fix name the
folder, file or package: :func:`require` for an optional extra, :func:`local_or_hub` for a path.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

__all__ = ["cached", "clear_cache", "require", "parse_dtype", "local_or_hub", "local_file", "load_pretrained", "features", "load_state_dict"]

_CACHE: dict[tuple, Any] = {}

_DTYPES = {"float32": torch.float32, "fp32": torch.float32, "float": torch.float32,
           "float16": torch.float16, "fp16": torch.float16, "half": torch.float16,
           "bfloat16": torch.bfloat16, "bf16": torch.bfloat16}


def cached(key: tuple, build: Callable[[], Any]) -> Any:
    """``build()`` once per process for ``key`` (e.g. ("clip", path, device, dtype))."""
    if key not in _CACHE:
        _CACHE[key] = build()
    return _CACHE[key]


def clear_cache() -> None:
    """Forget every loaded reward model (frees their memory once no reward function holds them)."""
    _CACHE.clear()


def require(module: str, package: str, reward: str, extra: str = "rewards") -> Any:
    """Import ``module`` or raise one ImportError naming the pip package and the diffblend extra."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"reward {reward!r} needs the package {package!r}: pip install {package} "
                          f"(or pip install 'diffblend[{extra}]')") from exc


def parse_dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    """``"fp16"``, ``"bfloat16"``, ``torch.float16``... -> a torch float dtype (None -> float32)."""
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype) and dtype in _DTYPES.values():
        return dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"dtype must be one of {sorted(_DTYPES)} (or a torch float dtype), got {dtype!r}")


def local_or_hub(path: str | os.PathLike | None, what: str, option: str = "path") -> str:
    """``path`` as a string: an existing folder, or a hub id ("owner/name"); else a FileNotFoundError.

    A hub id is only tried when it is not a local-looking path; with ``HF_HUB_OFFLINE=1`` an id that
    is not in the local cache fails at once in :func:`from_pretrained` (see :func:`load_pretrained`).
    """
    if path is None or not str(path).strip():
        raise ValueError(f"{what} needs {option}=DIR (a folder saved with save_pretrained, or a hub id)")
    text = os.path.expanduser(str(path))
    if Path(text).is_dir():
        return text
    if Path(text).exists():
        raise ValueError(f"{what}: {option}={text!r} is a file; it must be a folder saved with save_pretrained")
    if text.startswith((".", os.sep)) or text.count("/") != 1:
        raise FileNotFoundError(f"{what}: {option} folder {text!r} does not exist")
    return text


def local_file(path: str | os.PathLike | None, what: str, option: str) -> Path:
    """``path`` as an existing file, else a FileNotFoundError / ValueError naming ``option``."""
    if path is None or not str(path).strip():
        raise ValueError(f"{what} needs {option}=FILE")
    p = Path(os.path.expanduser(str(path)))
    if not p.is_file():
        raise FileNotFoundError(f"{what}: {option} file {str(p)!r} does not exist")
    return p


def load_pretrained(cls: Any, path: str, what: str, **kwargs: Any) -> Any:
    """``cls.from_pretrained(path)``; an OSError (no such hub id, offline) re-raised naming the path."""
    try:
        return cls.from_pretrained(path, **kwargs)
    except OSError as exc:
        raise OSError(f"{what}: could not load {path!r} with {cls.__name__}.from_pretrained: not a local folder "
                      f"and not in the hub cache (model hubs may be unreachable; HF_HUB_OFFLINE="
                      f"{os.environ.get('HF_HUB_OFFLINE', '')!r}). Save the model with save_pretrained and pass "
                      f"its folder. ({exc.__class__.__name__}: {str(exc).splitlines()[0] if str(exc) else ''})") from exc


def load_state_dict(file: Path) -> dict[str, torch.Tensor]:
    """A state dict from ``.safetensors`` or a torch pickle (``weights_only=True``); unwraps ``{"state_dict": ...}``."""
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(file))
    sd = torch.load(str(file), map_location="cpu", weights_only=True)
    if isinstance(sd, dict) and isinstance(sd.get("state_dict"), dict):
        sd = sd["state_dict"]
    if isinstance(sd, dict) and isinstance(sd.get("model"), dict):
        sd = sd["model"]
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{file} does not hold a state dict of tensors")
    return {k.removeprefix("module."): v for k, v in sd.items()}


def features(out: Any) -> torch.Tensor:
    """The embedding tensor from ``get_image_features`` / ``get_text_features``: a tensor on
    transformers 4.x, a model output whose ``pooler_output`` is the projection on 5.x."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output
