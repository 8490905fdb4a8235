"""What the web app's controls do, as plain functions over the library (no gradio here).

Each function takes a :class:`Session` (the loaded pipeline and reward functions) and the values of
the page's controls, calls the library (``zoo.generate`` for generation with a blend, ``core`` for
validation, ``rewards`` for scores) and returns what the page shows. Errors a user can cause (an
invalid blend, LS with lambda > 1) come out as the library's ``ValueError``; the UI turns them into
a message in the page.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ..core.blend import Blend
from ..generation import generate, image_grid

__all__ = ["METHOD_LABELS", "Session", "View", "make_session", "blend_weights", "weights_text", "generate_view",
           "strip_view", "reward_direction", "reward_table", "to_arrays"]

METHOD_LABELS = {"DB-MPA": "mpa", "DB-MPA-LS": "ls", "Rewarded Soup": "soup"}  # shown name -> library method


@dataclass
class Session:
    """The app's loaded state: a BlendPipeline, its reward functions, and optional sweep records.

    ``lock`` serialises generation: a pipeline call wraps the denoiser's forward for its duration,
    so two calls must not overlap (the page may fire a slider event while another one runs).
    """

    bp: Any
    rewards: dict[str, Any]  # name -> fn(images, prompts, metadata) -> (scores, info)
    records: list[dict] | None = None
    scale: int = 8  # nearest-neighbour upscaling of the shown images (16 x 16 digits -> 128 x 128)
    lock: threading.Lock = field(default_factory=threading.Lock)
    backends: dict = field(default_factory=dict)  # (steps, guidance) -> evaluate backend, for records points
    prompt: str = "7"  # the prompt box's first value (an embedded model's first default prompt)
    guidance_scale: float = 2.0  # the guidance slider's first value

    @property
    def adapter_names(self) -> list[str]:
        return self.bp.adapter_names


@dataclass
class View:
    """What one generation shows: images (uint8 H x W x C arrays), their rewards, the blend used."""

    images: list[np.ndarray]
    scores: dict[str, list[float | None]]  # reward -> one score per image (None: the reward cannot score it)
    captions: list[str]
    weights: dict[str, float] | list[dict[str, float]]
    seconds: float


def make_session(model: str | None = None, adapters: Mapping[str, str] | None = None, *, device: str = "cpu",
                 rewards: Sequence[str] | None = None, records: str | None = None, mode: str = "auto") -> Session:
    """Load the pipeline (the embedded default and its shipped adapters when ``model`` is None), the
    rewards (default: every registered one for the default model, those named after the adapters
    otherwise) and the records of a sweep (``--records``)."""
    from ..rewards import available_rewards, get_reward
    from ..generation import embedded_model, load_blend_pipeline, reward_names_for, shipped_adapters

    embedded = embedded_model(model)
    if adapters is None:
        adapters = shipped_adapters(model=model) if embedded else {}
    bp = load_blend_pipeline(model, dict(adapters), device=device, mode=mode)
    if not bp.adapter_names:
        raise ValueError("the app needs at least one adapter: pass --adapter NAME=PATH")
    bp.pipe.set_progress_bar_config(disable=False, leave=False, desc="denoising")  # tracked by gr.Progress
    if rewards is None:
        if embedded is not None and embedded.name == "digits":
            rewards = available_rewards()
        else:
            rewards = reward_names_for(bp.adapter_names, always=embedded.report_rewards if embedded else ())
    fns = {n: get_reward(n, device=device) for n in rewards}
    recs = None
    if records is not None:
        from ..evaluate.records import read_records

        recs = read_records(records)
        if not recs:
            raise ValueError(f"--records {records}: the file holds no records")
    extra = {"prompt": embedded.prompts[0], "guidance_scale": embedded.guidance_scale,
             "scale": max(1, 128 // bp.pipe.unet.config.sample_size) if getattr(bp.pipe, "unet", None) else 8} \
        if embedded is not None and embedded.prompts else {}
    return Session(bp=bp, rewards=fns, records=recs, **extra)


def blend_weights(session: Session, values: Sequence[float]) -> dict[str, float]:
    """The weights as they will be used: the sliders' values renormalised to sum to 1 (``Blend.create``)."""
    names = session.adapter_names
    if len(values) != len(names):
        raise ValueError(f"got {len(values)} weights for {len(names)} adapters {names}")
    blend = Blend.create(dict(zip(names, (float(v) for v in values))), names, normalize=True)
    return dict(zip(blend.names, blend.weights))


def weights_text(weights: Mapping[str, float]) -> str:
    """``"w = jpeg_compressibility 0.30, legibility 0.70"``."""
    return "w = " + ", ".join(f"{n} {w:.2f}" for n, w in weights.items())


