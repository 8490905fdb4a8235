"""Tiny reward models of the real classes, built from configs and saved like released ones (no hub access).

CLIP: a 2-layer, 32-wide ``CLIPModel`` at the real processor's 224x224 input (patch 32, so 49 tokens)
with the byte-level tokenizer of helpers_pipelines. Images are uint8-exact (k / 255) so that the
processor's PIL path and the torch path see the same pixels.
"""

from __future__ import annotations

from pathlib import Path

import torch

from helpers_pipelines import _seeded, _tokenizer

__all__ = ["tiny_clip", "uint8_images", "reference_clip_embeds", "offline", "PROMPTS"]

PROMPTS = ["a red cat", "a dog on grass", "blue car", "an old house"]


def uint8_images(b: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """(b, 3, h, w) smooth images with exact uint8 values: a blurred 8x8 random field plus noise."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.nn.functional.interpolate(torch.rand(b, 3, 8, 8, generator=g), size=(h, w), mode="bilinear")
    x = 0.8 * coarse + 0.2 * torch.rand(b, 3, h, w, generator=g)
    return (x * 255).round() / 255


def pil_processor(kind: str = "clip"):
    """transformers' PIL image processor for CLIP or BLIP: ``*ImageProcessorPil`` on 5.x; on 4.x the plain
    ``*ImageProcessor`` is the PIL one."""
    try:
        if kind == "clip":
            from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as cls
        else:
            from transformers.models.blip.image_processing_pil_blip import BlipImageProcessorPil as cls
    except ImportError:  # transformers 4.x
        from transformers import BlipImageProcessor, CLIPImageProcessor

        cls = CLIPImageProcessor if kind == "clip" else BlipImageProcessor
    return cls()


def tiny_clip(folder: Path, seed: int = 0, projection_dim: int = 16, logit_scale: float | None = None) -> Path:
    """A tiny CLIPModel + CLIPProcessor (PIL image processor with CLIP's defaults) saved in ``folder``."""
    from transformers import CLIPConfig, CLIPModel, CLIPProcessor

    cfg = CLIPConfig(
        text_config=dict(vocab_size=514, hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                         max_position_embeddings=16, bos_token_id=512, eos_token_id=513, pad_token_id=513),
        vision_config=dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
                           image_size=224, patch_size=32),
        projection_dim=projection_dim)
    model = _seeded(seed, lambda: CLIPModel(cfg).eval())
    if logit_scale is not None:
        model.logit_scale.data.fill_(logit_scale)
    model.save_pretrained(folder)
    CLIPProcessor(image_processor=pil_processor("clip"), tokenizer=_tokenizer()).save_pretrained(folder)
    return Path(folder)


@torch.no_grad()
def reference_clip_embeds(folder: Path, images: torch.Tensor, prompts: list[str]):
    """Unit image and text embeddings and logit scale by the real CLIPProcessor (PIL) and CLIPModel.forward."""
    from transformers import CLIPModel, CLIPProcessor

    from diffblend.rewards._preprocess import to_pil

    model, proc = CLIPModel.from_pretrained(folder).eval(), CLIPProcessor.from_pretrained(folder)
    inputs = proc(text=prompts, images=to_pil(images), padding=True, return_tensors="pt")
    out = model(**inputs)
    return out.image_embeds, out.text_embeds, model.logit_scale.exp()


def offline(monkeypatch) -> None:
    """No hub: an id that is not cached fails at once instead of retrying a network that is not there."""
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # read once at import
