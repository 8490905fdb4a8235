"""Resolve ``--reward`` into a reward function, including weighted rewards r(w) = sum_i w_i r_i (MORL).

A reward is ``fn(images, prompts, metadata) -> (scores, info)`` with images (B, C, H, W) in [0, 1]
and scores (B,), higher is better (ddpo-pytorch's contract, the one of ``diffblend.rewards``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch

RewardFn = Callable[[torch.Tensor, Sequence[str], Any], "tuple[torch.Tensor, dict]"]

__all__ = ["RewardFn", "parse_reward_spec", "resolve_reward"]


def parse_reward_spec(spec: str) -> dict[str, float]:
    """``"a"`` -> {"a": 1.0}; ``"a=0.25,b=0.75"`` -> {"a": 0.25, "b": 0.75}.

    Raises:
        ValueError: for an empty spec, a malformed item, a repeated name, a weight that is not a
            finite number >= 0, or weights that do not sum to 1 (w is a probability vector).
    """
    from diffblend.weights import parse_weights

    if not isinstance(spec, str) or not spec.strip():
        raise ValueError("reward is empty; expected NAME or NAME=W,NAME=W (e.g. jpeg_compressibility=0.5,legibility=0.5)")
    if "=" not in spec:
        if "," in spec:
            raise ValueError(f"reward {spec!r}: several names need weights, e.g. a=0.5,b=0.5")
        return {spec.strip(): 1.0}
    out = parse_weights(spec, what="reward", example="legibility=0.5", nonnegative=True)
    total = sum(out.values())
    if abs(total - 1.0) > 1e-6:
        raise ValueError(f"reward weights must sum to 1 (w is a probability vector), got {total:.6g} in {spec!r}")
    return out


def resolve_reward(spec: str, get_reward: Callable[[str], RewardFn] | None = None,
                   device: str | torch.device = "cpu", calibration: str | None = None) -> RewardFn:
    """The reward function for ``spec`` (a name, or NAME=W,... for a weighted reward r(w)).

    Args:
        spec: a reward name (aliases allowed) or NAME=W,... with w >= 0 summing to 1.
        get_reward: name -> reward function (tests inject stand-ins); default: the
            ``diffblend.rewards`` registry, whose names and aliases are canonicalised and whose
            weighted reward reports each component in ``info["components"]``.
        device: where the registry's reward models run.
        calibration: a reward calibration manifest (``diffblend calibrate``): every reward is then
            ``(r - mean) / std`` of the base model's images (registry rewards only).

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
        from diffblend.rewards import combine_rewards

        return combine_rewards({n: (w, fns[n]) for n, w in weights.items()})

    from diffblend import rewards  # the registry; its factories import their models lazily

    parse_reward_spec(spec)  # the same form checks and the sum-to-1 rule for every spec
    try:
        if "=" in spec:
            weights = rewards.parse_reward_weights(spec)
            return rewards.weighted_reward(weights, device=device, calibration=calibration)
        return rewards.get_reward(spec.strip(), device=device, calibration=calibration)
    except KeyError as exc:  # UnknownRewardError lists the allowed names
        raise ValueError(str(exc)) from None
