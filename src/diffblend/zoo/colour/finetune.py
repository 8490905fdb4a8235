"""Reward-filtered LoRA fine-tuning of the colour model on rendered scenes (best-of-n; RAFT, Dong et al. 2023).

Each step draws ``batch_size`` prompts of the default prompts' form (shape and colour, a size half the time:
``"a red circle"``, ``"a small blue square"``), renders ``candidates`` scenes for each (what the prompt leaves
open, the background's colour, pattern, saturation and contrast, drawn afresh for every candidate), scores them
with the reward and keeps the best candidate of each prompt. A LoRA on the base's UNet is trained on the kept
scenes with the base's own loss (``colour.train.diffusion_loss``, prompt dropout for classifier-free guidance).
The base was trained on all of these scenes; the adapter learns the part of them the reward prefers, so its
images stay scenes of the prompt (what prompt_alignment checks), only the choices the prompt leaves open move.

A reward is a name or NAME=W,... (r(w) = sum_i w_i z_i, each reward standardised by ``calibration``, the base's
mean and sd on its default prompts: the MORL oracles' objective). Keeping the best of n is the tilt towards
high reward that an RL step makes, done on the renderer's scenes instead of the model's own samples: on this
CPU budget the on-policy trainers (``diffblend finetune``, DPOK and RWR) could not move JPEG size
(docs/colour_default.md). Writes ``RUN_DIR/config.json``, ``metrics.jsonl``, ``checkpoint.pt`` (resumable)
and the adapter (diffusers LoRA safetensors, as ``diffblend finetune`` writes):

    python -m diffblend.zoo.colour.finetune RUN_DIR --reward colourfulness --calibration CAL -o colourfulness.safetensors

or, the same run through the project's fine-tuning command (epochs = steps, prompts per epoch = prompts per step,
samples per prompt = candidates; :func:`filtered_config`):

    diffblend finetune --algorithm filtered --model colour --kl 0 --reward colourfulness --calibration CAL
        --epochs 300 --prompts-per-epoch 32 --samples-per-prompt 8 --lr 3e-3 --weight-decay 0 --checkpoint-every 50
        --run-dir RUN_DIR -o colourfulness.safetensors

(one command; the options differ from ``diffblend finetune``'s defaults, which are DPOK's).
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from ..._io import atomic_write, atomic_write_json
from ..train_base import _lr_factor, _truncate_metrics
from .data import prompt_for, redraw_clashing_backgrounds, render, sample_attributes
from .train import diffusion_loss

__all__ = ["FilteredConfig", "draw_candidates", "keep_best", "finetune_filtered", "filtered_config",
           "finetune_from_config"]


@dataclass
class FilteredConfig:
    """Everything that defines a filtered fine-tuning run (written to ``config.json``)."""

    reward: str  # a reward name or NAME=W,... (weights sum to 1)
    calibration: str | None = None  # reward calibration manifest (needed for a weighted reward)
    steps: int = 300  # optimizer steps
    batch_size: int = 32  # prompts (kept scenes) per step
    candidates: int = 8  # scenes rendered per prompt; the best one is kept
    size_prob: float = 0.5  # probability that a prompt names the size
    rank: int = 4  # LoRA rank
    lr: float = 3e-3  # peak AdamW learning rate; linear warm-up then cosine decay to 10 %
    weight_decay: float = 0.0  # AdamW's decoupled weight decay
    warmup_steps: int = 20
    grad_clip: float = 1.0
    prompt_dropout: float = 0.1  # as the base's training: CFG's unconditional input learns the kept scenes too
    seed: int = 0
    log_every: int = 10
    checkpoint_every: int = 50

    def check(self) -> None:
        for name in ("steps", "batch_size", "candidates", "rank", "log_every", "checkpoint_every"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be an int >= 1, got {v!r}")
        for name in ("size_prob", "prompt_dropout"):
            if not 0.0 <= float(getattr(self, name)) <= 1.0:
                raise ValueError(f"{name} must be in [0, 1], got {getattr(self, name)!r}")
        if not (math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"lr must be a finite number > 0, got {self.lr!r}")
        if not (math.isfinite(self.weight_decay) and self.weight_decay >= 0):
            raise ValueError(f"weight_decay must be a finite number >= 0, got {self.weight_decay!r}")
        if "=" in self.reward and not self.calibration:
            raise ValueError(f"reward {self.reward!r} weighs several rewards: give --calibration, so that each counts "
                             "in base sd units")


def draw_candidates(batch_size: int, candidates: int, g: torch.Generator,
                    size_prob: float = 0.5) -> tuple[torch.Tensor, list[str]]:
    """``batch_size`` prompts naming the shape and colour (and the size with probability ``size_prob``), and
    ``candidates`` rendered scenes of each: images (batch_size * candidates, 3, 32, 32) in [0, 1], prompt-major
    (the candidates of prompt i are rows i * candidates ...), and the prompts (one per row)."""
    n = batch_size * candidates
    slots = sample_attributes(batch_size, g)
    named_size = torch.rand(batch_size, generator=g) < size_prob
    attrs = sample_attributes(n, g)
    for k in ("shape", "colour"):
        attrs[k] = slots[k].repeat_interleave(candidates)
    size = slots["size"].repeat_interleave(candidates)
    attrs["size"] = torch.where(named_size.repeat_interleave(candidates), size, attrs["size"])
    redraw_clashing_backgrounds(attrs, g)  # the shape's colour differs from the background's, as in the base's data
    prompts = []
    for i in range(batch_size):
        named = ["shape", "colour"] + (["size"] if bool(named_size[i]) else [])
        prompts += [prompt_for({k: slots[k][i] for k in named}, named)] * candidates
    return render(attrs, g), prompts


def keep_best(scores: torch.Tensor, candidates: int) -> torch.Tensor:
    """Row indices of the best-scoring candidate of each prompt (``scores`` prompt-major, (B * candidates,))."""
    if scores.dim() != 1 or scores.numel() % candidates:
        raise ValueError(f"scores must be (B * {candidates},), got {tuple(scores.shape)}")
    s = torch.nan_to_num(scores.float(), nan=-math.inf).view(-1, candidates)
    return s.argmax(1) + torch.arange(s.shape[0]) * candidates


def filtered_config(cfg: Any) -> FilteredConfig:
    """The run that ``diffblend finetune --algorithm filtered`` means: a ``train.FinetuneConfig`` (checked there:
    the settings this trainer does not read are at their defaults) mapped onto this trainer's settings; epochs
    are steps, prompts_per_epoch the prompts per step, samples_per_prompt the candidates of each prompt."""
    return FilteredConfig(reward=cfg.reward, calibration=cfg.calibration, steps=cfg.epochs,
                          batch_size=cfg.prompts_per_epoch, candidates=cfg.samples_per_prompt, rank=cfg.rank,
                          lr=cfg.lr, weight_decay=cfg.weight_decay, grad_clip=cfg.max_grad_norm, seed=cfg.seed,
                          checkpoint_every=cfg.checkpoint_every)


def finetune_from_config(cfg: Any, run_dir: str | Path, out: str | Path, *, resume: bool = False,
                         progress: bool = True, stop_after: int | None = None) -> dict:
    """``diffblend finetune --algorithm filtered`` on the colour model (the hook the zoo plug-in registers):
    :func:`finetune_filtered` of :func:`filtered_config` ``(cfg)``."""
    return finetune_filtered(filtered_config(cfg), run_dir, out, resume=resume, progress=progress,
                             stop_after=stop_after)


def finetune_filtered(cfg: FilteredConfig, run_dir: str | Path, out: str | Path, pipe: Any = None,
                      resume: bool = False, progress: bool = True, stop_after: int | None = None) -> dict:
    """Train (or resume) a filtered LoRA into ``run_dir``, write it to ``out`` (.safetensors); returns a summary
    (with ``metrics``: the rows this call logged).

    ``pipe``: the colour pipeline to adapt (default: the shipped base). ``stop_after``: stop after that many
    steps of this call, with a checkpoint and without writing ``out`` (as if the run had been killed there)."""
    from tqdm.auto import tqdm

    from ...train.lora import add_lora, lora_parameters, lora_state_dict, save_lora, set_lora_state_dict
    from ...train.reward import resolve_reward

    cfg.check()
    out = Path(out)
    if out.suffix != ".safetensors":
        raise ValueError(f"out must end in .safetensors, got {str(out)!r}")
    run = Path(run_dir)
    ckpt = run / "checkpoint.pt"
    if resume and not ckpt.is_file():
        raise FileNotFoundError(f"resume: {ckpt} does not exist (start without --resume)")
    if not resume and ckpt.is_file():
        raise FileExistsError(f"{run} already holds a run: pass --resume to continue it, or choose another RUN_DIR")
    run.mkdir(parents=True, exist_ok=True)
    if resume:
        old = {**asdict(FilteredConfig(reward="")), **json.loads((run / "config.json").read_text())}  # + new fields
        if old != asdict(cfg):
            diff = {k: (old.get(k), v) for k, v in asdict(cfg).items() if old.get(k) != v}
            raise ValueError(f"resume: the settings differ from the run's config.json (old, new): {diff}")
    atomic_write_json(run / "config.json", asdict(cfg))
    if pipe is None:
        from ...generation import load_pipeline
        from .. import weights_dir

        pipe = load_pipeline(str(weights_dir("colour_base")))
    reward_fn = resolve_reward(cfg.reward, calibration=cfg.calibration)
    g = torch.Generator().manual_seed(cfg.seed)
    pipe.text_encoder.requires_grad_(False).eval()
    add_lora(pipe.unet, rank=cfg.rank, generator=torch.Generator().manual_seed(cfg.seed))
    params = lora_parameters(pipe.unet)
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    step = 0
    if resume:
        state = torch.load(ckpt, map_location="cpu", weights_only=True)
        set_lora_state_dict(pipe.unet, state["lora"])
        opt.load_state_dict(state["optimizer"])
        g.set_state(state["generator"])
        step = int(state["step"])
        _truncate_metrics(run / "metrics.jsonl", step)  # logged after the checkpoint by the killed run: redone now
    T = pipe.scheduler.config.num_train_timesteps
    end = cfg.steps if stop_after is None else min(cfg.steps, step + int(stop_after))
    pipe.unet.train()
    t0, rows, logged = time.time(), [], []
    bar = tqdm(total=cfg.steps, initial=step, desc=f"filtered {cfg.reward}", disable=not progress)
    with open(run / "metrics.jsonl", "a") as log:
        while step < end:
            images, prompts = draw_candidates(cfg.batch_size, cfg.candidates, g, cfg.size_prob)
            with torch.no_grad():
                scores = reward_fn(images, prompts, None)[0].float().cpu()
            keep = keep_best(scores, cfg.candidates)
            x0 = images[keep] * 2 - 1
            kept = [prompts[i] for i in keep.tolist()]
            drop = torch.rand(len(kept), generator=g) < cfg.prompt_dropout
            kept = ["" if d else p for p, d in zip(kept, drop)]
            t = torch.randint(0, T, (len(kept),), generator=g)
            noise = torch.randn(x0.shape, generator=g)
            for group in opt.param_groups:
                group["lr"] = cfg.lr * _lr_factor(step, cfg)
            loss = diffusion_loss(pipe, x0, kept, t, noise)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            step += 1
            rows.append({"loss": float(loss.detach()), "kept": float(scores[keep].mean()),
                         "all": float(scores.nanmean())})
            bar.update()
            if step % cfg.log_every == 0 or step == cfg.steps:
                recent = rows[-cfg.log_every:]
                logged.append({"step": step, **{k: sum(r[k] for r in recent) / len(recent) for k in recent[0]},
                               "seconds": round(time.time() - t0, 1)})
                log.write(json.dumps(logged[-1]) + "\n")
                log.flush()
            if step % cfg.checkpoint_every == 0 or step == end:
                state = {"lora": lora_state_dict(pipe.unet), "optimizer": opt.state_dict(),
                         "generator": g.get_state(), "step": step}
                atomic_write(ckpt, lambda tmp: torch.save(state, tmp))
    bar.close()
    pipe.unet.eval()
    if step < cfg.steps:
        return {"steps": step, "seconds": round(time.time() - t0, 1), "adapter": None, "metrics": logged}
    save_lora(pipe.unet, out, pipeline_class=type(pipe))
    if not rows:  # resumed a finished run: the adapter is written again, its summary stays
        return {"steps": step, "seconds": 0.0, "adapter": str(out), "metrics": logged}
    summary = {"steps": step, "seconds": round(time.time() - t0, 1), "adapter": str(out),
               "kept_reward_mean": sum(r["kept"] for r in rows[-50:]) / max(1, len(rows[-50:])),
               "candidate_reward_mean": sum(r["all"] for r in rows[-50:]) / max(1, len(rows[-50:]))}
    atomic_write_json(run / "summary.json", summary)
    summary["metrics"] = logged  # returned, not written: they are in metrics.jsonl
    return summary


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(description="reward-filtered LoRA fine-tuning of the colour model on rendered scenes "
                                            "(best of n per prompt)")
    p.add_argument("run_dir")
    p.add_argument("--reward", required=True, help="a reward name, or NAME=W,... (weights sum to 1)")
    p.add_argument("--calibration", default=None, help="reward calibration manifest (diffblend calibrate)")
    p.add_argument("-o", "--output", required=True, help="the adapter file (.safetensors)")
    d = FilteredConfig(reward="")
    p.add_argument("--steps", type=int, default=d.steps)
    p.add_argument("--batch-size", type=int, default=d.batch_size)
    p.add_argument("--candidates", type=int, default=d.candidates, help="scenes per prompt; the best is kept")
    p.add_argument("--rank", type=int, default=d.rank)
    p.add_argument("--lr", type=float, default=d.lr)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR")
    p.add_argument("--no-progress", action="store_true")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    cfg = FilteredConfig(reward=a.reward, calibration=a.calibration, steps=a.steps, batch_size=a.batch_size,
                         candidates=a.candidates, rank=a.rank, lr=a.lr, seed=a.seed)
    s = finetune_filtered(cfg, a.run_dir, a.output, resume=a.resume, progress=not a.no_progress)
    rewards = (f"; reward of the kept scenes {s['kept_reward_mean']:.3f} (all candidates "
               f"{s['candidate_reward_mean']:.3f})" if "kept_reward_mean" in s else "")  # none: resumed when done
    print(f"{s['steps']} steps in {s['seconds']:.0f} s{rewards}; adapter: {s['adapter']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
