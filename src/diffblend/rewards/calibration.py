"""Reward calibration: standardise each reward against the base model's own samples.

Rewards live on unrelated scales (CLIPScore ~0.7, PickScore ~21, aesthetic ~5, OCR in [0, 1]), so a
weight w_i in r(w) = sum_i w_i r_i mostly says whose units are largest. With a calibration, each
reward becomes ``(r_i - mean_i) / std_i`` (mean and std of r_i on base-model samples), and then w_i
weighs rewards in units of "one standard deviation of the base model": r(w) = sum_i w_i z_i.

The manifest (JSON, kept beside the adapters)::

    {"kind": "diffblend-reward-calibration", "version": 1, "model": "<what made the samples>",
     "rewards": {"clip_score": {"mean": 0.71, "std": 0.05, "n": 256}, ...}}
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

__all__ = ["calibration_stats", "calibrate_images", "save_calibration", "load_calibration", "calibrated"]

KIND = "diffblend-reward-calibration"


def calibration_stats(scores: Mapping[str, torch.Tensor]) -> dict[str, dict[str, float]]:
    """``{name: (N,) scores}`` -> ``{name: {"mean", "std", "n"}}`` (std with Bessel's correction, N >= 2)."""
    out = {}
    for name, s in scores.items():
        s = torch.as_tensor(s).detach().double().flatten().cpu()
        if s.numel() < 2 or not torch.isfinite(s).all():
            raise ValueError(f"calibrating {name!r} needs >= 2 finite scores, got {s.numel()} ({s.tolist()[:4]}...)")
        out[name] = {"mean": float(s.mean()), "std": float(s.std()), "n": int(s.numel())}
    return out


@torch.no_grad()
def calibrate_images(images: torch.Tensor, prompts: Sequence[str], rewards: Sequence[str],
                     device: str | torch.device = "cpu", options: Mapping[str, Mapping[str, Any]] | None = None,
                     batch_size: int = 8) -> dict[str, dict[str, float]]:
    """Score base-model samples (N, 3, H, W) in [0, 1] with each reward and return their statistics."""
    from .registry import get_reward

    if len(prompts) != images.shape[0]:
        raise ValueError(f"calibration needs one prompt per image: {images.shape[0]} images, {len(prompts)} prompts")
    options = options or {}
    scores = {}
    for name in rewards:
        fn = get_reward(name, device=device, **options.get(name, {}))
        parts = [fn(images[i:i + batch_size], list(prompts[i:i + batch_size]), None)[0].cpu()
                 for i in range(0, images.shape[0], batch_size)]
        scores[name] = torch.cat(parts)
    return calibration_stats(scores)


def save_calibration(path: str | Path, stats: Mapping[str, Mapping[str, float]], model: str = "") -> Path:
    """Write the manifest (atomically) and return its path."""
    from .._io import atomic_write_json

    atomic_write_json(path, {"kind": KIND, "version": 1, "model": str(model), "rewards": dict(stats)})
    return Path(path)


def load_calibration(path: str | Path) -> dict[str, dict[str, float]]:
    """``{name: {"mean", "std", ...}}`` from a manifest, checked (a clear error naming the file)."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"calibration file {str(p)!r} does not exist")
    data = json.loads(p.read_text())
    if not isinstance(data, dict) or data.get("kind") != KIND or not isinstance(data.get("rewards"), dict):
        raise ValueError(f"{p} is not a reward calibration manifest (kind {KIND!r} with a 'rewards' table)")
    for name, st in data["rewards"].items():
        if not (math.isfinite(st.get("mean", math.nan)) and st.get("std", 0) > 0):
            raise ValueError(f"{p}: reward {name!r} needs a finite mean and a std > 0, got {st}")
    return data["rewards"]


def calibrated(fn: Any, mean: float, std: float) -> Any:
    """``fn`` standardised: scores ``(r - mean) / std``; ``info["raw"]`` keeps r. Differentiable if fn is."""
    if not std > 0:
        raise ValueError(f"calibration std must be > 0, got {std}")

    def wrapped(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        s, info = fn(images, prompts, metadata)
        return (s - float(mean)) / float(std), {**info, "raw": s.detach()}

    return wrapped
