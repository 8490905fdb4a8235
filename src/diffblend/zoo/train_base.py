"""Train the default model (``DigitsPipeline``) on the digits: the library behind ``diffblend train-base``.

Standard epsilon-prediction DDPM training (Ho et al. 2020, Alg. 1) of the UNet and the tiny text
encoder together, from scratch: x0 a digit in [-1, 1], prompt a random template for its label
(``zoo.data.TEMPLATES``), replaced by the empty prompt with probability ``prompt_dropout`` so that
the same model gives the unconditional prediction of classifier-free guidance (Ho & Salimans 2022).
The shipped weights are an exponential moving average of the trained ones.

A run directory holds ``config.json`` (resolved), ``metrics.jsonl`` (one JSON line per log step),
``checkpoint.pt`` (weights, EMA, optimizer, schedule, RNG and step; resumable), ``pipeline/``
(``save_pretrained`` safetensors of the EMA model, loadable with ``DigitsPipeline.from_pretrained``)
and ``eval.json`` (sample quality: classifier accuracy on generated digits per prompted digit).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from .._io import atomic_write, atomic_write_json
from .data import TEMPLATES, load_split, prompt_for
from .text import portable_text_encoder_file

__all__ = ["TrainBaseConfig", "train_base", "sample_quality", "training_batch", "diffusion_loss"]


@dataclass
class TrainBaseConfig:
    """Everything that defines a ``train-base`` run (written to ``config.json``)."""

    steps: int = 1000  # optimizer steps (batches)
    batch_size: int = 64  # images per step
    lr: float = 1e-3  # peak AdamW learning rate (UNet and text encoder)
    warmup_steps: int = 50  # linear warm-up steps, then cosine decay to 10 % of lr
    weight_decay: float = 0.0  # AdamW weight decay
    grad_clip: float = 1.0  # max global gradient norm
    prompt_dropout: float = 0.1  # probability that a training prompt is replaced by "" (for CFG)
    ema_decay: float = 0.995  # cap of the EMA decay; the warm-up min(cap, (1+n)/(10+n)) sets it in short runs (0.991 at n = 1000); the EMA is what ships
    channels: tuple[int, ...] = (32, 32, 32)  # UNet block_out_channels (16x16, 8x8, 4x4)
    seed: int = 0  # seeds initialisation, batches, timesteps, noise, dropout and evaluation
    log_every: int = 25  # steps between metrics.jsonl lines
    checkpoint_every: int = 100  # steps between checkpoint.pt writes (and always at the end)
    eval_per_digit: int = 20  # generated images per digit for the quality metric (0 = skip)
    eval_steps: int = 20  # DDIM steps when evaluating
    eval_guidance: float = 2.0  # CFG scale when evaluating
    eval_eta: float = 1.0  # DDIM eta when evaluating (1 = the stochastic sampler of the paper)
    train_images: int = 0  # use only the first N training images (0 = all 1347; tests use a few)
    extra: dict = field(default_factory=dict)  # free-form notes carried into config.json


def training_batch(x: torch.Tensor, y: torch.Tensor, idx: torch.Tensor, cfg: TrainBaseConfig,
                   g: torch.Generator, num_train_timesteps: int) -> tuple[torch.Tensor, list[str], torch.Tensor, torch.Tensor]:
    """One batch: x0 (B, 1, H, W) in [-1, 1], prompts (B,), timesteps (B,), noise (B, 1, H, W)."""
    x0 = x[idx] * 2 - 1
    B = len(idx)
    tmpl = torch.randint(0, len(TEMPLATES), (B,), generator=g)
    drop = torch.rand(B, generator=g) < cfg.prompt_dropout
    prompts = ["" if d else prompt_for(int(c), int(k)) for c, k, d in zip(y[idx], tmpl, drop)]
    t = torch.randint(0, num_train_timesteps, (B,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    return x0, prompts, t, noise


def diffusion_loss(pipe: Any, x0: torch.Tensor, prompts: list[str], t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """MSE between the true noise and the UNet's epsilon prediction at x_t = q(x_t | x0) (scalar)."""
    device = pipe.unet.device
    x0, t, noise = x0.to(device), t.to(device), noise.to(device)
    x_t = pipe.scheduler.add_noise(x0, noise, t)
    emb, _ = pipe.encode_prompt(prompts, device, 1, False)
    pred = pipe.unet(x_t, t, encoder_hidden_states=emb, return_dict=False)[0]
    return torch.nn.functional.mse_loss(pred, noise)


