"""``diffblend finetune``: RL fine-tuning (DPOK) of one LoRA adapter for one reward or a weighted reward.

Works as is under ``accelerate launch`` (several processes / GPUs).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "finetune", help="RL fine-tuning (DPOK) of a LoRA adapter for a reward",
        description="Fine-tune a rank-r LoRA adapter of a diffusers model for a reward with DPOK-style policy "
                    "gradient (PPO-clipped ratios, KL to the frozen base weighted by --kl). A weighted reward "
                    "NAME=W,NAME=W trains the MORL oracle. The run directory holds config.json, metrics.jsonl and "
                    "checkpoints; --resume continues a killed run. The adapter is a diffusers LoRA safetensors file.")
    p.add_argument("--reward", required=True,
                   help="reward name (jpeg_compressibility, legibility, boldness, ...) or NAME=W,NAME=W summing to 1")
    p.add_argument("--kl", type=float, required=True, metavar="ALPHA",
                   help="alpha >= 0, weight of the KL term alpha * ||eps_theta - eps_pre||^2 per step")
    p.add_argument("--run-dir", required=True, help="folder for config, metrics and checkpoints")
    p.add_argument("-o", "--output", default=None,
                   help="adapter file (.safetensors); default RUN_DIR/adapter.safetensors")
    p.add_argument("--resume", action="store_true", help="continue from the newest checkpoint in --run-dir (the same settings; --epochs may grow)")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder (default: the embedded digits model)")
    p.add_argument("--prompts", default=None,
                   help="comma-separated prompts drawn for the rollouts (default: the digits 0,...,9)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="a reward calibration manifest (diffblend calibrate): train on each reward standardised "
                        "against the base model's images, (r - mean) / std, so the weights of NAME=W,... mean the "
                        "same on every reward")
    p.add_argument("--monitor", default="",
                   help="comma-separated rewards logged (not trained) on the rollouts, e.g. legibility")
    p.add_argument("--epochs", type=int, default=30, help="rollout + update rounds (default 30)")
    p.add_argument("--prompts-per-epoch", type=int, default=4, help="prompt draws per epoch and process (default 4)")
    p.add_argument("--samples-per-prompt", type=int, default=4, help="images per prompt, >= 2 (default 4)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps of the rollouts (default 20)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale of the rollouts (default 2.0)")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (default 4)")
    p.add_argument("--lr", type=float, default=1e-2,
                   help="AdamW learning rate (default 1e-2, as the shipped digits adapters; SD-size models: 1e-4 or less)")
    p.add_argument("--minibatch-size", type=int, default=16,
                   help="trajectories per optimizer step (default 16: one step per epoch at the default batch)")
    p.add_argument("--timestep-fraction", type=float, default=1.0,
                   help="share of the steps of each trajectory trained on, in (0, 1] (default 1)")
    p.add_argument("--clip-range", type=float, default=1e-4, help="PPO ratio clip (default 1e-4)")
    p.add_argument("--max-grad-norm", type=float, default=1.0, help="gradient clipping norm (default 1)")
    p.add_argument("--step-weighting", choices=("pred", "none"), default="pred",
                   help="pred: each step's policy gradient in prediction units (default); none: plain DDPO")
    p.add_argument("--seed", type=int, default=0, help="seed of the adapter init, the noise and the shuffles")
    p.add_argument("--checkpoint-every", type=int, default=5, help="epochs between checkpoints (default 5)")
    p.add_argument("--noise-level", type=float, default=0.7,
                   help="flow-matching models (SD3): the SDE's noise level, > 0 (default 0.7)")
    p.add_argument("--mixed-precision", choices=("no", "bf16", "fp16"), default="no",
                   help="accelerate's mixed precision of the updates (default no)")
    p.add_argument("--gradient-checkpointing", action="store_true",
                   help="recompute the network's activations in the backward pass (less memory)")
    p.add_argument("--decode-chunk", type=int, default=None, metavar="N",
                   help="decode N latents at a time (default: the whole batch)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..checks import check_guidance_scale, check_seed
    from ..train import DIGIT_PROMPTS, FinetuneConfig, finetune

    check_seed(args.seed, 1, "--seed")
    check_guidance_scale(args.guidance_scale, "--guidance-scale")

    prompts = DIGIT_PROMPTS if args.prompts is None else tuple(s.strip() for s in args.prompts.split(","))
    if any(not s for s in prompts):
        raise ValueError(f"--prompts {args.prompts!r} has an empty prompt; expected comma-separated prompts")
    monitor = tuple(m.strip() for m in args.monitor.split(",") if m.strip())
    cfg = FinetuneConfig(
        reward=args.reward, calibration=args.calibration, kl=args.kl, model=args.model, prompts=prompts, monitor=monitor, rank=args.rank, epochs=args.epochs,
        prompts_per_epoch=args.prompts_per_epoch, samples_per_prompt=args.samples_per_prompt,
        num_steps=args.steps, guidance_scale=args.guidance_scale, minibatch_size=args.minibatch_size,
        timestep_fraction=args.timestep_fraction, clip_range=args.clip_range, lr=args.lr,
        max_grad_norm=args.max_grad_norm, step_weighting=args.step_weighting, seed=args.seed,
        checkpoint_every=args.checkpoint_every, noise_level=args.noise_level, mixed_precision=args.mixed_precision,
        gradient_checkpointing=args.gradient_checkpointing, decode_chunk=args.decode_chunk)
    result = finetune(cfg, args.run_dir, resume=args.resume, output=args.output, progress=not args.no_progress)
    last = result.metrics[-1] if result.metrics else None
    summary = f"; last epoch reward {last['reward_mean']:.4g}, KL {last['kl']:.3g} nats" if last else ""
    print(f"adapter: {result.adapter} ({result.epochs} epochs{summary})")
    return 0
