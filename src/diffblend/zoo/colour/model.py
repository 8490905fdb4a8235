"""Configs of the colour default model and a builder for a freshly initialised pipeline.

The pipeline is a ``DigitsPipeline`` (pixel-space SD code path) whose UNet has 3 channels at 32x32 and
whose tokenizer knows the scene words (``colour.data.vocabulary_words``): the same class as the digits
model, so ``load_pipeline``, ``BlendPipeline`` and ``diffblend finetune`` load its folder unchanged.
"""

from __future__ import annotations

from typing import Any

from ..model import scheduler_config
from .data import IMAGE_SIZE, vocabulary_words

HIDDEN = 64  # text embedding width = the UNet's cross_attention_dim
MAX_LENGTH = 12  # tokens per prompt incl. start/end; the full prompt has 9 words (11 tokens)
CHANNELS = (32, 64, 64, 64)  # UNet block_out_channels at 32, 16, 8, 4 pixels

__all__ = ["HIDDEN", "MAX_LENGTH", "CHANNELS", "unet_config", "build_pipeline", "load_colour_pipeline"]


def unet_config(channels: tuple[int, ...] = CHANNELS) -> dict:
    """A small SD-shaped ``UNet2DConditionModel``: 32x32x3 pixels, cross-attention at the two lowest levels.

    The two top levels (32x32, 16x16) have no attention (cost); the lower ones (8x8, 4x4) and the
    mid block attend to the prompt embedding, as SD's CrossAttn blocks do.
    """
    if len(channels) < 3:
        raise ValueError(f"channels must have at least 3 levels, got {channels}")
    n_plain = len(channels) - 2
    return dict(
        sample_size=IMAGE_SIZE, in_channels=3, out_channels=3, layers_per_block=1,
        block_out_channels=tuple(channels),
        down_block_types=("DownBlock2D",) * n_plain + ("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2 + ("UpBlock2D",) * n_plain,
        mid_block_type="UNetMidBlock2DCrossAttn",
        cross_attention_dim=HIDDEN, attention_head_dim=8, norm_num_groups=8,
        # global conditioning: an attention-pooled prompt embedding is added to the time embedding, so every
        # ResNet block (at every resolution) sees the prompt; colours are global attributes decided at high noise
        addition_embed_type="text", addition_embed_type_num_heads=4,
    )


def colour_scheduler_config(schedule: str = "linear", prediction_type: str = "v_prediction") -> dict:
    """DDIM config: ``"linear"`` is the digits' betas (alpha_bar_999 = 4e-5); ``"scaled_linear"`` is SD's
    (0.00085..0.012 on sqrt scale, alpha_bar_999 = 0.0047).

    The colour model predicts v (Salimans and Ho 2022) on the linear schedule. SD's schedule leaves so much
    signal at t = 999 that the mean colour of a 32x32 scene can be read off x_T (the pooled noise has sd
    1/32 against a signal of sqrt(0.0047) ~ 0.07 times the colour): trained on it, the model took its
    colours from the noise and ignored the colour words (measured: at t = 999 the same x0 estimate for every
    colour word). On the linear schedule the leak is 10x smaller, and predicting v instead of epsilon avoids
    the 158x amplification of epsilon errors in x0 = (x_t - sqrt(1 - ab) eps) / sqrt(ab) at t = 999."""
    if prediction_type not in ("epsilon", "v_prediction"):
        raise ValueError(f"prediction_type must be 'epsilon' or 'v_prediction', got {prediction_type!r}")
    if schedule == "linear":
        return {**scheduler_config(), "prediction_type": prediction_type}
    if schedule == "scaled_linear":
        return {**scheduler_config(), "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                "prediction_type": prediction_type}
    raise ValueError(f"schedule must be 'linear' or 'scaled_linear', got {schedule!r}")


def build_pipeline(seed: int = 0, channels: tuple[int, ...] = CHANNELS, schedule: str = "linear",
                   prediction_type: str = "v_prediction") -> Any:
    """A colour ``DigitsPipeline`` with freshly initialised weights (from ``seed``), for training."""
    import torch
    from diffusers import DDIMScheduler, UNet2DConditionModel

    from ..pipeline import DigitsPipeline
    from ..text import build_text_encoder, build_tokenizer

    tokenizer = build_tokenizer(vocabulary_words(), MAX_LENGTH)
    text_encoder = build_text_encoder(len(tokenizer), seed=seed, hidden=HIDDEN, max_length=MAX_LENGTH)
    with torch.random.fork_rng(devices=[]):  # diffusers initialises from the global RNG
        torch.manual_seed(seed + 1)
        unet = UNet2DConditionModel(**unet_config(channels))
    return DigitsPipeline(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                          scheduler=DDIMScheduler(**colour_scheduler_config(schedule, prediction_type)))


def load_colour_pipeline(device: str | Any = "cpu", progress_bar: bool = False) -> Any:
    """The shipped colour model (``zoo/weights/colour_base``) on ``device``, progress bar off unless asked."""
    from .. import quiet_loading, weights_dir
    from ..pipeline import DigitsPipeline

    with quiet_loading():
        pipe = DigitsPipeline.from_pretrained(str(weights_dir("colour_base")))
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)
