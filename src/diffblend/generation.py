"""Generation helpers behind ``diffblend generate`` / ``demo`` / ``sweep`` / ``finetune``: load a
pipeline (a folder, or the registered default model), generate with a blend, score with the
rewards, draw image grids, save images.

Blending itself is :class:`diffblend.pipeline.BlendPipeline`; nothing here combines predictions.
"""

from __future__ import annotations

import contextlib
import json
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from .core.rows import is_per_row

__all__ = ["adapters_in", "parse_adapters", "quiet_loading", "reward_names_for", "shipped_adapters", "load_pipeline", "load_blend_pipeline", "resolve_weight_names", "generate", "check_image_size",
           "score_images", "image_grid", "save_png", "image_format"]


def adapters_in(folder: str | Path, include_oracles: bool = False) -> dict[str, Path]:
    """``{name: file}`` of the adapters in ``folder`` (empty if there is none).

    Names come from ``folder/manifest.json`` (``{"adapters": {name: {"file": ..., ...}}}``) when it
    exists, otherwise from the file names (``legibility.safetensors`` -> ``legibility``). The MORL
    oracles (manifest entries with ``"weights"``: one model trained on a weighted reward, the
    reference Diffusion Blend is compared with) are left out unless ``include_oracles``.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return {}
    manifest = folder / "manifest.json"
    if manifest.is_file():
        entries = json.loads(manifest.read_text()).get("adapters", {})
        out = {}
        for name, entry in entries.items():
            entry = {"file": entry} if isinstance(entry, str) else entry
            if entry.get("weights") and not include_oracles:
                continue
            file = entry.get("file")
            if file and (folder / file).is_file():
                out[name] = folder / file
        return out
    return {p.stem: p for p in sorted(folder.glob("*.safetensors"))}


def shipped_adapters(include_oracles: bool = False, model: str | None = None) -> dict[str, Path]:
    """``{name: file}`` of the shipped adapters of the embedded model ``model`` (None: the default;
    :mod:`diffblend.registry`; see :func:`adapters_in`); empty when there is no such model."""
    from .registry import default_model

    try:
        embedded = default_model(model)
    except LookupError:
        return {}
    return embedded.adapters(include_oracles)


def embedded_model(model: str | None) -> Any:
    """The registered :class:`~diffblend.registry.DefaultModel` that ``model`` means (None: the default one; an
    embedded name), or None for a pipeline folder / hub id (or when no embedded model is registered)."""
    from .registry import default_model

    if model is not None and not embedded_name(model):
        return None
    try:
        return default_model(model)
    except LookupError:
        return None


def embedded_name(model: str | None) -> str | None:
    """``model`` if it names an embedded model (``digits``, ``colour``...) and no folder of that name exists
    here, else None (a folder or hub id)."""
    from .registry import embedded_models

    if model is None or Path(model).exists():
        return None
    return model if model in embedded_models() else None


@contextlib.contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide diffusers' and transformers' loading bars (milliseconds for tiny files), then restore them."""
    from diffusers.utils import logging as dlog
    from transformers.utils import logging as tlog

    was = dlog.is_progress_bar_enabled(), tlog.is_progress_bar_enabled()
    dlog.disable_progress_bar()
    tlog.disable_progress_bar()
    try:
        yield
    finally:
        if was[0]:
            dlog.enable_progress_bar()
        if was[1]:
            tlog.enable_progress_bar()


def load_pipeline(model: str | None = None, device: str | torch.device = "cpu") -> Any:
    """The default model (``model=None``), an embedded model by name (``"digits"``, ``"colour"``:
    :mod:`diffblend.registry`) or a diffusers pipeline folder / hub id (a registered non-diffusers class
    such as the zoo's ``DigitsPipeline`` too; components saved as None, e.g. SD3 without T5, load as None)."""
    from .registry import default_model, pipeline_class

    if model is None or embedded_name(model):
        return default_model(model).load(device)
    path = Path(model)
    if path.is_dir() and (path / "model_index.json").is_file():
        cls = pipeline_class(json.loads((path / "model_index.json").read_text()).get("_class_name"))
        if cls is not None:  # not a diffusers class: load it with the registered one
            with quiet_loading():
                pipe = cls.from_pretrained(str(path))
            pipe.set_progress_bar_config(disable=True)
            return pipe.to(device)
    elif path.exists() or model.startswith((".", "/")):
        raise FileNotFoundError(f"--model {model!r}: not a diffusers pipeline folder (no model_index.json)")
    from diffusers import DiffusionPipeline  # a folder or a hub id (the hub needs network access)

    from .families import absent_components

    absent = absent_components(path) if path.is_dir() else {}
    try:
        pipe = DiffusionPipeline.from_pretrained(model, **absent)
    except OSError as exc:  # no such folder / hub id, or no network: one line, not a traceback
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise FileNotFoundError(f"--model {model!r}: cannot load it as a diffusers pipeline ({first})") from exc
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(device)


