"""Measure a colour model: prompt accuracy under the attribute classifier, and how its rewards relate.

On ``n`` full prompts drawn from the held-out stream (``data.HELDOUT_SEED``), one image each with its own
seeded generator: the classifier's accuracy per attribute and on all five at once (the prompt accuracy),
the three rewards' means and standard deviations, and their Pearson correlations across the images
(negative = in conflict on the base model's samples).

    python -m diffblend.zoo.colour.measure PIPELINE_DIR [--classifier DIR] [--images 200] [-o out.json] [--grid g.png]
"""

from __future__ import annotations

import json
from typing import Any

import torch

from .data import ATTRIBUTES, HELDOUT_SEED, prompt_for, sample_attributes

REWARDS = ("prompt_alignment", "colourfulness", "jpeg_compressibility")

__all__ = ["heldout_prompts", "generate_images", "read_rates", "measure"]


def heldout_prompts(n: int, seed: int = HELDOUT_SEED) -> list[str]:
    """``n`` full prompts of scenes from the held-out stream."""
    a = sample_attributes(n, torch.Generator().manual_seed(seed))
    return [prompt_for({k: a[k][i] for k in ATTRIBUTES}) for i in range(n)]


@torch.no_grad()
def generate_images(pipe: Any, prompts: list[str], steps: int = 20, guidance_scale: float = 3.0, seed: int = 0,
                    batch_size: int = 50) -> torch.Tensor:
    """(n, 3, H, W) in [0, 1]; image i from its own generator seeded ``seed * 100_000 + i``."""
    out = []
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        gens = [torch.Generator().manual_seed(seed * 100_000 + i + j) for j in range(len(chunk))]
        out.append(pipe(chunk, num_inference_steps=steps, guidance_scale=guidance_scale, eta=1.0, generator=gens,
                        output_type="pt").images)
    return torch.cat(out)


def read_rates(info: dict) -> dict:
    """From ``prompt_alignment``'s ``info``: the share of images whose prompted value of each attribute the
    classifier reads with p > 0.5 (an attribute the prompt does not name counts as not read), and the share whose
    every named attribute is the classifier's argmax (``all``)."""
    rates = {k: float((info[f"prob_{k}"] > 0.5).float().mean()) for k in ATTRIBUTES}
    return {**rates, "all": float(info["correct"].mean())}


def measure(images: torch.Tensor, prompts: list[str], classifier_path: str | None = None) -> dict:
    """Prompt accuracy and the rewards' statistics and correlations on ``images`` drawn for ``prompts``."""
    from ...rewards import get_reward

    scores, out = {}, {}
    for name in REWARDS:
        opts = {"path": classifier_path} if name == "prompt_alignment" else {}
        s, info = get_reward(name, **opts)(images, prompts)
        scores[name] = s.float()
        if name == "prompt_alignment":
            rates = read_rates(info)
            out["prompt_accuracy_all"] = rates.pop("all")
            out["attribute_accuracy"] = rates
    out["rewards"] = {n: {"mean": float(s.mean()), "sd": float(s.std())} for n, s in scores.items()}
    stacked = torch.stack([scores[n] for n in REWARDS])
    corr = torch.corrcoef(stacked)
    out["pearson"] = {f"{a}~{b}": float(corr[i, j]) for i, a in enumerate(REWARDS) for j, b in enumerate(REWARDS)
                      if i < j}
    out["saturated_pixels"] = float(((images <= 0.01) | (images >= 0.99)).float().mean())
    out["images"] = len(prompts)
    return out


def save_grid(images: torch.Tensor, path: str, columns: int = 10, scale: int = 4) -> None:
    """A PNG grid of the first rows of ``images``, upscaled ``scale`` times (nearest)."""
    import numpy as np
    from PIL import Image

    n = (len(images) // columns) * columns
    c, h, w = images.shape[1:]
    grid = images[:n].view(-1, columns, c, h, w).permute(0, 3, 1, 4, 2).reshape(-1, columns * w, c)
    img = Image.fromarray((grid.clamp(0, 1).numpy() * 255).round().astype(np.uint8))
    img.resize((img.width * scale, img.height * scale), Image.NEAREST).save(path)


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..generate import load_pipeline

    p = argparse.ArgumentParser(description="prompt accuracy and reward correlations of a colour model")
    p.add_argument("model", help="a colour pipeline folder (save_pretrained)")
    p.add_argument("--classifier", default=None, help="attribute classifier folder (default: the shipped one)")
    p.add_argument("--images", type=int, default=200)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=3.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--clip-sample", action="store_true",
                   help="diagnostic: DDIM with clip_sample=True (x0 estimates clipped to [-1, 1]); the shipped "
                        "scheduler and the core samplers do not clip")
    p.add_argument("-o", "--output", default=None, help="write the numbers as JSON here")
    p.add_argument("--grid", default=None, help="write a PNG grid of the first images here")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    prompts = heldout_prompts(a.images)
    pipe = load_pipeline(a.model)
    if a.clip_sample:
        from diffusers import DDIMScheduler

        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config, clip_sample=True)
    images = generate_images(pipe, prompts, a.steps, a.guidance_scale, a.seed)
    result = {"settings": {k: v for k, v in vars(a).items() if k not in ("output", "grid")},
              **measure(images, prompts, a.classifier)}
    text = json.dumps(result, indent=2)
    print(text)
    if a.output:
        from ..._io import atomic_write_json

        atomic_write_json(a.output, result)
    if a.grid:
        save_grid(images, a.grid)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
