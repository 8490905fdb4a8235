"""Tiny SD 1.5- and SDXL-shaped pipelines built from configs, and LoRA files written by diffusers.

No hub access: every component is built from a small config with a fixed seed, and the CLIP
tokenizer gets a byte-level vocabulary written on the fly (no merges, so one token per character).
Latents are 8x8 with 4 channels; the models have 16-32 channels, so a full pipeline call with a few
steps takes tens of milliseconds on a CPU.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

__all__ = ["tiny_sd", "tiny_sdxl", "tiny_sd3", "tiny_flux", "save_random_lora", "LORA_TARGETS"]


# Attention projections, the transformer's in/out projections and the resnets' time projections
# (a (B, C) input, unlike the (B, N, C) of attention): routing must hold for every input layout.
LORA_TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "time_emb_proj"]


def _bytes_to_unicode() -> list[str]:
    """The 256 printable characters of the GPT-2 / CLIP byte-level alphabet."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _tokenizer():
    """A CLIPTokenizer over byte-level symbols only (no merges): one token per character."""
    from diffblend.zoo.text import clip_tokenizer

    chars = _bytes_to_unicode()
    vocab = {c: i for i, c in enumerate(chars)}
    for c in chars:
        vocab[c + "</w>"] = len(vocab)
    vocab["<|startoftext|>"] = len(vocab)  # 512
    vocab["<|endoftext|>"] = len(vocab)  # 513
    return clip_tokenizer(vocab, [], model_max_length=16)


def _text_encoder(with_projection: bool, seed: int):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4,
                         num_hidden_layers=2, max_position_embeddings=16, projection_dim=32,
                         bos_token_id=512, eos_token_id=513, pad_token_id=513, hidden_act="gelu")
    cls = CLIPTextModelWithProjection if with_projection else CLIPTextModel
    return _seeded(seed, lambda: cls(cfg).eval())


