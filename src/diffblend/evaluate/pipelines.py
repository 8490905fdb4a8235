"""The methods registry over a diffusers pipeline with one LoRA adapter per reward.

:class:`DiffusersBackend` runs every method on the pipeline's own denoiser through the blending
layer of :mod:`diffblend.pipeline` (``BlendPipeline.denoiser``), in the core's DDIM sampler:

- adapter i is named after its reward r_i (weights of a setting are over reward names, and the
  analysis scores r(w) with the same names);
- the MORL oracles are more adapters on the same base, one per w, run as a one-hot blend;
- Rewarded Soup is the blending layer's ``soup`` method (delta-W = sum_i w_i B_i A_i);
- the model (conditioning, guidance, grid, sampler, decoding) is :class:`diffblend.model.DiffusionModel`:
  classifier-free guidance is its ``guide`` closure around the blended denoiser (uncond and cond
  rows in one call, blended per row: guidance is linear, so that equals guiding the blend);
- images: the VAE decode of the pipeline family, or (x + 1) / 2 for pixel pipelines (the digits
  model), clamped to [0, 1]; this map is differentiable, so RGG back-propagates through it (its
  cost is counted in the seconds).

Every family of :mod:`diffblend.families` works: SD 1.5, SDXL (pooled embeddings + time ids), SD3
(flow matching: the flow SDE with ``noise_level * eta``, or its ODE at eta = 0; RGG and CoDe need a
VP schedule and refuse flow models), the embedded digits model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..core.blend import Blend
from ..core.flow import _check_noise_level
from ..core.sampling import SampleOutput
from ..model import DiffusionModel
from .methods import Backend
from .records import setting_key

__all__ = ["DiffusersBackend", "oracle_adapter_name"]


def oracle_adapter_name(weights: Mapping[str, float]) -> str:
    """The adapter name under which the MORL oracle for w is loaded: ``morl_`` + a digest of w
    (peft module names allow no '.', so the weights cannot be spelled out)."""
    import hashlib

    return "morl_" + hashlib.sha1(setting_key("morl", weights, None).encode()).hexdigest()[:10]


def _oracle_key(weights: Mapping[str, float]) -> str:
    """The MORL oracle's w without its zero weights: r(w) is the same with or without them."""
    return setting_key("morl", {k: v for k, v in weights.items() if v != 0}, None)


