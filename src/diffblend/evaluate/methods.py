"""The methods registry: every method of the comparison behind one generation call.

``generate(backend, setting, prompts, seeds)`` runs one setting (method, w, lambda) on a batch and
returns images plus the number of denoiser evaluations per image, so a sweep treats every method
alike. A :class:`Backend` is what the methods need from a model family (the analytic toy, the
embedded digits model, any diffusers pipeline with one LoRA adapter per reward):

    base    the pretrained model                                           1 x steps
    mpa     DB-MPA: eps = sum_i w_i eps_i                                  m x steps (active adapters)
    ls      DB-MPA-LS: one adapter drawn per step and sample (Prop. 2)    1 x steps
    ls_stratified, ls_golden   DB-MPA-LS whose draws over a sample's run are stratified (same
            per-step law, far less spread of each image's mix; Blend ls_draws)  1 x steps
    soup    Rewarded Soup: the model with weights W + sum_i w_i dW_i        1 x steps
    kla     DB-KLA / joint: eps = (1 - lambda) eps_pre + lambda sum_i w_i eps_i
    rgg     reward-gradient guidance on the base (baselines.rgg)          1 x steps + reward grads
    code    controlled decoding on the base (baselines.code)              ~N x steps
    morl    the MORL oracle fine-tuned on r(w) (one adapter per w)         1 x steps

Noise is paired: image (prompt, seed) draws x_T and all its step noise from one generator seeded
by :func:`sample_seed`, whatever the method, w, lambda or batch it is in; LS's adapter draws are
keyed on the same per-image seed (``Blend.sample_keys``), so they too follow the image, not its
row in the batch (a resumed sweep reproduces every image).
"""

from __future__ import annotations

import warnings
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .._fields import setting
from ..baselines._common import ScoreFn
from ..baselines.code import CoDeConfig, code_sample
from ..baselines.rgg import RGGConfig, rgg_sample
from ..core.blend import Blend
from ..core.sampling import Denoiser, NoiseSchedule, randn, sample

__all__ = ["METHOD_NAMES", "Backend", "Setting", "MethodOptions", "GenResult", "generate", "sample_seed",
           "register_method"]


class Backend:
    """What the methods need from a model family. Subclasses set the attributes and methods.

    Attributes:
        schedule: the VP noise schedule of the model.
        timesteps: (S,) descending inference timesteps.
        sample_shape: shape of one sample x (e.g. (1, 16, 16)).
        reward_names: names of every reward that :meth:`score` returns, in order.
        adapter_names: names of the per-reward adapters (weights of a setting are over these).
        dtype, device: of the samples.
    """

    schedule: NoiseSchedule
    timesteps: torch.Tensor
    sample_shape: tuple[int, ...]
    reward_names: tuple[str, ...]
    adapter_names: tuple[str, ...]
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")

    def encode(self, prompts: Sequence[str]) -> Any:
        """The conditioning of a batch of prompts (batch-first tensors, or None)."""
        return None

    def denoiser(self, blend: Blend | None) -> Denoiser:
        """``(x_t, t, cond) -> prediction`` of the base (blend None) or a blend, guidance inside."""
        raise NotImplementedError

    def oracle_denoiser(self, weights: Mapping[str, float]) -> Denoiser:
        """The MORL oracle fine-tuned on r(w); ValueError if there is none for w."""
        raise ValueError(f"{type(self).__name__} has no MORL oracle")

    def decode(self, x0: torch.Tensor) -> torch.Tensor:
        """Samples -> images the rewards read, differentiable (identity for the toy)."""
        return x0

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        """Every reward of every image: ``{name: (B,)}`` (no gradient)."""
        raise NotImplementedError

    def score_fn(self, weights: Mapping[str, float], prompts: Sequence[str], *, differentiable: bool) -> ScoreFn:
        """The weighted reward sum_i w_i r_i of images generated for ``prompts`` (rows may repeat
        each prompt several times in order, as CoDe's candidates do)."""
        raise NotImplementedError

    def to_images(self, x0: torch.Tensor) -> torch.Tensor:
        """Final samples -> images (B, C, H, W) in [0, 1] for saving; the toy has none."""
        return self.decode(x0)

    def stochasticity(self, eta: float) -> float:
        """The sampler's noise at the methods' ``eta``: eta itself for DDIM (a flow-matching backend:
        its SDE's noise level times eta). 0 means a deterministic sampler."""
        return eta

    def sample(self, denoiser: Denoiser, x: torch.Tensor, cond: Any, *, eta: float, generators: Any):
        """The reverse process from x: DDIM(eta) on ``schedule`` / ``timesteps`` (a flow-matching
        backend overrides it; see :class:`~.pipelines.DiffusersBackend`)."""
        return sample(denoiser, x, self.schedule, self.timesteps, cond, eta=eta, generators=generators)


