"""A diffusers scheduler for the flow-matching SDE of :mod:`diffblend.core.flow` (SD3, Flux).

    pipe.scheduler = FlowMatchSDEScheduler.from_config(pipe.scheduler.config, noise_level=0.7)
    pipe.scheduler.generator = torch.Generator().manual_seed(0)  # the step noise (pipelines pass none)

It is diffusers' ``FlowMatchEulerDiscreteScheduler`` (same config, sigma grid, shift and timesteps)
whose ``step`` is :func:`~diffblend.core.flow.flow_sde_step`: noise_level = 0 is the Euler ODE,
noise_level > 0 injects fresh noise at every step, which makes DB-MPA-LS exact in distribution
(Prop. 2), so :class:`~diffblend.pipeline.BlendPipeline` does not warn for LS with it.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import BaseOutput

from .core.flow import _check_noise_level, flow_sde_step
from .core.sampling import gaussian_log_prob

__all__ = ["FlowMatchSDEScheduler", "FlowMatchSDESchedulerOutput"]


@dataclass
class FlowMatchSDESchedulerOutput(BaseOutput):
    """prev_sample (B, ...); log_prob (B,) of the transition; prev_sample_mean and std of its Gaussian;
    pred_original_sample x0_hat = x - sigma v."""

    prev_sample: torch.Tensor
    log_prob: torch.Tensor
    prev_sample_mean: torch.Tensor
    std: torch.Tensor
    pred_original_sample: torch.Tensor


def _init(self, *args: Any, noise_level: float = 0.7, **kwargs: Any) -> None:
    FlowMatchEulerDiscreteScheduler.__init__.__wrapped__(self, *args, **kwargs)  # the parent's body, unregistered
    _check_noise_level(noise_level)
    if self.config.invert_sigmas:
        raise ValueError("invert_sigmas is not supported: the SDE step needs sigmas going from 1 (noise) to 0")
    if self.config.stochastic_sampling and noise_level > 0:
        raise ValueError("stochastic_sampling (diffusers' own noise re-injection) and noise_level > 0 are two "
                         "different samplers: set stochastic_sampling=False")
    self.generator = None  # where step() draws its noise when not given one (SD3 / Flux pipelines pass none)


# The config is the parent's plus noise_level, read from the installed diffusers' signature, so that
# from_config(pipe.scheduler.config, noise_level=...) keeps every key of this diffusers version.
_parent = inspect.signature(FlowMatchEulerDiscreteScheduler.__init__)
_init.__signature__ = _parent.replace(parameters=[
    *_parent.parameters.values(), inspect.Parameter("noise_level", inspect.Parameter.KEYWORD_ONLY, default=0.7)])


class FlowMatchSDEScheduler(FlowMatchEulerDiscreteScheduler):
    """``FlowMatchEulerDiscreteScheduler`` with a ``noise_level`` config (a >= 0, default 0.7 as in
    Flow-GRPO) and a stochastic ``step`` that also returns the transition's log-probability.

    Attributes:
        generator: a ``torch.Generator`` (CPU), or one per sample, for the step noise when ``step`` is
            not given one; None uses torch's global RNG. Pipelines seed only the initial latents.
    """

    _compatibles = [FlowMatchEulerDiscreteScheduler.__name__]
    __init__ = register_to_config(_init)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        *args: Any,
        generator: torch.Generator | list[torch.Generator] | None = None,
        per_token_timesteps: torch.Tensor | None = None,
        return_dict: bool = True,
        prev_sample: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> FlowMatchSDESchedulerOutput | tuple:
        """One step sigmas[i] -> sigmas[i + 1] of :func:`~diffblend.core.flow.flow_sde_step`.

        Arguments as diffusers' ``step`` (s_churn, s_tmin, s_tmax, s_noise are accepted and unused,
        as there); ``prev_sample`` scores a given next sample instead of drawing one. With
        ``return_dict=False`` the tuple is (prev_sample, log_prob, prev_sample_mean, std,
        pred_original_sample); pipelines read element 0.
        """
        if per_token_timesteps is not None:
            raise ValueError("per_token_timesteps is not supported by FlowMatchSDEScheduler")
        if isinstance(timestep, int) or (isinstance(timestep, torch.Tensor) and not timestep.is_floating_point()):
            raise ValueError("timestep must be one of scheduler.timesteps (a float), not an integer index")
        if self.step_index is None:
            self._init_step_index(timestep)
        i = self.step_index
        out = flow_sde_step(model_output, self.sigmas[i], self.sigmas[i + 1], sample, self.config.noise_level,
                            generator if generator is not None else self.generator, prev_sample)
        if out.prev_sample.dtype != model_output.dtype:  # diffusers returns the model's dtype
            out.prev_sample = out.prev_sample.to(model_output.dtype)
            out.log_prob = gaussian_log_prob(out.prev_sample, out.mean, out.std)
        self._step_index += 1
        result = (out.prev_sample, out.log_prob, out.mean, out.std, out.x0_hat)
        return FlowMatchSDESchedulerOutput(*result) if return_dict else result