def _seeded(seed: int, build):
    """Call ``build()`` with the global RNG seeded (model constructors draw from it), then restore it."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return build()


def _vae(seed: int, **kwargs):
    from diffusers import AutoencoderKL

    return _seeded(seed, lambda: AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16, **kwargs).eval())


def _scheduler():
    from diffusers import DDIMScheduler

    return DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                         clip_sample=False, set_alpha_to_one=False, steps_offset=1)


def tiny_sd(tmpdir: str | os.PathLike, seed: int = 0):
    """A StableDiffusionPipeline (SD 1.5 layout: DDIM, epsilon, CLIP text encoder), 16x16 pixels, 8x8 latents."""
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval())
    pipe = StableDiffusionPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(False, seed + 2), tokenizer=_tokenizer(),
        unet=unet, scheduler=_scheduler(), safety_checker=None, feature_extractor=None,
        requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sdxl(tmpdir: str | os.PathLike, seed: int = 0):
    """A StableDiffusionXLPipeline (two text encoders, text_time added conditioning), 16x16 pixels."""
    from diffusers import StableDiffusionXLPipeline, UNet2DConditionModel

    unet = _seeded(seed, lambda: UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
        addition_time_embed_dim=8, transformer_layers_per_block=(1, 1),
        projection_class_embeddings_input_dim=80,  # 6 * addition_time_embed_dim + projection_dim
        cross_attention_dim=64, norm_num_groups=8).eval())
    tok = _tokenizer()
    pipe = StableDiffusionXLPipeline(
        vae=_vae(seed + 1), text_encoder=_text_encoder(False, seed + 2), text_encoder_2=_text_encoder(True, seed + 3),
        tokenizer=tok, tokenizer_2=tok, unet=unet, scheduler=_scheduler(), force_zeros_for_empty_prompt=False)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def tiny_sd3(seed: int = 0, shift: float = 3.0):
    """A StableDiffusion3Pipeline without its T5 encoder (text_encoder_3=None: the pipeline pads with
    zeros), two CLIP encoders of width 32 (joint_attention_dim 64 = their concatenation), a one-layer
    SD3 transformer, FlowMatchEulerDiscreteScheduler(shift); 16x16 pixels, 8x8 latents."""
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    transformer = _seeded(seed, lambda: SD3Transformer2DModel(
        sample_size=8, patch_size=1, in_channels=4, num_layers=1, attention_head_dim=8, num_attention_heads=4,
        caption_projection_dim=32, joint_attention_dim=64, pooled_projection_dim=64, out_channels=4,
        pos_embed_max_size=8).eval())
    tok = _tokenizer()
    pipe = StableDiffusion3Pipeline(
        transformer=transformer, scheduler=FlowMatchEulerDiscreteScheduler(shift=shift),
        vae=_vae(seed + 1, scaling_factor=1.5, shift_factor=0.1),  # SD3's VAE has both; its __call__ needs the shift
        text_encoder=_text_encoder(True, seed + 2), tokenizer=tok, text_encoder_2=_text_encoder(True, seed + 3),
        tokenizer_2=tok, text_encoder_3=None, tokenizer_3=None)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def save_random_lora(pipe, path: str | os.PathLike, seed: int, rank: int = 4, alpha: float = 8.0,
                     targets: list[str] | None = None, use_dora: bool = False,
                     text_encoder: bool = False, lora_bias: bool = False) -> Path:
    """Write a LoRA for ``pipe.unet`` (or ``pipe.transformer``) with ``type(pipe).save_lora_weights``; return the file path.

    lora_B is random (peft initialises it to zero, which would make every adapter equal to the base),
    scaled so that the adapters change the predictions by a few percent. The adapter is removed from
    the pipeline again, which is left as it was.
    """
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    component = "unet" if getattr(pipe, "unet", None) is not None else "transformer"
    unet = getattr(pipe, component)
    name = f"tmp{seed}"
    cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=targets or LORA_TARGETS, init_lora_weights=False,
                     use_dora=use_dora, lora_bias=lora_bias)
    unet.add_adapter(cfg, adapter_name=name)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod_name, p in unet.named_parameters():
            if f"lora_A.{name}" in mod_name or f"lora_B.{name}" in mod_name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    sd = get_peft_model_state_dict(unet, adapter_name=name)
    kwargs = {f"{component}_lora_layers": sd, f"{component}_lora_adapter_metadata": cfg.to_dict()}
    te_name = None
    if text_encoder:
        te_cfg = LoraConfig(r=rank, lora_alpha=alpha, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
        pipe.text_encoder.add_adapter(te_cfg, adapter_name=name)
        kwargs["text_encoder_lora_layers"] = get_peft_model_state_dict(pipe.text_encoder, adapter_name=name)
        te_name = name
    out = Path(path)
    type(pipe).save_lora_weights(out, weight_name="lora.safetensors", **kwargs)
    unet.delete_adapters(name)
    if te_name is not None:
        pipe.text_encoder.delete_adapter(te_name)
    return out / "lora.safetensors"


def _t5_tokenizer():
    """A T5TokenizerFast built offline: a unigram model over lower-case letters, digits and space."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import T5TokenizerFast

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0)] + [(c, -1.0) for c in "abcdefghijklmnopqrstuvwxyz0123456789 ▁"]
    tok = Tokenizer(models.Unigram(vocab, unk_id=2))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    return T5TokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>",
                           extra_ids=0, model_max_length=16)


def tiny_flux(seed: int = 0, guidance_embeds: bool = False):
    """A FluxPipeline: CLIP (pooled) + a one-layer T5 (offline tokenizer), a one-block Flux transformer on
    2x2-packed latents, FlowMatchEulerDiscreteScheduler with Flux's dynamic shift; default size 16x16
    pixels (default_sample_size set to 8: not saved with the folder), 8x8x4 latents = 16 tokens of 16."""
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import T5Config, T5EncoderModel

    transformer = _seeded(seed, lambda: FluxTransformer2DModel(
        patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8, num_attention_heads=2,
        joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=guidance_embeds,
        axes_dims_rope=(2, 2, 4)).eval())
    t5 = _seeded(seed + 4, lambda: T5EncoderModel(T5Config(vocab_size=48, d_model=32, d_kv=8, d_ff=37, num_layers=1,
                                                           num_heads=4, pad_token_id=0, eos_token_id=1)).eval())
    sched = FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True, base_image_seq_len=16, max_image_seq_len=256,
                                            base_shift=0.5, max_shift=1.15, shift=3.0)
    pipe = FluxPipeline(scheduler=sched, vae=_vae(seed + 1, scaling_factor=1.5, shift_factor=0.1),
                        text_encoder=_text_encoder(False, seed + 2), tokenizer=_tokenizer(), text_encoder_2=t5,
                        tokenizer_2=_t5_tokenizer(), transformer=transformer)
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe
