"""The DPOK / DDPO maths: rollouts with log-probs, per-prompt advantages, the clipped loss with KL.

DPOK (Fan et al., 2023) maximises E[r(x0)] - alpha * KL(p_theta || p_pre) over the denoising MDP,
whose actions are the transitions x_t -> x_{t-1} of a stochastic sampler (DDIM eta = 1). Per
stored transition (x_t, x_{t-1}) with advantage A it minimises

    -min(rho * A, clip(rho, 1 - eps, 1 + eps) * A) + alpha * sum_d (eps_theta - eps_pre)^2,
    rho = p_theta(x_{t-1} | x_t) / p_old(x_{t-1} | x_t),

the PPO-clipped ratio of DDPO (Black et al., 2023) and DPOK's KL bound (its Lemma: the path KL is
bounded by a weighted sum of squared noise-prediction differences), eps_pre the frozen base.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from typing import Any

from diffblend.core import ddim_step, randn
from diffblend.core.sampling import map_cond

__all__ = ["Rollouts", "rollout", "per_prompt_rewards", "prompt_groups", "per_prompt_advantages",
           "evaluate_transition", "ppo_loss", "transition_kl", "step_weight"]

Denoiser = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class Rollouts:
    """B trajectories of N steps.

    prompts: B prompts. cond: their conditioning (a (B, L, D) tensor or a dict of batch-first
    tensors). timesteps: (N,) descending: the grid point each transition starts from (VP: t;
    flow matching: sigma). grid: the model's whole grid (flow: N + 1 sigmas ending at 0).
    latents: (N + 1, B, C, h, w), x_T .. x_0. log_probs: (N, B) log p_old(x_{i+1} | x_i) as sampled.
    images: (B, C', H, W) in [0, 1], decoded x_0.
    """

    prompts: list[str]
    cond: Any
    timesteps: torch.Tensor
    latents: torch.Tensor
    log_probs: torch.Tensor
    images: torch.Tensor
    grid: torch.Tensor | None = None


@torch.no_grad()
def rollout(denoiser: Denoiser, policy, prompts: Sequence[str], generators: Sequence[torch.Generator], *,
            num_steps: int, eta: float = 1.0, guidance_scale: float = 1.0,
            uncond: Any = None) -> Rollouts:
    """Sample B = len(prompts) trajectories with the core's sampler, keeping x_t and log-probs.

    Args:
        denoiser: the current policy, ``(x_t, t, cond) -> pred`` (adapter enabled).
        policy: a :class:`~diffblend.model.DiffusionModel` (grid, sampler, encode, decode, shapes).
        eta: the step's stochasticity: DDIM eta, or the flow SDE's noise level (> 0) for flow models.
        generators: one per trajectory: its x_T and its step noise, so a trajectory does not
            depend on the batch it is in.
        uncond: the unconditional conditioning (batch 1), for guidance (default ``policy.uncond()``).
    """
    if len(generators) != len(prompts):
        raise ValueError(f"generators must have one generator per prompt ({len(prompts)}), got {len(generators)}")
    device = policy.device
    cond = map_cond(policy.encode(list(prompts)), lambda v: v.to(device))
    B = len(prompts)
    x = randn((B, *policy.latent_shape), generators, device=device)
    grid = policy.grid(num_steps)
    model = policy.guide(denoiser, guidance_scale, uncond)
    out = policy.sample(model, x, grid, cond, eta, generators=list(generators), keep_trajectory=True)
    starts = torch.stack([a for a, _ in policy.pairs(grid)])
    return Rollouts(prompts=list(prompts), cond=cond, timesteps=starts, latents=out.latents,
                    log_probs=out.log_probs, images=policy.decode(out.sample).float(), grid=grid)


def per_prompt_rewards(rewards: Any, prompts: Sequence[str], dtype: torch.dtype) -> torch.Tensor:
    """The rewards as a flat (B,) tensor of ``dtype``; ValueError unless there is one per prompt."""
    rewards = torch.as_tensor(rewards, dtype=dtype).reshape(-1)
    if rewards.shape[0] != len(prompts):
        raise ValueError(f"rewards has {rewards.shape[0]} entries for {len(prompts)} prompts")
    return rewards


def prompt_groups(prompts: Sequence[str]) -> list[torch.Tensor]:
    """The indices of each distinct prompt's samples, in order of first appearance."""
    return [torch.tensor([i for i, q in enumerate(prompts) if q == p]) for p in dict.fromkeys(prompts)]


def per_prompt_advantages(rewards: torch.Tensor, prompts: Sequence[str], eps: float = 1e-6) -> torch.Tensor:
    """(r - mean_p) / (std_p + eps) within each prompt's group of samples; (B,).

    A reward that every sample of a prompt shares gives advantage 0 to all of them (nothing to
    learn from that group). Groups of one sample use the batch's mean and std instead.
    """
    rewards = per_prompt_rewards(rewards, prompts, torch.float32)
    adv = torch.empty_like(rewards)
    for idx in prompt_groups(prompts):
        group = rewards[idx] if len(idx) > 1 else rewards
        adv[idx] = (rewards[idx] - group.mean()) / (group.std(unbiased=False) + eps)
    return adv


def evaluate_transition(denoiser: Denoiser, policy, x_t: torch.Tensor, t: torch.Tensor, prev_t: torch.Tensor,
                        x_prev: torch.Tensor, cond: Any, *, eta: float = 1.0,
                        guidance_scale: float = 1.0, uncond: Any = None):
    """Re-score the stored transition x_t -> x_prev under ``denoiser``.

    t, prev_t: the transition's grid points (VP: timesteps, -1 after the last; flow: sigma,
    sigma_next; the network is called at ``policy.model_time(t)``); eta: DDIM eta or the flow
    SDE's noise level.

    Returns:
        (step, eps): the core's StepOutput (``log_prob`` (B,), ``mean``, ``std``) with
        ``prev_sample = x_prev``, and eps (B, C, h, w), the guided noise estimate.
    """
    B = x_t.shape[0]
    model = policy.guide(denoiser, guidance_scale, uncond)
    pred = model(x_t, policy.model_time(t).reshape(1).expand(B).to(x_t.device), cond)
    step = policy.transition(pred, t, prev_t, x_t, eta, prev_sample=x_prev)
    return step, policy.to_eps(pred, x_t, t)


def step_weight(schedule, t: torch.Tensor, prev_t: torch.Tensor, eta: float = 1.0) -> float:
    """w_t = sigma_t / |d mean / d pred|: rescales step t's policy gradient to prediction units.

    The score-function gradient of one DDIM step is ((x_prev - mean) / sigma_t^2) * (d mean / d pred)
    * (d pred / d theta) = (z / sigma_t) * k_t * (d pred / d theta), z ~ N(0, I), k_t the (scalar)
    derivative of the step mean in the prediction. |k_t| / sigma_t can vary by orders of magnitude
    over a schedule (about 1600 at t = 999 for 20 "trailing" steps of a cosine schedule, whose
    alpha_bar_999 ~ 2e-9, and about 1 elsewhere), so one step's noise would drown every other
    step's signal; over the 20 steps of the shipped digits model (linear betas) it stays in [0.8, 1.7]. Multiplying
    step t's loss by w_t = sigma_t / |k_t| (a positive constant per step: each step's gradient keeps
    its direction) makes every step contribute z * (d pred / d theta), on the scale of DPOK's KL
    term ||eps_theta - eps_pre||^2. Returns 0 for a deterministic step (sigma_t = 0).
    """
    x = torch.zeros(1, 1, dtype=torch.float64)
    if hasattr(schedule, "transition"):  # a DiffusionModel: its own step (DDIM, or the flow SDE)
        at = lambda pred: schedule.transition(pred, t, prev_t, x, eta, noise=torch.zeros_like(x))  # noqa: E731
    else:
        at = lambda pred: ddim_step(pred, t, x, schedule, prev_t, eta, noise=torch.zeros_like(x))  # noqa: E731
    zero, one = at(torch.zeros_like(x)), at(torch.ones_like(x))
    k = (one.mean - zero.mean).abs().item()  # the mean is affine in pred at fixed x_t
    sigma = float(torch.as_tensor(zero.std).flatten()[0])
    return sigma / k if sigma > 0 and k > 0 else 0.0


def transition_kl(mean: torch.Tensor, mean_pre: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """KL(N(mean, std^2) || N(mean_pre, std^2)) per sample, in nats; (B,). Dimensions with std = 0 give 0."""
    std = std.expand_as(mean)
    pos = std > 0
    kl = (mean - mean_pre) ** 2 / (2 * torch.where(pos, std, torch.ones_like(std)) ** 2)
    return torch.where(pos, kl, torch.zeros_like(kl)).flatten(1).sum(1)


def ppo_loss(log_prob: torch.Tensor, old_log_prob: torch.Tensor, advantages: torch.Tensor,
             clip_range: float, adv_clip_max: float = float("inf"), weight: float = 1.0
             ) -> tuple[torch.Tensor, dict]:
    """PPO-clipped policy-gradient loss, mean over the batch (DDPO's, Black et al. 2023).

    Args:
        log_prob: (B,) under the current policy (with grad). old_log_prob: (B,) as sampled.
        advantages: (B,), clipped to [-adv_clip_max, adv_clip_max].
        clip_range: epsilon of the clip of the ratio rho to [1 - eps, 1 + eps].
        weight: a positive per-step scale (see :func:`step_weight`); 1 = plain DDPO.

    Returns:
        (loss, stats) with stats ``clipfrac`` (share of clipped ratios) and ``approx_kl``
        (0.5 * mean (log rho)^2, a policy-change diagnostic).
    """
    adv = advantages.clamp(-adv_clip_max, adv_clip_max)
    log_ratio = log_prob - old_log_prob
    ratio = torch.exp(log_ratio)
    unclipped = -adv * ratio
    clipped = -adv * ratio.clamp(1.0 - clip_range, 1.0 + clip_range)
    loss = weight * torch.maximum(unclipped, clipped).mean()
    with torch.no_grad():
        stats = {"clipfrac": ((ratio - 1).abs() > clip_range).float().mean().item(),
                 "approx_kl": (0.5 * log_ratio**2).mean().item()}
    return loss, stats