def load_blend_pipeline(model: str | None = None, adapters: Mapping[str, str | Path] | None = None,
                        device: str | torch.device = "cpu", mode: str = "auto", allow_pickle: bool = False) -> Any:
    """A :class:`~diffblend.pipeline.BlendPipeline` over :func:`load_pipeline` with ``adapters``.

    With an embedded model (``model=None``: the default) and no ``adapters``, its shipped adapters are loaded.
    """
    from .pipeline import BlendPipeline

    pipe = load_pipeline(model, device)
    if adapters is None:
        adapters = shipped_adapters(model=model) if model is None or embedded_name(model) else {}
    return BlendPipeline(pipe, adapters=dict(adapters), mode=mode, allow_pickle=allow_pickle)


def reward_names_for(adapters: Sequence[str], always: Sequence[str] | None = None) -> list[str]:
    """Registered rewards to report: the ones the adapters are named after, then ``always``
    (default: the default model's ``report_rewards``, e.g. the digits' legibility)."""
    from .registry import default_model
    from .rewards import canonical_name

    if always is None:
        try:
            always = default_model().report_rewards
        except LookupError:
            always = ()
    names: list[str] = []
    for a in (*adapters, *always):
        try:
            n = canonical_name(a)
        except KeyError:
            continue
        if n not in names:
            names.append(n)
    return names


def parse_adapters(items: list[str]) -> dict[str, str]:
    """``["a=path", ...]`` -> ``{"a": "path"}`` (the ``--adapter`` values)."""
    out: dict[str, str] = {}
    for item in items:
        name, sep, path = item.partition("=")
        if not sep or not name.strip() or not path.strip():
            raise ValueError(f"--adapter {item!r} is malformed; expected NAME=PATH, e.g. legibility=adapters/leg.safetensors")
        if name.strip() in out:
            raise ValueError(f"--adapter names {name.strip()!r} twice")
        out[name.strip()] = path.strip()
    return out


def resolve_weight_names(weights: Mapping[str, float], adapter_names: Sequence[str],
                         arg: str = "--weights") -> dict[str, float]:
    """Map weight names to adapter names: exact names first, then reward aliases (``compressibility`` ->
    ``jpeg_compressibility``), so ``--weights`` may use either.

    Raises:
        ValueError: naming the unknown name and the adapters available.
    """
    from .rewards import canonical_name

    out: dict[str, float] = {}
    for name, w in weights.items():
        target = name
        if name not in adapter_names:
            try:
                target = canonical_name(name)
            except KeyError:
                target = name
        if target not in adapter_names:
            avail = ", ".join(adapter_names) if adapter_names else "none (pass --adapter NAME=PATH)"
            raise ValueError(f"{arg} names {name!r}, which is not a loaded adapter; adapters: {avail}")
        if target in out:
            raise ValueError(f"{arg} names adapter {target!r} twice")
        out[target] = float(w)
    return out


def check_image_size(pipe: Any, height: int | None, width: int | None) -> dict[str, int]:
    """``{height, width}`` as given (None: left out, the pipeline's default), each checked as a positive int
    and a multiple of what the pipeline needs (:func:`~diffblend.families.image_size_multiple`: the VAE's
    factor, x2 for Flux / SD3 latent patches), which diffusers would otherwise round down (Flux) or refuse
    later.

    Raises:
        ValueError: naming the argument, the multiple and the pipeline.
    """
    import inspect

    from .families import image_size_multiple

    given = {k: v for k, v in (("height", height), ("width", width)) if v is not None}
    if not given:
        return {}
    try:
        params = inspect.signature(pipe.__call__).parameters
    except (AttributeError, TypeError, ValueError):
        params = {}
    name = type(pipe).__name__
    multiple = image_size_multiple(pipe)
    for key, value in given.items():
        if key not in params:
            raise ValueError(f"{key}: {name} takes no {key} argument (its images have one size)")
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{key} must be a positive int (pixels), got {value!r}")
        if value % multiple:
            raise ValueError(f"{key} must be a multiple of {multiple} for {name} (its latent grid), got {value}; "
                             f"e.g. {max(multiple, value // multiple * multiple)}")
    return given