@dataclass(frozen=True)
class Setting:
    """One point of a sweep: method, w over adapter names (None for the base), lambda (None when
    the method has none)."""

    method: str
    weights: tuple[tuple[str, float], ...] | None = None
    lam: float | None = None

    @classmethod
    def make(cls, method: str, weights: Mapping[str, float] | None = None, lam: float | None = None) -> Setting:
        if method not in METHOD_NAMES:
            raise ValueError(f"method must be one of {sorted(METHOD_NAMES)}, got {method!r}")
        w = None if weights is None else tuple((str(k), float(v)) for k, v in weights.items())
        return cls(method, w, None if lam is None else float(lam))

    @property
    def weights_dict(self) -> dict[str, float] | None:
        return None if self.weights is None else dict(self.weights)


@dataclass(frozen=True)
class MethodOptions:
    """Settings shared by every method of a sweep."""

    eta: float = setting(1.0, "DDIM eta of every method (1: the stochastic sampler LS needs; flow-matching models: "
                              "the SDE at noise level * eta)")
    rgg: RGGConfig = setting(default_factory=RGGConfig, help="reward-gradient guidance settings (its eta: this eta)")
    rgg_tuned: RGGConfig | None = setting(None, "method 'rgg_tuned': RGG with a scale chosen on held-out prompts")
    code: CoDeConfig = setting(default_factory=CoDeConfig, help="controlled decoding settings (its eta: this eta)")
    blend_seed: int = setting(0, "seed of the LS adapter draws (with the per-image keys)")


@dataclass
class GenResult:
    """x0: (B, ...) final samples; nfe: denoiser evaluations per image."""

    x0: torch.Tensor
    nfe: float


def sample_seed(prompt: str, seed: int) -> int:
    """The seed of image (prompt, seed): stable across runs and machines (crc32, not hash())."""
    return (int(seed) * 1_000_003 + zlib.crc32(str(prompt).encode())) % (2**63 - 1)


def _noise(backend: Backend, prompts: Sequence[str], seeds: Sequence[int]):
    gens = [torch.Generator().manual_seed(sample_seed(p, s)) for p, s in zip(prompts, seeds)]
    x = randn((len(prompts), *backend.sample_shape), gens, dtype=backend.dtype, device=backend.device)
    return x, gens


def _blend(setting: Setting, method: str, options: MethodOptions, prompts: Sequence[str],
           seeds: Sequence[int], ls_draws: str = "iid", timesteps: torch.Tensor | None = None) -> Blend:
    if setting.weights is None:
        raise ValueError(f"method {setting.method!r} needs weights")
    lam = 1.0 if setting.lam is None else setting.lam
    keys = [sample_seed(p, s) for p, s in zip(prompts, seeds)] if method == "ls" else None
    return Blend.create(setting.weights_dict, kl_strength=lam, method=method, seed=options.blend_seed,
                        sample_keys=keys, ls_draws=ls_draws, timesteps=None if ls_draws == "iid" else timesteps)


def _plain(backend, setting, prompts, seeds, options, denoiser, nfe_per_step) -> GenResult:
    x, gens = _noise(backend, prompts, seeds)
    out = backend.sample(denoiser, x, backend.encode(prompts), eta=options.eta, generators=gens)
    return GenResult(out.sample, nfe_per_step * len(backend.timesteps))


def _gen_base(backend, setting, prompts, seeds, options):
    return _plain(backend, setting, prompts, seeds, options, backend.denoiser(None), 1)


