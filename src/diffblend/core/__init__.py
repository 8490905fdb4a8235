"""The pure tensor maths of Diffusion Blend: blend coefficients, samplers, the analytic toy.

Nothing here imports diffusers, peft or transformers.
"""

from .blend import BASE, LS_DRAWS, METHODS, Blend, blend_denoisers, combine, ls_choices, step_key, stratified_choices
from .flow import flow_sde_step, flow_sigmas, sample_flow
from .rows import RowBlend, is_per_row
from .sampling import (
    NoiseSchedule,
    SampleOutput,
    StepOutput,
    cat_cond,
    map_cond,
    cfg_denoiser,
    ddim_step,
    ddpm_step,
    gaussian_log_prob,
    randn,
    run_steps,
    sample,
)

__all__ = [
    "BASE", "LS_DRAWS", "METHODS", "Blend", "RowBlend", "is_per_row", "blend_denoisers", "combine", "ls_choices",
    "step_key", "stratified_choices",
    "NoiseSchedule", "SampleOutput", "StepOutput", "cat_cond", "map_cond", "cfg_denoiser", "ddim_step",
    "ddpm_step", "gaussian_log_prob", "randn", "sample",
    "run_steps", "flow_sde_step", "flow_sigmas", "sample_flow",
]
