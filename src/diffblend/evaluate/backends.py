"""Backends of the methods registry that need nothing beyond the core: the exact analytic toy.

:class:`ToyBackend` runs every method on the Gaussian-mixture toy of ``core.toy``: the adapters
are the exact aligned models p_pre exp(r_i / alpha), the MORL oracle is the exact target
p_pre exp(r(w) / alpha), RGG and CoDe guide the exact base. Samples are points in R^d, so there
are no images; rewards are the toy's closed-form rewards. Fast and exact: the sweep tests and
``diffblend sweep --model toy`` use it. (The diffusers backend lives in ``evaluate.pipelines``.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from ..core.blend import BASE, Blend, blend_denoisers
from ..core.sampling import NoiseSchedule
from ..core.toy import GaussianMixture, QuadraticReward
from .methods import Backend

__all__ = ["ToyBackend"]


class ToyBackend(Backend):
    """The analytic toy behind the methods registry.

    Args:
        base: the base mixture p_pre.
        rewards: ``{name: QuadraticReward}``; one exact adapter per reward.
        alpha: KL weight of every adapter (and of the oracles).
        num_steps: DDIM steps.
    """

    def __init__(self, base: GaussianMixture, rewards: Mapping[str, QuadraticReward], alpha: float = 1.0,
                 num_steps: int = 20, schedule: NoiseSchedule | None = None) -> None:
        self.base = base
        self.rewards = dict(rewards)
        self.alpha = float(alpha)
        self.schedule = schedule or NoiseSchedule.linear(1000)
        self.timesteps = self.schedule.timesteps(num_steps)
        self.sample_shape = (base.dim,)
        self.reward_names = tuple(self.rewards)
        self.adapter_names = tuple(self.rewards)
        self.dtype = torch.float64
        self.device = torch.device("cpu")
        self._models = {BASE: base.denoiser(self.schedule)}
        for name, r in self.rewards.items():
            self._models[name] = base.tilt(r, self.alpha).denoiser(self.schedule)

    @classmethod
    def default(cls, num_steps: int = 20) -> ToyBackend:
        """Two modes on a line; "right" (x1) and "up" (x2 near the left mode) conflict, "centre"
        (quadratic pull to the origin) is a third reward."""
        base = GaussianMixture.create([0.5, 0.5], [[-1.5, 0.5], [1.5, -0.5]], [0.25, 0.25])
        rewards = {"right": QuadraticReward.linear([1.0, 0.0]), "up": QuadraticReward.linear([-0.3, 1.0]),
                   "centre": QuadraticReward.quadratic(1.0, [0.0, 0.0])}
        return cls(base, rewards, alpha=1.0, num_steps=num_steps)

    def denoiser(self, blend: Blend | None):
        if blend is None:
            return self._models[BASE]
        if blend.method == "soup":
            raise ValueError("the toy's adapters are exact densities, not weights: method 'soup' is not defined on it")
        self._check_names(blend.names)
        return blend_denoisers(self._models, blend)

    def _check_names(self, names) -> None:
        unknown = [n for n in names if n not in self.rewards]
        if unknown:
            raise ValueError(f"weights name adapter(s) {unknown}; the toy has {list(self.adapter_names)}")

    def oracle_denoiser(self, weights: Mapping[str, float]):
        self._check_names(weights)
        names = list(weights)
        target = self.base.target([self.rewards[n] for n in names], [weights[n] for n in names], self.alpha)
        return target.denoiser(self.schedule)

    def score(self, images: torch.Tensor, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        x = images.to(torch.float64)
        return {n: r(x) for n, r in self.rewards.items()}

    def score_fn(self, weights: Mapping[str, float], prompts: Sequence[str], *, differentiable: bool):
        self._check_names(weights)
        terms = [(self.rewards[n], float(w)) for n, w in weights.items() if w != 0]

        def fn(images: torch.Tensor) -> torch.Tensor:
            x = images.to(torch.float64)
            # start at zeros (B,): with no weighted term, r(w) = 0, not the int 0 of an empty sum
            return sum((w * r(x) for r, w in terms), x.new_zeros(x.shape[0])).to(images.dtype)

        return fn

    def to_images(self, x0: torch.Tensor) -> torch.Tensor | None:
        return None
