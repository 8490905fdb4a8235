"""Configs of the default model and a builder for a freshly initialised ``DigitsPipeline``."""

from __future__ import annotations

from typing import Any

from .data import IMAGE_SIZE
from .text import HIDDEN, build_text_encoder, build_tokenizer

__all__ = ["unet_config", "scheduler_config", "build_pipeline"]


def unet_config(channels: tuple[int, ...] = (32, 64, 64)) -> dict:
    """A tiny SD-shaped ``UNet2DConditionModel``: 16x16x1 pixels, cross-attention at 8x8 and 4x4.

    The top level (16x16) has no attention (cost); the two lower levels attend to the prompt
    embedding (width ``text.HIDDEN``), as SD's CrossAttn blocks do.
    """
    return dict(
        sample_size=IMAGE_SIZE, in_channels=1, out_channels=1, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=8,
    )


def scheduler_config() -> dict:
    """DDIM over DDPM's 1000-step linear schedule (betas 1e-4..0.02, alpha_bar_999 = 4e-5), no
    clipping (the core samplers do not clip either), "trailing" spacing so that few steps start at
    t = 999. (A cosine schedule ends at alpha_bar ~ 0, where an epsilon model's x0_hat =
    (x_t - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar) amplifies any error without bound: without
    clipping, its samples saturated.)"""
    return dict(
        num_train_timesteps=1000, beta_schedule="linear", beta_start=1e-4, beta_end=0.02, prediction_type="epsilon",
        clip_sample=False, set_alpha_to_one=True, steps_offset=0, timestep_spacing="trailing",
    )


def build_pipeline(seed: int = 0, channels: tuple[int, ...] = (32, 64, 64)) -> Any:
    """A ``DigitsPipeline`` with freshly initialised weights (from ``seed``), for training."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from .pipeline import DigitsPipeline

    tokenizer = build_tokenizer()
    text_encoder = build_text_encoder(len(tokenizer), seed=seed)
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**unet_config(channels))
    return DigitsPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=DDIMScheduler(**scheduler_config()))
