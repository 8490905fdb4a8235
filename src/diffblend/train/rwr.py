"""Reward-weighted regression (RWR): fine-tuning by the denoising loss on the model's own images.

One epoch samples images x0 from the current model p_k (the same rollouts as DPOK), weights each by

    w_b = exp(r_b / beta) / mean_{b' in its prompt's group} exp(r_b' / beta)   (mean 1 per prompt),

and minimises the weighted denoising loss at grid points t of the sampler, x_t = forward(x0, eps, t):

    mean_b w_b * sum_d (eps_theta(x_t^b, t) - eps^b)^2  +  alpha * mean_b sum_d (eps_theta - eps_pre)^2,

the second term DPOK's KL bound to the frozen base (``FinetuneConfig.kl``). The weighted loss's minimiser is
the denoiser of p_k(x0 | prompt) exp(r(x0) / beta) / Z, the KL-regularised optimum of one step with
alpha = beta (Peters and Schaal 2007; for text-to-image, Lee et al. 2023, arXiv:2302.12192). Epochs that fit
their targets compound: k of them tilt the base towards p_pre exp(k r / beta), the target of the paper's
adapters with alpha = beta / k. Both the sample and the loss use the guided prediction (classifier-free
guidance at the rollouts' scale), the model one samples from.

Plain RWR also fits the images themselves: a model that is not exactly the denoiser of its own samples
(finite training; a guided model, whose samples are not its own distribution; an epoch's few images, which
it can start to memorise) drifts even with equal weights. On the colour model that drift moved colourfulness
by about +0.7 base sd in 4 epochs for every reward alike (probes of 30 paired images; the adapters' README).
So the trainer anchors the regression
at the prediction of the model that drew the images, eps_old (computed before the epoch's updates):

    mean_b [(w_b - 1) ||eps_theta - eps^b||^2 + ||eps_theta - eps_old||^2],

whose minimiser is eps_old + (E[w eps | x_t] - E[eps | x_t]) / E[w | x_t]: the model moved by the tilt alone
(:func:`weighted_denoising_loss`); equal weights leave it where it is.

Why it is here: on the colour model, DPOK's policy gradient (the reward times a score-function term of
thousands of dimensions per transition) moved the rewards by 0.1-0.2 base sd in the CPU budget; RWR moved
colourfulness by 0.74 sd (but JPEG size by 0.12), and at CFG 3 its JPEG run diverged: docs/colour_default.md.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from .dpok import per_prompt_rewards, prompt_groups

__all__ = ["rwr_weights", "weighted_denoising_loss", "effective_sample_size"]


def rwr_weights(rewards: torch.Tensor, prompts: Sequence[str], beta: float, min_ess: float = 0.0) -> torch.Tensor:
    """exp(r / beta) normalised to mean 1 within each prompt's group of samples; (B,).

    min_ess: a trust region per group: where exp(r / beta) would leave the group an effective sample size
    (:func:`effective_sample_size`) below min_ess, the group's temperature is raised to the smallest one that
    reaches it (bisection on log beta), so that one image does not take the whole group's weight (the
    temperature-from-a-KL-bound rule of REPS / MPO, with the ESS as the bound). 0 = plain exp(r / beta).

    Raises:
        ValueError: if beta <= 0, min_ess is outside [0, 1), or the rewards and prompts differ in number.
    """
    if not beta > 0:
        raise ValueError(f"beta must be > 0, got {beta!r}")
    if not 0.0 <= min_ess < 1.0:
        raise ValueError(f"min_ess must be in [0, 1), got {min_ess!r}")
    rewards = per_prompt_rewards(rewards, prompts, torch.float64)
    w = torch.empty_like(rewards)
    for idx in prompt_groups(prompts):
        w[idx] = _group_weights(rewards[idx], beta, min_ess)
    return w.float()


def _group_weights(r: torch.Tensor, beta: float, min_ess: float) -> torch.Tensor:
    tilt = lambda b: torch.softmax(r / b, dim=0) * len(r)  # noqa: E731
    if effective_sample_size(tilt(beta)) >= min_ess:
        return tilt(beta)
    lo, hi = math.log(beta), math.log(beta) + 1.0
    while effective_sample_size(tilt(math.exp(hi))) < min_ess:  # the ESS rises to 1 as beta grows
        lo, hi = hi, hi + 1.0
    for _ in range(40):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if effective_sample_size(tilt(math.exp(mid))) < min_ess else (lo, mid)
    return tilt(math.exp(hi))


def weighted_denoising_loss(eps: torch.Tensor, noise: torch.Tensor, weights: torch.Tensor,
                            anchor: torch.Tensor | None = None) -> torch.Tensor:
    """The regression loss, a sum over dimensions per image (the KL term's units), mean over images.

    Without ``anchor``: mean_b w_b ||eps_b - noise_b||^2. With ``anchor`` (the prediction of the model that
    drew the images, no grad): mean_b [(w_b - 1) ||eps_b - noise_b||^2 + ||eps_b - anchor_b||^2], convex in
    eps_b (its quadratic weight is w_b > 0) with the minimiser anchor_b + (w_b - 1) / w_b (noise_b - anchor_b):
    equal weights (w = 1) leave the model where it is, and over the images at one x_t the minimiser is
    anchor + (E[w eps | x_t] - E[eps | x_t]) / E[w | x_t], the anchor moved by the tilt alone.
    """
    w = weights.to(eps.dtype).reshape(-1)
    fit = ((eps - noise) ** 2).flatten(1).sum(1)
    if anchor is None:
        return (w * fit).mean()
    stay = ((eps - anchor) ** 2).flatten(1).sum(1)
    return ((w - 1) * fit + stay).mean()


def effective_sample_size(weights: torch.Tensor) -> float:
    """(sum w)^2 / (B sum w^2) in (0, 1]: 1 for equal weights, 1 / B when one sample takes all."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    return float(w.sum() ** 2 / (w.numel() * (w ** 2).sum()))