def to_arrays(images: torch.Tensor, scale: int) -> list[np.ndarray]:
    """(B, C, H, W) in [0, 1] -> B uint8 (H*scale, W*scale, C) arrays, nearest-neighbour upscaled."""
    out = []
    for x in images:
        grid = image_grid(x[None], ncols=1, scale=scale, pad=0)  # (C, H', W')
        arr = (grid.clamp(0, 1) * 255).round().to(torch.uint8).permute(1, 2, 0).numpy()
        out.append(np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr)
    return out


def _scores(session: Session, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, list[float | None]]:
    out: dict[str, list[float | None]] = {}
    for name, fn in session.rewards.items():
        try:
            out[name] = [float(s) for s in fn(images, list(prompts), None)[0].cpu()]
        except ValueError:  # e.g. legibility of a prompt that names no digit
            out[name] = [None] * len(images)
    return out


def _caption(scores: Mapping[str, list[float | None]], j: int, head: str = "") -> str:
    parts = [f"{n} {'n/a' if v[j] is None else f'{v[j]:.3f}'}" for n, v in scores.items()]
    return " | ".join(([head] if head else []) + parts)


def _run(session: Session, prompts: list[str], weights, seeds: list[int], *, kl_strength: float, method: str,
         steps: int, guidance: float) -> tuple[torch.Tensor, float]:
    """One batched library call (under the session's lock); images and wall seconds."""
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    with session.lock, torch.no_grad():
        t0 = time.perf_counter()
        images = generate(session.bp, prompts, weights, kl_strength=float(kl_strength), method=method,
                          seed=seeds, num_inference_steps=int(steps), guidance_scale=float(guidance), eta=1.0)
        return images, time.perf_counter() - t0


def generate_view(session: Session, values: Sequence[float], kl_strength: float, method: str, prompt: str,
                  seed: int, steps: int, guidance: float, num_images: int = 1) -> View:
    """Images of ``prompt`` under the blend of the sliders; image j uses noise seed ``seed + j``."""
    method = METHOD_LABELS.get(method, method)
    weights = blend_weights(session, values)
    n = int(num_images)
    if n < 1:
        raise ValueError(f"images must be >= 1, got {num_images}")
    prompts = [str(prompt)] * n
    images, secs = _run(session, prompts, weights, [int(seed) + j for j in range(n)], kl_strength=kl_strength,
                        method=method, steps=steps, guidance=guidance)
    scores = _scores(session, images, prompts)
    caps = [_caption(scores, j, f"seed {int(seed) + j}") for j in range(n)]
    return View(to_arrays(images, session.scale), scores, caps, weights, secs)


def strip_view(session: Session, a: str, b: str, points: int, kl_strength: float, method: str, prompt: str,
               seed: int, steps: int, guidance: float) -> View:
    """The same seed at ``points`` w along the line from adapter ``a`` (w = 0) to ``b`` (w = 1), in ONE
    batched call: per-image weights (``RowBlend``; soup runs one forward per distinct w)."""
    method = METHOD_LABELS.get(method, method)
    names = session.adapter_names
    for x in (a, b):
        if x not in names:
            raise ValueError(f"strip adapter {x!r} is not loaded; adapters: {', '.join(names)}")
    if a == b:
        raise ValueError(f"the strip needs two different adapters, got {a!r} twice")
    k = int(points)
    if k < 2:
        raise ValueError(f"strip points must be >= 2, got {points}")
    ts = [j / (k - 1) for j in range(k)]
    weights = [{a: 1.0 - t, b: t} for t in ts]
    prompts = [str(prompt)] * k
    images, secs = _run(session, prompts, weights, [int(seed)] * k, kl_strength=kl_strength, method=method,
                        steps=steps, guidance=guidance)
    scores = _scores(session, images, prompts)
    caps = [_caption(scores, j, f"w({b}) = {t:.2f}") for j, t in enumerate(ts)]
    return View(to_arrays(images, session.scale), scores, caps, weights, secs)


def reward_direction(name: str) -> str:
    """What a higher score means, from the reward's registered description ("higher = more legible")."""
    from ..rewards import reward_info

    desc = reward_info().get(name, "")
    m = re.search(r"higher = [^,;()]+", desc)
    return m.group(0).strip() if m else "higher = better"


def reward_table(scores: Mapping[str, Sequence[float | None]], labels: Sequence[str]) -> str:
    """A markdown table: one row per reward (name, direction), one column per image."""
    head = "| reward | direction | " + " | ".join(labels) + " |"
    rule = "| --- | --- | " + " | ".join("---:" for _ in labels) + " |"
    rows = [f"| {n} | {reward_direction(n)} | " + " | ".join("n/a" if v is None else f"{v:.3f}" for v in vals) + " |"
            for n, vals in scores.items()]
    return "\n".join([head, rule, *rows])