def _lr_factor(step: int, cfg: TrainBaseConfig) -> float:
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    frac = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac)))


@torch.no_grad()
def sample_quality(pipe: Any, per_digit: int = 20, steps: int = 20, guidance_scale: float = 2.0, eta: float = 1.0,
                   seed: int = 0, classifier: Any = None, batch_size: int = 100, progress: bool = False) -> dict:
    """Accuracy of the digit classifier on generated images, per prompted digit and overall.

    Image j of digit d is prompted with template j mod 5 (``"7"``, ``"a digit 7"``, ``"seven"``...)
    and drawn from its own generator seeded ``seed * 100_000 + d * 1000 + j``.

    Returns:
        ``{"accuracy": float, "per_digit": [10 floats], "mean_log_prob": float, "images": int, ...}``.
    """
    from tqdm.auto import tqdm

    from .classifier import load_classifier

    clf = classifier if classifier is not None else load_classifier(device=pipe.device)
    jobs = [(d, j) for d in range(10) for j in range(per_digit)]
    correct = torch.zeros(10)
    logp_sum = 0.0
    for i in tqdm(range(0, len(jobs), batch_size), desc="sample quality", disable=not progress, leave=False):
        chunk = jobs[i:i + batch_size]
        prompts = [prompt_for(d, j) for d, j in chunk]
        gens = [torch.Generator().manual_seed(seed * 100_000 + d * 1000 + j) for d, j in chunk]
        images = pipe(prompts, num_inference_steps=steps, guidance_scale=guidance_scale, eta=eta,
                      generator=gens, output_type="pt").images
        labels = torch.tensor([d for d, _ in chunk])
        logp = torch.log_softmax(clf(images.to(next(clf.parameters()).device)).cpu(), 1)
        correct += torch.bincount(labels[logp.argmax(1) == labels], minlength=10).float()
        logp_sum += float(logp.gather(1, labels[:, None]).sum())
    per_digit_acc = (correct / per_digit).tolist()
    return {"accuracy": float(correct.sum()) / len(jobs), "per_digit": per_digit_acc,
            "mean_log_prob": logp_sum / len(jobs), "images": len(jobs), "steps": steps,
            "guidance_scale": guidance_scale, "eta": eta, "seed": seed}


def _save_checkpoint(path: Path, pipe: Any, ema: dict, opt: Any, step: int, g: torch.Generator) -> None:
    state = {
        "step": step,
        "unet": pipe.unet.state_dict(),
        "text_encoder": pipe.text_encoder.state_dict(),
        "ema": ema,
        "optimizer": opt.state_dict(),
        "generator": g.get_state(),
    }
    atomic_write(path, lambda tmp: torch.save(state, tmp))


# what a resumed run may change: its length, and the settings of the evaluation and the bookkeeping
_RESUMABLE_CHANGES = {"steps", "log_every", "checkpoint_every", "eval_per_digit", "eval_steps", "eval_guidance",
                      "eval_eta", "extra"}


def _check_resumable(path: Path, cfg: TrainBaseConfig) -> None:
    """Refuse to resume a run with settings that differ from its ``config.json`` (other than the above)."""
    if not path.is_file():
        return
    saved = json.loads(path.read_text())
    now = json.loads(json.dumps(asdict(cfg)))  # tuples as JSON lists, as saved
    diff = sorted(k for k in now if k not in _RESUMABLE_CHANGES and saved.get(k) != now[k])
    if diff:
        raise ValueError(f"--resume: the config differs from the run's config.json in {diff}; use the same "
                         f"settings (only the number of steps and the evaluation may change) or a new run dir")


def _truncate_metrics(path: Path, step: int) -> None:
    """Keep the metric lines up to ``step`` (the checkpoint's): a run killed after it logged later steps, or in
    the middle of a line, redoes those steps when resumed."""
    if not path.is_file():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            if json.loads(line)["step"] <= step:
                kept.append(line + "\n")
        except (ValueError, KeyError, TypeError):  # a torn line
            continue
    atomic_write(path, lambda tmp: Path(tmp).write_text("".join(kept)))


def _params(pipe: Any) -> dict[str, torch.nn.Parameter]:
    named = {f"unet.{k}": p for k, p in pipe.unet.named_parameters()}
    named.update({f"text_encoder.{k}": p for k, p in pipe.text_encoder.named_parameters()})
    return named


