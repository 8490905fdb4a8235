"""Train the colour default model on procedurally rendered scenes (``colour.data``).

The same recipe as the digits model (``zoo.train_base``: epsilon-prediction DDPM, UNet and text encoder
trained together from scratch, prompt dropout for CFG, an EMA of the weights ships), with batches drawn
fresh from the scene generator at every step (no fixed data set: every image is new). Writes
``RUN_DIR/config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (resumable) and ``pipeline/``.

    python -m diffblend.zoo.colour.train RUN_DIR --steps 2000 --batch-size 32 --threads 1
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write_json
from ..train_base import _lr_factor, _params, _save_checkpoint
from .data import make_batch
from .model import CHANNELS, build_pipeline

__all__ = ["ColourTrainConfig", "train_colour", "diffusion_loss"]


@dataclass
class ColourTrainConfig:
    """Everything that defines a colour training run (written to ``config.json``)."""

    steps: int = 2000  # optimizer steps (batches)
    batch_size: int = 32  # scenes per step
    lr: float = 1e-3  # peak AdamW learning rate; linear warm-up then cosine decay to 10 %
    warmup_steps: int = 50
    grad_clip: float = 1.0  # max global gradient norm
    prompt_dropout: float = 0.1  # probability that a prompt is replaced by "" (CFG's unconditional input)
    full_prompt_prob: float = 0.7  # else the prompt names a random subset of the attributes
    ema_decay: float = 0.995  # cap of the EMA decay (warm-up min(cap, (1+n)/(10+n)))
    channels: tuple[int, ...] = CHANNELS  # UNet block_out_channels
    schedule: str = "linear"  # DDIM betas: "linear" (the digits') or "scaled_linear" (SD's)
    prediction_type: str = "v_prediction"  # what the UNet predicts (and the MSE target): "v_prediction" or "epsilon"
    seed: int = 0
    log_every: int = 25
    checkpoint_every: int = 100


def _batch(cfg: ColourTrainConfig, g: torch.Generator, T: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    images, prompts, _ = make_batch(cfg.batch_size, g, cfg.full_prompt_prob)
    drop = torch.rand(cfg.batch_size, generator=g) < cfg.prompt_dropout
    prompts = ["" if d else p for p, d in zip(prompts, drop)]
    t = torch.randint(0, T, (cfg.batch_size,), generator=g)
    return images * 2 - 1, prompts, t, torch.randn(images.shape, generator=g)


def diffusion_loss(pipe: Any, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the UNet's prediction at x_t ~ q(x_t | x0) and its target: the noise (``epsilon``) or
    v = sqrt(ab) noise - sqrt(1 - ab) x0 (``v_prediction``), as the scheduler's config says.

    The v loss is the epsilon loss weighted by 1 / alpha_bar_t = 1 + 1/SNR: the high-noise steps, where a
    scene's colours and shape are decided from the prompt, count (with plain epsilon MSE they barely do).
    """
    kind = pipe.scheduler.config.prediction_type
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"the scheduler's prediction_type must be 'epsilon' or 'v_prediction', got {kind!r}")
    device = pipe.unet.device
    x0, t, noise = x0.to(device), t.to(device), noise.to(device)
    x_t = pipe.scheduler.add_noise(x0, noise, t)
    emb, _ = pipe.encode_prompt(prompts, device, 1, False)
    pred = pipe.unet(x_t, t, encoder_hidden_states=emb, return_dict=False)[0]
    target = noise if kind == "epsilon" else pipe.scheduler.get_velocity(x0, noise, t)
    return torch.nn.functional.mse_loss(pred, target)


def _resume(ckpt: Path, pipe: Any, opt: Any, g: torch.Generator) -> tuple[int, dict]:
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    pipe.unet.load_state_dict(state["unet"])
    pipe.text_encoder.load_state_dict(state["text_encoder"])
    opt.load_state_dict(state["optimizer"])
    g.set_state(state["generator"])
    return int(state["step"]), state["ema"]


def _save_ema(pipe: Any, ema: dict, out: Path) -> None:
    """Copy the EMA weights into ``pipe`` (the model that ships) and ``save_pretrained`` it to ``out``."""
    with torch.no_grad():
        for k, p in _params(pipe).items():
            p.copy_(ema[k])
    pipe.unet.eval()
    pipe.text_encoder.eval()
    pipe.save_pretrained(str(out), safe_serialization=True)


