"""Resolve ``--reward`` into a reward function, including weighted rewards r(w) = sum_i w_i r_i (MORL).

A reward is ``fn(images, prompts, metadata) -> (scores, info)`` with images (B, C, H, W) in [0, 1]
and scores (B,), higher is better (ddpo-pytorch's contract, the one of ``diffblend.rewards``).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str], Any], "tuple[torch.Tensor, dict]"]

__all__ = ["RewardFn", "parse_reward_spec", "resolve_reward", "weighted_reward"]


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"a"`` -> {"a": 1.0}; ``"a=0.25,b=0.75"`` -> {"a": 0.25, "b": 0.75}.

    Raises:
        ValueError: for an empty spec, a malformed item, a repeated name, a weight that is not a
            finite number >= 0, or weights that do not sum to 1 (w is a probability vector).
    """
    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("reward is empty; expected NAME or NAME=W,NAME=W (e.g. jpeg_compressibility=0.5,legibility=0.5)")
    if "=" not in spec:
        if "," in spec:
            raise ValueError(f"reward {spec!r}: several names need weights, e.g. a=0.5,b=0.5")
        return {spec.strip(): 1.0}
    out: dict[str, float] = {}
    for item in spec.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"reward item {item!r} is malformed; expected NAME=W, e.g. legibility=0.5")
        if name in out:
            raise ValueError(f"reward names {name!r} twice")
        try:
            w = float(value)
        except ValueError:
            raise ValueError(f"reward item {item!r}: {value.strip()!r} is not a number") from None
        if not math.isfinite(w) or w < 0:
            raise ValueError(f"reward weight of {name!r} must be a finite number >= 0, got {value.strip()!r}")
        out[name] = w
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"reward weights must sum to 1 (w is a probability vector), got {total:.6g} in {spec!r}")
    return out


def weighted_reward(parts: Mapping[str, tuple[float, RewardFn]]) -> RewardFn:
    """r(w) = sum_i w_i r_i over ``{name: (w_i, r_i)}``; info holds each r_i's scores as ``"<name>"``."""

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None):
        total, info = None, {}
        for name, (w, r) in parts.items():
            scores, sub = r(images, prompts, metadata)
            scores = torch.as_tensor(scores, dtype=torch.float32).reshape(-1)
            info[name] = scores.detach()
            info.update({f"{name}/{k}": v for k, v in (sub or {}).items()})
            total = w * scores if total is None else total + w * scores
        return total, info

    return fn


def resolve_reward(spec: str, get_reward: Callable[[str], RewardFn] | None = None,
                   device: str | torch.device = "cpu") -> RewardFn:
    """The reward function for ``spec`` (a name, or NAME=W,... for a weighted reward r(w)).

    Args:
        spec: a reward name (aliases allowed) or NAME=W,... with w >= 0 summing to 1.
        get_reward: name -> reward function (tests inject stand-ins); default: the
            ``diffblend.rewards`` registry, whose names and aliases are canonicalised and whose
            weighted reward reports each component in ``info["components"]``.
        device: where the registry's reward models run.

    Raises:
        ValueError: malformed spec, weights that do not sum to 1, or an unknown name (listing the
            known ones).
    """
    if get_reward is not None:
        weights = parse_reward_spec(spec)
        fns = {}
        for name in weights:
            try:
                fns[name] = get_reward(name)
            except KeyError as exc:
                raise ValueError(f"unknown reward {name!r}" + (f": {exc.args[0]}" if exc.args else "")) from None
        if len(weights) == 1:
            return fns[next(iter(weights))]
        return weighted_reward({n: (w, fns[n]) for n, w in weights.items()})

    from diffblend import rewards  # the registry; its factories import their models lazily

    parse_reward_spec(spec)  # the same form checks and the sum-to-1 rule for every spec
    try:
        if "=" in spec:
            weights = rewards.parse_reward_weights(spec)
            return rewards.weighted_reward(weights, device=device)
        return rewards.get_reward(spec.strip(), device=device)
    except KeyError as exc:  # UnknownRewardError lists the allowed names
        raise ValueError(str(exc)) from None