@dataclass
class _Run:
    """A run in progress: the pipeline, its named parameters, optimizer, EMA, batch generator and step."""

    pipe: Any
    named: dict[str, torch.nn.Parameter]
    opt: torch.optim.Optimizer
    g: torch.Generator
    ema: dict[str, torch.Tensor]
    step: int = 0


def _check_start(cfg: TrainBaseConfig, run: Path, resume: bool) -> None:
    """Refuse bad settings, a resume without a checkpoint, a new run over an old one, a resume with other settings."""
    if cfg.steps < 1 or cfg.batch_size < 1:
        raise ValueError(f"steps and batch_size must be >= 1, got {cfg.steps} and {cfg.batch_size}")
    if not 0.0 <= cfg.prompt_dropout < 1.0:
        raise ValueError(f"prompt_dropout must be in [0, 1), got {cfg.prompt_dropout}")
    ckpt_path = run / "checkpoint.pt"
    if resume and not ckpt_path.is_file():
        raise FileNotFoundError(f"--resume: no checkpoint.pt in {run}")
    if not resume and (ckpt_path.exists() or (run / "metrics.jsonl").exists()):
        raise ValueError(f"run directory {run} already holds a run; pass --resume or choose another directory")
    if resume:
        _check_resumable(run / "config.json", cfg)


