"""``DigitsPipeline``: a pixel-space text-to-image diffusers pipeline with Stable Diffusion's code path.

Components, as in ``StableDiffusionPipeline`` minus the VAE (the UNet works on pixels directly):
``unet`` (``UNet2DConditionModel``, epsilon prediction, cross-attention on the prompt embedding),
``text_encoder`` (``CLIPTextModel``), ``tokenizer`` (``CLIPTokenizer``), ``scheduler``
(``DDIMScheduler``). Prompt encoding, classifier-free guidance with the empty prompt, the denoising
loop, ``callback_on_step_end`` and the LoRA loader mixin (``load_lora_weights`` /
``save_lora_weights``) behave as in SD, so code written for SD runs on it unchanged.

Image convention: samples live in [-1, 1]; outputs are ink intensities in [0, 1] (light strokes on
black), 1 channel, 16x16 for the shipped model; the colour model (``zoo.colour``) is the same class with
3 channels at 32x32. ``output_type``: ``"pt"`` (B, C, H, W) float in [0, 1], ``"np"`` (B, H, W, C),
``"pil"`` (list of mode-"L" images, or "RGB" for C = 3), ``"latent"`` (raw [-1, 1]).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils.torch_utils import randn_tensor

__all__ = ["DigitsPipeline"]


class DigitsPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    """Text-to-image on 16x16 digits; see the module docstring. Prompts: ``"7"``, ``"a digit seven"``..."""

    model_cpu_offload_seq = "text_encoder->unet"
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    # No annotations on the components: diffusers < 0.36 type-checks loaded components against them and,
    # with this module's string annotations, failed with KeyError('text_encoder') in from_pretrained.
    def __init__(self, unet, text_encoder, tokenizer, scheduler) -> None:  # noqa: ANN001
        super().__init__()
        self.register_modules(unet=unet, text_encoder=text_encoder, tokenizer=tokenizer, scheduler=scheduler)

    # -- prompts ------------------------------------------------------------------------------
    def _embed(self, texts: list[str], device: torch.device) -> torch.Tensor:
        ids = self.tokenizer(texts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="pt").input_ids.to(device)
        return self.text_encoder(ids)[0]  # (B, L, D) last hidden state, as SD (no clip_skip)

    def encode_prompt(
        self,
        prompt: str | list[str] | None,
        device: torch.device | str,
        num_images_per_prompt: int,
        do_classifier_free_guidance: bool,
        negative_prompt: str | list[str] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Prompt -> (prompt_embeds (B*n, L, D), negative_prompt_embeds (B*n, L, D) or None), as SD's.

        The negative prompt defaults to the empty prompt, the unconditional input the model was
        trained with (prompt dropout).
        """
        device = torch.device(device)
        if prompt_embeds is None:
            if prompt is None:
                raise ValueError("prompt must be given when prompt_embeds is not")
            prompts = [prompt] if isinstance(prompt, str) else list(prompt)
            prompt_embeds = self._embed(prompts, device)
        batch = prompt_embeds.shape[0]
        prompt_embeds = prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        if not do_classifier_free_guidance:
            return prompt_embeds, None
        if negative_prompt_embeds is None:
            neg = [""] * batch if negative_prompt is None else (
                [negative_prompt] * batch if isinstance(negative_prompt, str) else list(negative_prompt))
            if len(neg) != batch:
                raise ValueError(f"negative_prompt has {len(neg)} entries for {batch} prompts")
            negative_prompt_embeds = self._embed(neg, device)
        negative_prompt_embeds = negative_prompt_embeds.repeat_interleave(num_images_per_prompt, dim=0)
        return prompt_embeds, negative_prompt_embeds

    # -- properties as in SD (read by callbacks and by code written for SD) ---------------------
    @property
    def guidance_scale(self) -> float:
        return self._guidance_scale

    @property
    def do_classifier_free_guidance(self) -> bool:
        return self._guidance_scale > 1.0

    @property
    def cross_attention_kwargs(self) -> dict | None:
        return self._cross_attention_kwargs

    @property
    def num_timesteps(self) -> int:
        return self._num_timesteps

    @property
    def interrupt(self) -> bool:
        return self._interrupt

    # -- generation ---------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 20,
        guidance_scale: float = 2.0,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 1.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        cross_attention_kwargs: dict[str, Any] | None = None,
        callback_on_step_end: Callable[..., dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ["latents"],  # noqa: B006 (SD's signature)
        **kwargs: Any,
    ) -> ImagePipelineOutput | tuple:
        """Generate digits, as ``StableDiffusionPipeline.__call__`` (pixel space, no VAE).

        Args:
            prompt: e.g. ``"7"`` or ``["a digit 3", "seven"]``.
            num_inference_steps: DDIM steps (20 is plenty for 16x16).
            guidance_scale: CFG scale s (pred_u + s (pred_c - pred_u)); <= 1 turns CFG off.
            eta: DDIM eta in [0, 1]; 1 (the default here, unlike SD's 0) is the stochastic sampler
                Diffusion Blend's LS needs (Prop. 2).
            generator: one ``torch.Generator``, or one per image for batch-independent noise.
            latents: (B, 1, H, W) initial noise x_T instead of drawing it.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (see the module docstring).

        Returns:
            ``ImagePipelineOutput(images=...)``, or ``(images,)`` when ``return_dict`` is False.
        """
        self._check_call(output_type, eta, num_inference_steps, callback_on_step_end_tensor_inputs)
        self._guidance_scale = float(guidance_scale)  # the properties SD's callbacks read
        self._cross_attention_kwargs = cross_attention_kwargs
        self._interrupt = False
        device = self._execution_device
        prompt_embeds, negative_prompt_embeds = self.encode_prompt(
            prompt, device, num_images_per_prompt, self.do_classifier_free_guidance,
            negative_prompt, prompt_embeds, negative_prompt_embeds)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        self._num_timesteps = len(self.scheduler.timesteps)
        size = self.unet.config.sample_size
        shape = (prompt_embeds.shape[0], self.unet.config.in_channels, height or size, width or size)
        latents = self._initial_latents(shape, latents, generator, device, prompt_embeds.dtype)
        embeds = {"prompt_embeds": prompt_embeds, "negative_prompt_embeds": negative_prompt_embeds}
        latents = self._denoise(latents, embeds, eta, generator, callback_on_step_end,
                                callback_on_step_end_tensor_inputs)
        images = self._postprocess(latents, output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (images,)
        return ImagePipelineOutput(images=images)

    def _check_call(self, output_type: str, eta: float, num_inference_steps: int, callback_inputs: list[str]) -> None:
        if output_type not in ("pil", "np", "pt", "latent"):
            raise ValueError(f"output_type must be 'pil', 'np', 'pt' or 'latent', got {output_type!r}")
        if not 0.0 <= float(eta) <= 1.0:  # DDIM's variance is defined for eta in [0, 1]; beyond it, NaN images
            raise ValueError(f"eta must be in [0, 1], got {eta}")
        if int(num_inference_steps) < 1:
            raise ValueError(f"num_inference_steps must be >= 1, got {num_inference_steps}")
        bad = [k for k in callback_inputs if k not in self._callback_tensor_inputs]
        if bad:
            raise ValueError(f"callback_on_step_end_tensor_inputs {bad} not in {self._callback_tensor_inputs}")

    def _initial_latents(self, shape: tuple[int, ...], latents: torch.Tensor | None,
                         generator: torch.Generator | list[torch.Generator] | None, device: torch.device,
                         dtype: torch.dtype) -> torch.Tensor:
        """x_T: drawn from ``generator``, or the given ``latents`` (checked against ``shape``), times the
        scheduler's initial sigma."""
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape}, got {tuple(latents.shape)}")
        return latents.to(device) * self.scheduler.init_noise_sigma

    def _guidance_cond(self, embeds: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """The UNet's conditioning: [uncond; cond] with CFG (the layout of diffusers pipelines), else cond."""
        if self.do_classifier_free_guidance:
            return torch.cat([embeds["negative_prompt_embeds"], embeds["prompt_embeds"]])
        return embeds["prompt_embeds"]

    def _denoise(self, latents: torch.Tensor, embeds: dict[str, torch.Tensor | None], eta: float,
                 generator: torch.Generator | list[torch.Generator] | None, callback: Callable[..., dict] | None,
                 callback_inputs: list[str]) -> torch.Tensor:
        """The sampling loop over ``self.scheduler.timesteps``; ``callback`` may replace the latents and the
        embeddings (in ``embeds``) after each step."""
        cond = self._guidance_cond(embeds)
        timesteps = self.scheduler.timesteps
        with self.progress_bar(total=len(timesteps)) as bar:
            for i, t in enumerate(timesteps):
                if self.interrupt:
                    continue
                latents = self._denoise_step(latents, t, cond, eta, generator)
                if callback is not None:
                    latents = self._step_end(callback, i, t, callback_inputs, latents, embeds)
                    if "prompt_embeds" in callback_inputs or "negative_prompt_embeds" in callback_inputs:
                        cond = self._guidance_cond(embeds)
                bar.update()
        return latents

    def _denoise_step(self, latents: torch.Tensor, t: torch.Tensor, cond: torch.Tensor, eta: float,
                      generator: torch.Generator | list[torch.Generator] | None) -> torch.Tensor:
        """One guided UNet call and one scheduler step x_t -> x_{t-1}."""
        x_in = torch.cat([latents] * 2) if self.do_classifier_free_guidance else latents
        x_in = self.scheduler.scale_model_input(x_in, t)
        noise_pred = self.unet(x_in, t, encoder_hidden_states=cond,
                               cross_attention_kwargs=self.cross_attention_kwargs, return_dict=False)[0]
        if self.do_classifier_free_guidance:
            pred_u, pred_c = noise_pred.chunk(2)
            noise_pred = pred_u + self.guidance_scale * (pred_c - pred_u)
        return self.scheduler.step(noise_pred, t, latents, eta=eta, generator=generator, return_dict=False)[0]

    def _step_end(self, callback: Callable[..., dict], i: int, t: torch.Tensor, callback_inputs: list[str],
                  latents: torch.Tensor, embeds: dict[str, torch.Tensor | None]) -> torch.Tensor:
        """``callback_on_step_end`` as in SD: it sees the requested tensors and may return replacements;
        returns the latents, updates ``embeds`` in place."""
        local = {"latents": latents, **embeds}
        out = callback(self, i, t, {k: local[k] for k in callback_inputs})
        latents = out.pop("latents", latents)
        for k in ("prompt_embeds", "negative_prompt_embeds"):
            embeds[k] = out.pop(k, embeds[k])
        return latents

    @staticmethod
    def _postprocess(latents: torch.Tensor, output_type: str) -> Any:
        if output_type == "latent":
            return latents
        images = (latents.float() / 2 + 0.5).clamp(0, 1)  # [-1, 1] -> ink intensity in [0, 1]
        if output_type == "pt":
            return images
        arr = images.permute(0, 2, 3, 1).cpu().numpy()  # (B, H, W, C)
        if output_type == "np":
            return arr
        from PIL import Image

        px = (arr * 255).round().astype(np.uint8)
        return [Image.fromarray(a[..., 0], mode="L") if a.shape[-1] == 1 else Image.fromarray(a, mode="RGB")
                for a in px]  # grey (the digits) or RGB (the colour model)