class DiffusersBackend(Backend):
    """A diffusers pipeline + per-reward adapters + rewards, as a :class:`~.methods.Backend`.

    Args:
        pipe: the pipeline (its ``unet`` is the shared base), or a ``BlendPipeline``.
        adapters: ``{reward name: LoRA path}``, one adapter per reward (already-loaded adapters
            with those names are used as they are).
        rewards: ``{name: fn(images, prompts, metadata) -> (scores, info)}`` scored on every image;
            or a list of names for ``diffblend.rewards.get_reward``.
        oracles: ``[(w, path)]`` MORL oracle adapters, one per w. At a one-hot w the oracle is the
            reward's own adapter (same fine-tuning objective) unless one is given.
        num_steps: DDIM steps; guidance_scale: CFG scale (<= 1 turns CFG off).
        non_differentiable: what RGG does with a reward that has no gradient: "error" (refuse) or
            "skip" (guide with the differentiable terms of r(w) only; say so in any report).
        mode: the blending layer's execution mode ("auto", "batched", "sequential").
        noise_level: flow-matching models: the flow SDE's noise level a >= 0 at eta 1 (Flow-GRPO's
            0.7; the sampler runs at a * eta, 0 is the ODE); DDIM models ignore it.
    """

    def __init__(self, pipe: Any, adapters: Mapping[str, str | Path] | None = None,
                 rewards: Mapping[str, Any] | Sequence[str] = (), *,
                 oracles: Sequence[tuple[Mapping[str, float], str | Path]] = (), num_steps: int = 20,
                 guidance_scale: float = 2.0, non_differentiable: str = "error", mode: str = "auto",
                 device: str | torch.device | None = None, noise_level: float = 0.7,
                 calibration: str | None = None) -> None:
        from ..pipeline import BlendPipeline

        if non_differentiable not in ("error", "skip"):
            raise ValueError(f"non_differentiable must be 'error' or 'skip', got {non_differentiable!r}")
        self.bp = pipe if isinstance(pipe, BlendPipeline) else BlendPipeline(pipe, mode=mode)
        self.pipe = self.bp.pipe
        loaded = set(self.bp.adapter_names)
        for name, path in (adapters or {}).items():
            if name not in loaded:
                self.bp.load_adapter(name, path)
        self._oracles: dict[str, str] = {}
        for w, path in oracles:
            name = oracle_adapter_name(w)
            if name not in loaded:
                self.bp.load_adapter(name, path)
            self._oracles[_oracle_key(w)] = name
        oracle_names = set(self._oracles.values())
        self.adapter_names = tuple(n for n in self.bp.adapter_names if n not in oracle_names)
        if not isinstance(rewards, Mapping):
            from ..rewards import get_reward

            rewards = {n: get_reward(n, device=str(device or "cpu"), calibration=calibration) for n in rewards}
        self.rewards = dict(rewards)
        self.reward_names = tuple(self.rewards)
        self.non_differentiable = non_differentiable
        self.guidance_scale = float(guidance_scale)
        self.model = DiffusionModel.from_pipeline(self.pipe)
        net = self.model.network
        self.device = torch.device(device) if device is not None else next(net.parameters()).device
        self.dtype = next(net.parameters()).dtype
        self._grid = self.model.grid(num_steps)
        self.timesteps = self.model.timesteps(num_steps)  # what the network sees (flow: sigma * 1000)
        self.schedule = self.model.schedule  # None for flow matching
        self.sample_shape = self.model.latent_shape
        self.noise_level = _check_noise_level(noise_level)
        self._grad_ok: dict[str, bool] = {}

    # -- conditioning and models ------------------------------------------------------------------
    @property
    def _cfg(self) -> bool:
        return self.guidance_scale > 1.0

    def encode(self, prompts: Sequence[str]):
        return self.model.encode(list(prompts))

    def denoiser(self, blend: Blend | None):
        if self.model.guidance_embed:  # guidance-distilled Flux: the scale is an input, one pass (no CFG rows)
            return self.model.guide(self.bp.denoiser(blend, prepare=self.model.prepare), self.guidance_scale)
        inner = self.bp.denoiser(blend, groups=2 if self._cfg else 1, prepare=self.model.prepare)
        return self.model.guide(inner, self.guidance_scale if self._cfg else 1.0)

    def stochasticity(self, eta: float) -> float:
        """DDIM's eta, or the flow SDE's noise level ``noise_level * eta`` (0: the flow ODE)."""
        return self.noise_level * eta if self.model.is_flow else eta

    def sample(self, denoiser, x: torch.Tensor, cond, *, eta: float, generators) -> SampleOutput:
        """The model's sampler on this backend's grid: DDIM(eta), or the flow SDE at
        :meth:`stochasticity` (eta)."""
        return self.model.sample(denoiser, x, self._grid, cond, self.stochasticity(eta), generators=generators)

    def oracle_name(self, weights: Mapping[str, float]) -> str | None:
        """The adapter that serves as the MORL oracle at w, or None."""
        name = self._oracles.get(_oracle_key(weights))
        hot = [n for n, v in weights.items() if v != 0]
        if name is None and len(hot) == 1 and weights[hot[0]] == 1.0 and hot[0] in self.adapter_names:
            # At a one-hot w, r(w) = r_i: the MORL oracle is the adapter fine-tuned on r_i alone.
            name = hot[0]
        return name

    def oracle_denoiser(self, weights: Mapping[str, float]):
        name = self.oracle_name(weights)
        if name is None:
            have = [k.split("|")[1] for k in self._oracles]
            raise ValueError(f"no MORL oracle adapter for w = {dict(weights)}; oracles loaded: {have}")
        return self.denoiser(Blend.create({name: 1.0}))

    # -- images and rewards -----------------------------------------------------------------------
    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        return self.model.decode(x0)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return {n: fn(images, list(prompts), None)[0].detach().float().cpu() for n, fn in self.rewards.items()}

    def _differentiable(self, name: str, images: torch.Tensor, prompts: Sequence[str]) -> bool:
        if name not in self._grad_ok:
            probe = images[:1].detach().clone().requires_grad_(True)
            with torch.enable_grad():
                out = self.rewards[name](probe, list(prompts)[:1], None)[0]
            self._grad_ok[name] = bool(out.requires_grad)
        return self._grad_ok[name]

    def score_fn(self, weights: Mapping[str, float], prompts: Sequence[str], *, differentiable: bool):
        unknown = [n for n in weights if n not in self.rewards]
        if unknown:
            raise ValueError(f"weights name reward(s) {unknown}; rewards scored: {list(self.reward_names)}")
        terms = [(n, float(w)) for n, w in weights.items() if w != 0 and not math.isclose(w, 0.0)]
        prompts = list(prompts)

        def fn(images: torch.Tensor) -> torch.Tensor:
            total = torch.zeros(images.shape[0], device=images.device)
            used = terms
            if differentiable:
                bad = [n for n, _ in terms if not self._differentiable(n, images, prompts)]
                if bad and self.non_differentiable == "error":
                    raise ValueError(f"reward(s) {bad} are not differentiable, so RGG cannot guide with them; "
                                     f"pass non_differentiable='skip' to guide with the other terms only")
                used = [(n, w) for n, w in terms if n not in bad]
            for n, w in used:
                total = total + w * self.rewards[n](images, prompts, None)[0].float()
            return total

        return fn

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return self.decode(x0)