def generate(bp: Any, prompts: Sequence[str], weights: Mapping[str, float] | Sequence[Mapping[str, float]] | None,
             *, kl_strength: float | Sequence[float] = 1.0, method: str = "mpa", seed: int | Sequence[int] = 0,
             num_inference_steps: int = 20, guidance_scale: float | None = 2.0, eta: float | None = 1.0,
             normalize: bool = False, ls_draws: str = "iid", callback_on_step_end: Any = None,
             height: int | None = None, width: int | None = None) -> torch.Tensor:
    """Images (B, C, H, W) in [0, 1] for ``prompts`` under a blend.

    Image j is drawn from its own ``torch.Generator`` seeded ``seed + j``, and LS draws use
    ``blend_seed = seed``, so a sweep over weights with the same seed reuses the same noise
    (paired comparisons). With a list of per-image seeds, image j uses ``seed[j]`` and its LS draws
    are keyed on it (``sample_keys``, ``blend_seed = 0``), so image j is the same in any batch.
    ``weights=None`` is the base model; a list of B dicts blends image j with ``weights[j]`` in the
    same batched call (:class:`~diffblend.core.rows.RowBlend`). ``eta=None`` passes no eta (flow-matching
    pipelines such as SD3 take none: their scheduler decides, e.g. ``FlowMatchSDEScheduler``).
    ``guidance_scale=None``, ``height`` / ``width`` None: the pipeline's own defaults (for a
    guidance-distilled Flux, guidance_scale is its guidance input, as in ``FluxPipeline``); a size
    given is checked with :func:`check_image_size`.
    """
    seeds = [int(s) for s in seed] if isinstance(seed, Sequence) else [int(seed) + j for j in range(len(prompts))]
    if len(seeds) != len(prompts):
        raise ValueError(f"seed has {len(seeds)} values for {len(prompts)} prompts; give one or one per prompt")
    gens = [torch.Generator().manual_seed(s) for s in seeds]
    if weights is not None:
        weights = [dict(w) for w in weights] if is_per_row(weights) else dict(weights)
    per_image = isinstance(seed, Sequence)
    extra = {} if callback_on_step_end is None else {"callback_on_step_end": callback_on_step_end}
    if eta is not None:
        extra["eta"] = eta
    if guidance_scale is not None:
        extra["guidance_scale"] = guidance_scale
    extra.update(check_image_size(bp.pipe, height, width))
    out = bp(prompt=list(prompts), weights=weights, kl_strength=kl_strength, method=method,
             blend_seed=0 if per_image else int(seed), sample_keys=seeds if per_image and method == "ls" else None,
             normalize=normalize, ls_draws=ls_draws, num_inference_steps=num_inference_steps,
             generator=gens, output_type="pt", **extra)
    images = out.images if hasattr(out, "images") else out[0]
    if not isinstance(images, torch.Tensor):  # a pipeline that ignores output_type="pt"
        import numpy as np

        images = torch.from_numpy(np.stack([np.asarray(im, dtype=np.float32) / 255.0 for im in images]))
        images = images[:, None] if images.dim() == 3 else images.permute(0, 3, 1, 2)
    return images.float().cpu()


def score_images(images: torch.Tensor, prompts: Sequence[str], names: Sequence[str],
                 device: str | torch.device = "cpu", calibration: str | Path | None = None) -> dict[str, torch.Tensor]:
    """``{reward name: scores (B,)}`` for each registered reward in ``names`` (standardised with a
    ``calibration`` manifest when given)."""
    from .rewards import get_reward

    return {n: get_reward(n, device=device, calibration=calibration)(images, list(prompts), None)[0].cpu()
            for n in names}


def image_grid(images: torch.Tensor, ncols: int, scale: int = 4, pad: int = 1) -> torch.Tensor:
    """Tile (B, C, H, W) images in [0, 1] into one (C, H', W') image, row-major, ``scale``x nearest upscaling."""
    if images.dim() != 4 or images.shape[0] == 0:
        raise ValueError(f"images must be a non-empty (B, C, H, W) tensor, got {tuple(images.shape)}")
    B, C, H, W = images.shape
    x = images.repeat_interleave(scale, 2).repeat_interleave(scale, 3)
    rows = (B + ncols - 1) // ncols
    h, w = H * scale + pad, W * scale + pad
    grid = torch.full((C, rows * h + pad, ncols * w + pad), 0.5)  # grey separators
    for i in range(B):
        r, c = divmod(i, ncols)
        grid[:, pad + r * h: pad + r * h + H * scale, pad + c * w: pad + c * w + W * scale] = x[i]
    return grid


IMAGE_FORMATS = {".png": "PNG", ".jpg": "JPEG", ".jpeg": "JPEG", ".webp": "WEBP", ".bmp": "BMP",
                 ".tif": "TIFF", ".tiff": "TIFF"}


def image_format(path: str | Path, arg: str = "-o") -> str:
    """The PIL format that ``path``'s extension names (``.png``, ``.jpg``, ...), else a ValueError naming ``arg``."""
    suffix = Path(path).suffix.lower()
    if suffix not in IMAGE_FORMATS:
        raise ValueError(f"{arg} {str(path)!r}: the extension must name an image format, one of "
                         f"{', '.join(IMAGE_FORMATS)} (PNG is lossless)")
    return IMAGE_FORMATS[suffix]


def save_png(image: torch.Tensor, path: str | Path, arg: str = "-o") -> Path:
    """Write a (C, H, W) image in [0, 1] atomically, in the format its extension names (PNG, JPEG, ...).

    Raises:
        ValueError: an extension that names no image format (the message names ``arg``).
    """
    import numpy as np
    from PIL import Image

    from ._io import atomic_write

    fmt = image_format(path, arg)
    arr = (image.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
    pil = Image.fromarray(arr[..., 0], mode="L") if arr.shape[-1] == 1 else Image.fromarray(np.ascontiguousarray(arr))
    options = {"quality": 95} if fmt in ("JPEG", "WEBP") else {}
    path = Path(path)
    atomic_write(path, lambda tmp: pil.save(tmp, format=fmt, **options))
    return path
