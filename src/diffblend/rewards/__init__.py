"""Rewards for alignment: a registry of small factories (see :mod:`diffblend.rewards.registry`).

    fn = get_reward("legibility", device="cpu")
    scores, info = fn(images, prompts, metadata)   # images (B, C, H, W) in [0, 1]; scores (B,)
    fn = get_reward("jpeg_compressibility=0.5,legibility=0.5")   # weighted, for the MORL oracle

Built in: ``jpeg_compressibility`` (alias ``compressibility``), ``legibility``, ``boldness``.
"""

from .registry import (
    RewardFn,
    RewardSpec,
    UnknownRewardError,
    available_rewards,
    canonical_name,
    combine_rewards,
    get_reward,
    parse_reward_weights,
    register_reward,
    reward_info,
    weighted_reward,
)

__all__ = ["RewardFn", "RewardSpec", "UnknownRewardError", "available_rewards", "canonical_name", "combine_rewards", "get_reward",
           "parse_reward_weights", "register_reward", "reward_info", "weighted_reward"]