def default_backend(rewards: Sequence[str] | None = None, *, num_steps: int = 20, guidance_scale: float | None = None,
                    non_differentiable: str = "skip", device: str = "cpu", mode: str = "auto",
                    calibration: str | None = None, model: str | None = None) -> DiffusersBackend:
    """An embedded model (``model``: its name; None: the default) with its shipped adapters as a backend;
    ``guidance_scale`` None: the model's own CFG scale.

    Shipped adapters named after a reward are the per-reward adapters; an adapter whose manifest
    entry gives ``"weights"`` (``{reward: w}``) or whose name is ``morl[...]`` / ``morl_...`` with a
    weight spec is a MORL oracle. ``rewards`` defaults to every registered reward.
    """
    from ..generation import load_pipeline
    from ..registry import default_model
    from ..rewards import available_rewards, canonical_name

    embedded = default_model(model)
    per_reward, oracles = shipped_adapter_roles(embedded.name)
    pipe = load_pipeline(embedded.name, device=device)
    guidance_scale = embedded.guidance_scale if guidance_scale is None else guidance_scale
    names = list(rewards) if rewards else available_rewards()
    names = [n if (Path(n) / "reward.json").is_file() else canonical_name(n) for n in names]  # folders as given
    return DiffusersBackend(pipe, per_reward, names, oracles=oracles, num_steps=num_steps,
                            guidance_scale=guidance_scale, non_differentiable=non_differentiable, mode=mode,
                            device=device, calibration=calibration)


def shipped_adapter_roles(model: str | None = None) -> tuple[dict[str, Path], list[tuple[dict[str, float], Path]]]:
    """Split the shipped adapters of an embedded model (None: the default) into ``{reward: path}`` and
    ``[(w, path)]`` MORL oracles."""
    import json
    import re

    from ..registry import default_model
    from ..rewards import canonical_name, parse_reward_weights

    embedded = default_model(model)
    files = embedded.adapters(True)
    folder = embedded.adapters_dir
    manifest = {}
    if folder is not None and (folder / "manifest.json").is_file():
        manifest = json.loads((folder / "manifest.json").read_text()).get("adapters", {})
    per_reward: dict[str, Path] = {}
    oracles: list[tuple[dict[str, float], Path]] = []
    for name, path in files.items():
        entry = manifest.get(name, {})
        w = entry.get("weights") if isinstance(entry, dict) else None
        if w is None and isinstance(entry, dict) and isinstance(entry.get("reward"), str) and "=" in entry["reward"]:
            w = parse_reward_weights(entry["reward"])
        m = re.fullmatch(r"morl[\[_:-]?(.*?)\]?", name)
        if w is None and m and "=" in m.group(1):
            w = parse_reward_weights(m.group(1))
        if w is not None:
            oracles.append(({canonical_name(k): float(v) for k, v in w.items()}, path))
            continue
        try:
            per_reward[canonical_name(name)] = path
        except (KeyError, ValueError):
            continue  # neither a reward's adapter nor an oracle: not used by the comparison
    return per_reward, oracles