def _gen_blend(method: str, ls_draws: str = "iid") -> Callable:
    def gen(backend, setting, prompts, seeds, options):
        blend = _blend(setting, method, options, prompts, seeds, ls_draws, backend.timesteps)
        if method == "ls" and backend.stochasticity(options.eta) == 0:
            warnings.warn("method 'ls' is exact in distribution only with a stochastic sampler (Prop. 2: DDIM "
                          "eta > 0, or the flow SDE's noise level > 0); without sampler noise it is a randomised "
                          "heuristic", stacklevel=2)
        per_step = len(blend.active()) if method == "mpa" else 1
        return _plain(backend, setting, prompts, seeds, options, backend.denoiser(blend), per_step)

    return gen


def _gen_morl(backend, setting, prompts, seeds, options):
    if setting.weights is None:
        raise ValueError("method 'morl' needs the weights w of its oracle")
    return _plain(backend, setting, prompts, seeds, options, backend.oracle_denoiser(setting.weights_dict), 1)


def _need_vp(backend: Backend, method: str) -> None:
    if getattr(backend, "schedule", None) is None:
        raise ValueError(f"method {method!r} needs a VP (DDPM / DDIM) noise schedule; this model is flow matching: "
                         f"use base, mpa, ls, ls_stratified, ls_golden, soup, kla or morl")


def _gen_rgg_with(option: str) -> Callable:
    """RGG with the settings ``options.<option>`` ("rgg": the authors'; "rgg_tuned": a tuned scale)."""
    def gen(backend, setting, prompts, seeds, options):
        _need_vp(backend, option)
        rgg = getattr(options, option)
        if rgg is None:
            raise ValueError(f"method {option!r} needs MethodOptions.{option} (an RGGConfig)")
        x, gens = _noise(backend, prompts, seeds)
        cfg = RGGConfig(**{**rgg.__dict__, "eta": options.eta})
        fn = backend.score_fn(setting.weights_dict, prompts, differentiable=True)
        out = rgg_sample(backend.denoiser(None), x, backend.schedule, backend.timesteps, backend.encode(prompts),
                         score_fn=fn, config=cfg, decode=backend.decode, generators=gens)
        return GenResult(out.sample, out.nfe)

    return gen


def _gen_code(backend, setting, prompts, seeds, options):
    _need_vp(backend, "code")
    x, gens = _noise(backend, prompts, seeds)
    cfg = CoDeConfig(**{**options.code.__dict__, "eta": options.eta})
    N = cfg.num_candidates
    fn = backend.score_fn(setting.weights_dict, [p for p in prompts for _ in range(N)], differentiable=False)
    out = code_sample(backend.denoiser(None), x, backend.schedule, backend.timesteps, backend.encode(prompts),
                      score_fn=fn, config=cfg, decode=backend.decode, generators=gens)
    return GenResult(out.sample, out.nfe)


_REGISTRY: dict[str, Callable] = {
    "base": _gen_base, "mpa": _gen_blend("mpa"), "ls": _gen_blend("ls"), "soup": _gen_blend("soup"),
    "ls_stratified": _gen_blend("ls", "stratified"), "ls_golden": _gen_blend("ls", "golden"),
    "kla": _gen_blend("mpa"), "rgg": _gen_rgg_with("rgg"), "rgg_tuned": _gen_rgg_with("rgg_tuned"),
    "code": _gen_code, "morl": _gen_morl,
}
METHOD_NAMES = frozenset(_REGISTRY)


def register_method(name: str, fn: Callable) -> None:
    """Add a method: ``fn(backend, setting, prompts, seeds, options) -> GenResult``."""
    global METHOD_NAMES
    _REGISTRY[name] = fn
    METHOD_NAMES = frozenset(_REGISTRY)


def generate(backend: Backend, setting: Setting, prompts: Sequence[str], seeds: Sequence[int],
             options: MethodOptions = MethodOptions()) -> GenResult:
    """Generate one image per (prompt, seed) with the method of ``setting``.

    Note: CoDe's score function is built for its candidate batch (each prompt repeated N times).
    """
    if len(prompts) != len(seeds):
        raise ValueError(f"prompts ({len(prompts)}) and seeds ({len(seeds)}) must have the same length")
    if setting.method not in _REGISTRY:
        raise ValueError(f"method must be one of {sorted(_REGISTRY)}, got {setting.method!r}")
    with torch.no_grad():
        return _REGISTRY[setting.method](backend, setting, list(prompts), list(seeds), options)