def _new_run(cfg: TrainBaseConfig, device: str | torch.device) -> _Run:
    """A fresh pipeline (seeded), AdamW over the UNet and the text encoder, the batch generator, the EMA."""
    from .model import build_pipeline

    pipe = build_pipeline(seed=cfg.seed, channels=tuple(cfg.channels)).to(device)
    pipe.set_progress_bar_config(disable=True)
    named = _params(pipe)
    opt = torch.optim.AdamW(named.values(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    g = torch.Generator().manual_seed(cfg.seed)
    ema = {k: p.detach().clone() for k, p in named.items()}
    return _Run(pipe, named, opt, g, ema)


def _resume(r: _Run, run: Path, cfg: TrainBaseConfig, device: str | torch.device) -> None:
    """Load ``run/checkpoint.pt`` into ``r`` (weights, optimizer, EMA, generator, step); drop later metric lines."""
    ckpt_path = run / "checkpoint.pt"
    state = torch.load(ckpt_path, map_location=device, weights_only=True)
    r.pipe.unet.load_state_dict(state["unet"])
    r.pipe.text_encoder.load_state_dict(state["text_encoder"])
    r.opt.load_state_dict(state["optimizer"])
    r.ema = state["ema"]
    r.g.set_state(state["generator"])
    r.step = int(state["step"])
    if cfg.steps < r.step:
        raise ValueError(f"--resume: steps must be >= {r.step}, the steps {ckpt_path} has done; got {cfg.steps}")
    _truncate_metrics(run / "metrics.jsonl", r.step)


def _train_step(r: _Run, cfg: TrainBaseConfig, x: torch.Tensor, y: torch.Tensor, T: int) -> tuple[float, torch.Tensor]:
    """One optimizer step on a fresh batch, then the EMA update; returns (loss, gradient norm before clipping)."""
    # the batch is a function of the generator's state only, so a resumed run continues
    # the exact stream of an uninterrupted one
    idx = torch.randint(0, len(y), (cfg.batch_size,), generator=r.g)
    x0, prompts, t, noise = training_batch(x, y, idx, cfg, r.g, T)
    for group in r.opt.param_groups:
        group["lr"] = cfg.lr * _lr_factor(r.step, cfg)
    loss = diffusion_loss(r.pipe, x0, prompts, t, noise)
    r.opt.zero_grad(set_to_none=True)
    loss.backward()
    gnorm = torch.nn.utils.clip_grad_norm_(list(r.named.values()), cfg.grad_clip)
    r.opt.step()
    r.step += 1
    decay = min(cfg.ema_decay, (1 + r.step) / (10 + r.step))  # short warm-up of the EMA
    with torch.no_grad():
        for k, p in r.named.items():
            r.ema[k].lerp_(p.detach(), 1 - decay)
    return float(loss.detach()), gnorm


def _mean_last(values: list[float], n: int) -> float:
    return sum(values[-n:]) / len(values[-n:])


def _train_loop(r: _Run, cfg: TrainBaseConfig, run: Path, progress: bool, stop_at: int | None) -> tuple[list[float], float]:
    """Steps up to ``cfg.steps`` (or ``stop_at``), logging and checkpointing; returns (this call's losses, seconds)."""
    from tqdm.auto import tqdm

    x, y = load_split("train")
    if cfg.train_images:
        x, y = x[:cfg.train_images], y[:cfg.train_images]
    T = r.pipe.scheduler.config.num_train_timesteps
    r.pipe.unet.train()
    r.pipe.text_encoder.train()
    losses: list[float] = []
    t0 = time.time()
    end = cfg.steps if stop_at is None else min(stop_at, cfg.steps)
    bar = tqdm(total=cfg.steps, initial=r.step, desc="train-base", disable=not progress)
    with open(run / "metrics.jsonl", "a") as log:
        while r.step < end:
            loss, gnorm = _train_step(r, cfg, x, y, T)
            losses.append(loss)
            bar.update()
            bar.set_postfix(loss=f"{_mean_last(losses, 25):.4f}")
            if r.step % cfg.log_every == 0 or r.step == cfg.steps:
                log.write(json.dumps({"step": r.step, "loss": _mean_last(losses, cfg.log_every),
                                      "lr": r.opt.param_groups[0]["lr"], "grad_norm": float(gnorm),
                                      "seconds": round(time.time() - t0, 2)}) + "\n")
                log.flush()
            if r.step % cfg.checkpoint_every == 0 or r.step == cfg.steps or r.step == stop_at:
                _save_checkpoint(run / "checkpoint.pt", r.pipe, r.ema, r.opt, r.step, r.g)
    bar.close()
    return losses, time.time() - t0


def _ship(r: _Run, cfg: TrainBaseConfig, run: Path, summary: dict, progress: bool) -> dict:
    """Put the EMA weights in the pipeline (the model that ships), save it to ``run/pipeline``, evaluate it."""
    with torch.no_grad():
        for k, p in r.named.items():
            p.copy_(r.ema[k])
    r.pipe.unet.eval()
    r.pipe.text_encoder.eval()
    out_dir = run / "pipeline"
    r.pipe.save_pretrained(str(out_dir), safe_serialization=True)
    portable_text_encoder_file(out_dir / "text_encoder")  # loads on transformers 4.x too
    summary["pipeline"] = str(out_dir)
    if cfg.eval_per_digit > 0:
        t1 = time.time()
        summary["eval"] = sample_quality(r.pipe, cfg.eval_per_digit, cfg.eval_steps, cfg.eval_guidance, cfg.eval_eta,
                                         seed=cfg.seed, progress=progress)
        summary["eval"]["seconds"] = round(time.time() - t1, 1)
        atomic_write_json(run / "eval.json", summary["eval"])
    atomic_write_json(run / "summary.json", summary)
    return summary


def train_base(cfg: TrainBaseConfig, run_dir: str | Path, resume: bool = False, progress: bool = True,
               device: str | torch.device = "cpu", stop_at: int | None = None) -> dict:
    """Train a ``DigitsPipeline`` from scratch (or resume); write the run directory; return a summary.

    Args:
        cfg: the run's settings.
        run_dir: output folder (created). With ``resume``, continues from its ``checkpoint.pt``.
        progress: show a tqdm bar with the loss.
        stop_at: stop after this step with a checkpoint, as if killed there (for time-boxed jobs
            and tests); the run continues later with ``resume=True``.

    Returns:
        ``{"final_loss": ..., "first_loss": ..., "train_seconds": ..., "eval": {...} or None, ...}``.
    """
    run = Path(run_dir)
    _check_start(cfg, run, resume)
    run.mkdir(parents=True, exist_ok=True)
    atomic_write_json(run / "config.json", asdict(cfg))
    r = _new_run(cfg, device)
    if resume:
        _resume(r, run, cfg, device)
    losses, train_seconds = _train_loop(r, cfg, run, progress, stop_at)
    summary: dict[str, Any] = {"steps": r.step, "train_seconds": round(train_seconds, 1),
                               "first_loss": losses[0] if losses else None,
                               "final_loss": _mean_last(losses, 25) if losses else None,  # None: no step in this call
                               "pipeline": None, "eval": None}
    if r.step < cfg.steps:  # stopped early on purpose: the checkpoint is the result
        return summary
    return _ship(r, cfg, run, summary, progress)