def export_checkpoint(run_dir: str | Path, out: str | Path) -> int:
    """Save the EMA weights of ``run_dir/checkpoint.pt`` as a pipeline folder ``out`` (e.g. of a run stopped
    early); returns the checkpoint's step."""
    cfg = ColourTrainConfig(**{**json.loads((Path(run_dir) / "config.json").read_text())})
    pipe = build_pipeline(seed=cfg.seed, channels=tuple(cfg.channels), schedule=cfg.schedule,
                          prediction_type=cfg.prediction_type)
    state = torch.load(Path(run_dir) / "checkpoint.pt", map_location="cpu", weights_only=True)
    _save_ema(pipe, state["ema"], Path(out))
    return int(state["step"])


def train_colour(cfg: ColourTrainConfig, run_dir: str | Path, resume: bool = False, progress: bool = True) -> dict:
    """Train (or resume) a colour model into ``run_dir``; returns ``{"steps", "first_loss", "final_loss", ...}``."""
    from tqdm.auto import tqdm

    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    run = Path(run_dir)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", asdict(cfg))
    pipe = build_pipeline(seed=cfg.seed, channels=tuple(cfg.channels), schedule=cfg.schedule,
                          prediction_type=cfg.prediction_type)
    pipe.set_progress_bar_config(disable=True)
    named = _params(pipe)
    opt = torch.optim.AdamW(named.values(), lr=cfg.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(cfg.seed)
    ema = {k: p.detach().clone() for k, p in named.items()}
    step = 0
    if resume:
        step, ema = _resume(run / "checkpoint.pt", pipe, opt, g)
    T = pipe.scheduler.config.num_train_timesteps
    pipe.unet.train()
    pipe.text_encoder.train()
    losses: list[float] = []
    t0 = time.time()
    bar = tqdm(total=cfg.steps, initial=step, desc="train colour", disable=not progress)
    with open(run / "metrics.jsonl", "a") as log:
        while step < cfg.steps:
            x0, prompts, t, noise = _batch(cfg, g, T)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            loss = diffusion_loss(pipe, x0, prompts, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(list(named.values()), cfg.grad_clip)
            opt.step()
            step += 1
            decay = min(cfg.ema_decay, (1 + step) / (10 + step))
            with torch.no_grad():
                for k, p in named.items():
                    ema[k].lerp_(p.detach(), 1 - decay)
            losses.append(float(loss.detach()))
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = losses[-cfg.log_every:]
                log.write(json.dumps({"step": step, "loss": sum(recent) / len(recent),
                                      "seconds": round(time.time() - t0, 1)}) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == cfg.steps:
                _save_checkpoint(run / "checkpoint.pt", pipe, ema, opt, step, g)
    bar.close()
    _save_ema(pipe, ema, run / "pipeline")
    summary = {"steps": step, "train_seconds": round(time.time() - t0, 1),
               "first_loss": losses[0] if losses else None,
               "final_loss": sum(losses[-25:]) / len(losses[-25:]) if losses else None,
               "pipeline": str(run / "pipeline")}
    atomic_write_json(run / "summary.json", summary)
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="train the colour default model on procedural scenes")
    p.add_argument("run_dir")
    p.add_argument("--steps", type=int, default=ColourTrainConfig.steps)
    p.add_argument("--batch-size", type=int, default=ColourTrainConfig.batch_size)
    p.add_argument("--lr", type=float, default=ColourTrainConfig.lr)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--schedule", default=ColourTrainConfig.schedule, choices=("linear", "scaled_linear"))
    p.add_argument("--prediction-type", default=ColourTrainConfig.prediction_type, choices=("v_prediction", "epsilon"))
    p.add_argument("--resume", action="store_true", help="continue from RUN_DIR/checkpoint.pt")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--export", metavar="OUT", default=None,
                   help="only save the EMA weights of RUN_DIR/checkpoint.pt as a pipeline folder OUT, and exit")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    if a.export:
        print(f"exported step {export_checkpoint(a.run_dir, a.export)} of {a.run_dir} to {a.export}")
        return 0
    cfg = ColourTrainConfig(steps=a.steps, batch_size=a.batch_size, lr=a.lr, seed=a.seed, schedule=a.schedule,
                            prediction_type=a.prediction_type)
    s = train_colour(cfg, a.run_dir, resume=a.resume, progress=not a.no_progress)
    print(f"trained {s['steps']} steps in {s['train_seconds']:.0f} s; loss {s['first_loss']} -> {s['final_loss']:.4f}; "
          f"pipeline: {s['pipeline']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
