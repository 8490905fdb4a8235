"""The digit classifier behind the ``legibility`` reward and the base model's sample-quality metric.

A small CNN on 16x16 ink images in [0, 1] (the convention of ``zoo.data``), trained on the training
split of ``load_digits`` with light augmentation (1-pixel shifts, contrast jitter, pixel noise) so
that it judges generated digits, not only the scanner's. Shipped as safetensors in
``zoo/weights/classifier/``; :func:`load_classifier` reads it.
"""

from __future__ import annotations

from collections.abc import Iterable

import json
import os
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch import nn

from .data import IMAGE_SIZE, load_split

__all__ = ["DigitClassifier", "ClassifierConfig", "train_classifier", "save_classifier", "load_classifier",
           "evaluate_classifier"]


class DigitClassifier(nn.Module):
    """(B, 1, 16, 16) ink in [0, 1] -> (B, 10) logits. About 45k parameters."""

    def __init__(self, width: int = 16) -> None:
        super().__init__()
        self.width = width
        self.net = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 8x8
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2),  # 4x4
            nn.Flatten(), nn.Linear(2 * width * 16, 64), nn.SiLU(), nn.Linear(64, 10),
        )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.shape[-2:] != (IMAGE_SIZE, IMAGE_SIZE):
            images = nn.functional.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                                               align_corners=False)
        if images.shape[1] != 1:  # RGB -> grey: the classifier reads ink intensity
            images = images.mean(1, keepdim=True)
        return self.net(images)


@dataclass
class ClassifierConfig:
    width: int = 16  # channels of the first conv layer
    epochs: int = 40  # passes over the 1347 training images
    batch_size: int = 64  # images per step
    lr: float = 3e-3  # AdamW learning rate
    weight_decay: float = 1e-4  # AdamW weight decay
    noise_std: float = 0.05  # std of the Gaussian pixel noise added in training (ink units)
    seed: int = 0  # seeds the initialisation, the batches and the augmentation


def _augment(x: torch.Tensor, g: torch.Generator, noise_std: float) -> torch.Tensor:
    B = x.shape[0]
    shifts = torch.randint(-1, 2, (B, 2), generator=g)
    x = torch.stack([torch.roll(xi, (int(s[0]), int(s[1])), dims=(1, 2)) for xi, s in zip(x, shifts)])
    gain = 0.7 + 0.6 * torch.rand(B, 1, 1, 1, generator=g)
    return (x * gain + noise_std * torch.randn(x.shape, generator=g)).clamp(0, 1)


def train_classifier(cfg: ClassifierConfig = ClassifierConfig()) -> DigitClassifier:
    """Train on the training split; returns the model in eval mode."""
    g = torch.Generator().manual_seed(cfg.seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.seed)
        model = DigitClassifier(cfg.width)
    x, y = load_split("train")
    steps = cfg.epochs * ((len(y) + cfg.batch_size - 1) // cfg.batch_size)

    def losses():
        for _ in range(cfg.epochs):
            perm = torch.randperm(len(y), generator=g)
            for i in range(0, len(y), cfg.batch_size):
                idx = perm[i:i + cfg.batch_size]
                yield nn.functional.cross_entropy(model(_augment(x[idx], g, cfg.noise_std)), y[idx])

    return fit_one_cycle(model, losses(), steps, cfg.lr, cfg.weight_decay)


def fit_one_cycle(model: nn.Module, losses: Iterable[torch.Tensor], steps: int, lr: float,
                  weight_decay: float) -> nn.Module:
    """Train ``model`` with AdamW under a one-cycle learning rate of ``steps`` steps, one step per loss that
    ``losses`` yields (a generator: each loss is computed after the previous step); returns it in eval mode.
    The digit classifier and the colour model's attribute classifier train this way."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    model.train()
    for loss in losses:
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    return model.eval()


@torch.no_grad()
def evaluate_classifier(model: DigitClassifier, split: str = "test") -> float:
    """Accuracy on a split of ``load_digits`` (held-out ``"test"`` by default)."""
    x, y = load_split(split)
    return float((model(x).argmax(1) == y).float().mean())


def save_classifier(model: DigitClassifier, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Write ``model.safetensors`` and ``config.json`` into ``directory`` (atomically, file by file)."""
    from safetensors.torch import save_file

    from .._io import atomic_write, atomic_write_json

    d = Path(directory)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    atomic_write(d / "model.safetensors", lambda tmp: save_file(state, tmp))
    atomic_write_json(d / "config.json", {"width": model.width, **(extra or {})})


def load_saved(build, directory: str | os.PathLike | None, shipped: str, what: str,
               device: str | torch.device = "cpu") -> nn.Module:
    """A network saved by :func:`save_classifier` (``model.safetensors`` + ``config.json``) in ``directory``, the
    shipped ``weights/<shipped>`` when None: ``build(config, folder)`` makes it, then its weights are loaded;
    returned frozen, in eval mode."""
    from safetensors.torch import load_file

    if directory is None:
        from . import weights_dir

        directory = weights_dir(shipped)
    d = Path(directory)
    if not (d / "model.safetensors").is_file():
        raise FileNotFoundError(f"no {what} weights (model.safetensors) in {d}")
    model = build(json.loads((d / "config.json").read_text()), d)
    model.load_state_dict(load_file(str(d / "model.safetensors")))
    return model.to(device).eval().requires_grad_(False)


def load_classifier(directory: str | os.PathLike | None = None, device: str | torch.device = "cpu") -> DigitClassifier:
    """Load a classifier saved by :func:`save_classifier`; the shipped one when ``directory`` is None."""
    return load_saved(lambda cfg, d: DigitClassifier(int(cfg.get("width", 16))), directory, "classifier",
                      "classifier", device)


def main(argv: list[str] | None = None) -> int:
    """``python -m diffblend.zoo.classifier OUT_DIR [--seed S]``: train, report held-out accuracy, save."""
    import argparse
    import time

    p = argparse.ArgumentParser(description="train the digit classifier of the legibility reward")
    p.add_argument("out", help="output folder (the shipped one is diffblend/zoo/weights/classifier)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = ClassifierConfig(seed=args.seed)
    t0 = time.time()
    model = train_classifier(cfg)
    acc = evaluate_classifier(model, "test")
    seconds = time.time() - t0
    save_classifier(model, args.out, extra={"train_config": asdict(cfg), "heldout_accuracy": acc,
                                            "heldout_images": int(load_split("test")[1].numel())})
    print(f"held-out accuracy {acc:.4f} ({seconds:.0f} s); saved to {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
