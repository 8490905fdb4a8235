"""The reward registry: names -> small factories that build ``fn(images, prompts, metadata) -> (scores, info)``.

Contract of a reward function (the DDPO convention):
    images:   (B, C, H, W) float tensor in [0, 1] (C = 1 grey ink or 3 RGB), on any device.
    prompts:  B strings.
    metadata: None, one dict for all, or B dicts (e.g. ``{"digit": 7}``).
    returns:  scores (B,) float32 tensor on the images' device, higher is better, and an ``info``
              dict of extra (B,) tensors or numbers for logging.

A factory ``factory(device="cpu", **options) -> fn`` does its heavy imports and loading inside, so
importing this module is cheap. New rewards join with :func:`register_reward`; a reward model kept
in a local folder joins by holding a ``reward.json`` (``{"factory": NAME, "options": {...}}``): the
folder's path then works wherever a name does, and the factory receives ``path=<folder>``.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str], Any], "tuple[torch.Tensor, dict]"]

__all__ = ["RewardFn", "RewardSpec", "UnknownRewardError", "register_reward", "available_rewards", "get_reward",
           "reward_info", "parse_reward_weights", "weighted_reward", "combine_rewards", "canonical_name"]


class UnknownRewardError(KeyError, ValueError):
    """A reward name that is not registered (a KeyError for registries, a ValueError for users)."""

    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class RewardSpec:
    """A registered reward: its factory and what it measures (range and direction, for --help)."""

    name: str
    factory: Callable[..., RewardFn]
    description: str
    aliases: tuple[str, ...] = ()
    needs_model: bool = False  # needs options (a model folder, a url) or a package: not in the default set
    listed: bool = True  # False: a model-specific reward (the colour model's), resolved by name only


_REGISTRY: dict[str, RewardSpec] = {}
_ALIASES: dict[str, str] = {}


def register_reward(name: str, description: str, aliases: Sequence[str] = (), needs_model: bool = False,
                    listed: bool = True) -> Callable:
    """Decorator: register ``factory(device="cpu", **options) -> fn`` under ``name`` (and ``aliases``).

    ``needs_model``: the reward needs a model folder, a url or an extra package, so it is left out of
    :func:`available_rewards`' default set (what sweeps and ``generate`` score with when not told).
    ``listed=False``: a reward of one model only (the colour model's rewards do not apply to digits): also out
    of the default set; it still resolves by name everywhere and shows in :func:`reward_info`.
    """

    def deco(factory: Callable[..., RewardFn]) -> Callable[..., RewardFn]:
        for n in (name, *aliases):
            if n in _REGISTRY or n in _ALIASES:
                raise ValueError(f"reward name {n!r} is already registered")
            if not n or any(c in n for c in "=,"):
                raise ValueError(f"reward name {n!r} must be non-empty and contain no '=' or ','")
        _REGISTRY[name] = RewardSpec(name, factory, description, tuple(aliases), needs_model, bool(listed))
        for a in aliases:
            _ALIASES[a] = name
        return factory

    return deco


def _ensure_builtins() -> None:
    # registers the built-in rewards on import; the model rewards import their heavy packages lazily
    from . import aesthetic, builtin, clip, colour, hps, http, imagereward, ocr  # noqa: F401
    from ..registry import load_plugins

    load_plugins()  # plug-ins' rewards (the zoo's legibility and prompt_alignment)


def available_rewards(include_models: bool = False, include_unlisted: bool = False) -> list[str]:
    """The canonical names of the registered rewards that run without options, sorted (the default set
    of sweeps and ``generate``); ``include_models=True`` adds those that need a model, url or package,
    ``include_unlisted=True`` the rewards of one model only (registered ``listed=False``)."""
    _ensure_builtins()
    return sorted(n for n, s in _REGISTRY.items()
                  if (include_models or not s.needs_model) and (include_unlisted or s.listed))


def reward_info() -> dict[str, str]:
    """``{name: description}`` for every registered reward (aliases noted in the description)."""
    _ensure_builtins()
    return {n: s.description + (f" (alias: {', '.join(s.aliases)})" if s.aliases else "")
            for n, s in sorted(_REGISTRY.items())}


def canonical_name(name: str) -> str:
    """The registered name for ``name`` or one of its aliases.

    Raises:
        UnknownRewardError: listing the allowed names.
    """
    _ensure_builtins()
    name = str(name).strip()
    if name in _REGISTRY:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    allowed = ", ".join(sorted(_REGISTRY) + sorted(_ALIASES))
    raise UnknownRewardError(f"unknown reward {name!r}; allowed: {allowed} (or a folder with a reward.json)")


def parse_reward_weights(text: str) -> dict[str, float]:
    """``"jpeg_compressibility=0.5,legibility=0.5"`` -> ``{"jpeg_compressibility": 0.5, "legibility": 0.5}``.

    Names are canonicalised (aliases resolved) and must be registered, or be a folder holding a
    ``reward.json`` (kept as written: a model reward with its options, e.g. ``pickscore_dir=0.5,aes_dir=0.5``);
    weights must be finite and >= 0 with a positive sum (they are not renormalised: r(w) = sum_i w_i r_i as written).

    Raises:
        ValueError / UnknownRewardError: naming the malformed item.
    """
    from ..weights import parse_weights

    out: dict[str, float] = {}
    for name, w in parse_weights(text, what="reward weights", example="legibility=0.5", nonnegative=True).items():
        key = name if (Path(name) / "reward.json").is_file() else canonical_name(name)
        if key in out:
            raise ValueError(f"reward weights name {key!r} twice")
        out[key] = w
    if sum(out.values()) <= 0:
        raise ValueError(f"reward weights {text!r} must have a positive sum")
    return out


def combine_rewards(parts: Mapping[str, tuple[float, RewardFn]]) -> RewardFn:
    """r(w) = sum_i w_i r_i over ``{name: (w_i, r_i)}``; ``info["components"][name]`` holds each r_i (B,)."""
    if not parts:
        raise ValueError("a weighted reward must name at least one reward")
    parts = {name: (float(w), r) for name, (w, r) in parts.items()}

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        total = torch.zeros(images.shape[0], dtype=torch.float32, device=images.device)
        components = {}
        for name, (w, r) in parts.items():
            s, _ = r(images, prompts, metadata)
            components[name] = s
            total = total + w * s
        return total, {"components": components, "weights": {n: w for n, (w, _) in parts.items()}}

    return fn


def weighted_reward(weights: Mapping[str, float], device: str | torch.device = "cpu",
                    options: Mapping[str, Mapping[str, Any]] | None = None, calibration: Any = None) -> RewardFn:
    """r(w) = sum_i w_i r_i (the MORL oracle's reward) over registered rewards; see :func:`combine_rewards`.

    ``calibration``: a manifest (see :mod:`.calibration`); every r_i is then (r_i - mean_i) / std_i.
    """
    if not weights:
        raise ValueError("weights must name at least one reward")
    options = options or {}
    return combine_rewards({name: (w, get_reward(name, device=device, calibration=calibration,
                                                 **options.get(name, {}))) for name, w in weights.items()})


def get_reward(name: str, device: str | torch.device = "cpu", calibration: Any = None, **options: Any) -> RewardFn:
    """Build a reward function.

    Args:
        name: a registered name or alias (see :func:`available_rewards`), a weighted sum written
            ``"name=w,other=w"``, or a folder holding a ``reward.json``.
        device: where the reward's model (if any) runs; images may come on any device.
        calibration: None, or a calibration manifest (path) from :mod:`diffblend.rewards.calibration`:
            the reward (each reward of a weighted sum) is standardised, (r - mean) / std, with the
            statistics of its name in the file (an error if the file lacks it).
        options: passed to the factory.

    Raises:
        UnknownRewardError: for an unknown name, listing the allowed ones.
        ValueError: for a malformed weighted spec.
    """
    if not isinstance(name, str):
        raise ValueError(f"reward name must be a string, got {type(name).__name__}")
    if "=" in name or "," in name:
        if options:
            raise ValueError(f"reward {name!r} is a weighted sum: its rewards take no options here "
                             f"(got {sorted(options)}); use weighted_reward(weights, options={{name: {{...}}}})")
        return weighted_reward(parse_reward_weights(name), device=device, calibration=calibration)
    try:
        key = canonical_name(name)
    except UnknownRewardError:
        if name.strip() and (os.sep in name or Path(name).is_dir()):  # a reward model kept in a local folder
            return _calibrate(_from_folder(Path(name), device, options), name, calibration)
        raise
    return _calibrate(_REGISTRY[key].factory(device=device, **options), key, calibration)


def _calibrate(fn: RewardFn, name: str, calibration: Any) -> RewardFn:
    if calibration is None:
        return fn
    from .calibration import calibrated, load_calibration

    stats = load_calibration(calibration)
    if name not in stats:
        raise ValueError(f"calibration {calibration} has no statistics for reward {name!r} (it has {sorted(stats)})")
    return calibrated(fn, stats[name]["mean"], stats[name]["std"])


def _from_folder(folder: Path, device: str | torch.device, options: Mapping[str, Any]) -> RewardFn:
    spec_file = folder / "reward.json"
    if not spec_file.is_file():
        raise FileNotFoundError(f"reward folder {folder} has no reward.json")
    spec = json.loads(spec_file.read_text())
    if "factory" not in spec:
        raise ValueError(f"{spec_file} must name a registered factory: {{\"factory\": NAME, \"options\": {{...}}}}")
    factory = _REGISTRY[canonical_name(spec["factory"])].factory
    return factory(device=device, path=str(folder), **{**spec.get("options", {}), **options})
