"""``diffblend finetune``: fine-tuning of one LoRA adapter for one reward or a weighted reward (DPOK, RWR, or
best-of-n filtered on the colour model).

Works as is under ``accelerate launch`` (several processes / GPUs).
"""

from __future__ import annotations

import argparse

from ._options import Opt, add_config_options


# How FinetuneConfig's fields show on the command line (the rest: --field-name, the field's help and default).
OPTIONS = {
    "reward": Opt(required=True),
    "kl": Opt(required=True, metavar="ALPHA"),
    "num_steps": Opt(flag="--steps"),
    "calibration": Opt(metavar="FILE"),
    "decode_chunk": Opt(metavar="N"),
}


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    from ..train.config import FinetuneConfig

    p = subparsers.add_parser(
        "finetune", help="RL fine-tuning (DPOK, RWR, best-of-n) of a LoRA adapter for a reward",
        description="Fine-tune a rank-r LoRA adapter of a diffusers model for a reward with DPOK-style policy "
                    "gradient (PPO-clipped ratios, KL to the frozen base weighted by --kl), reward-weighted regression "
                    "(--algorithm rwr) or, on the colour model, best-of-n filtering of rendered scenes (--algorithm "
                    "filtered, --kl 0). A weighted reward "
                    "NAME=W,NAME=W trains the MORL oracle. The run directory holds config.json, metrics.jsonl and "
                    "checkpoints; --resume continues a killed run. The adapter is a diffusers LoRA safetensors file. "
                    "Every setting of the run (FinetuneConfig) is an option below.")
    p.add_argument("--run-dir", required=True, help="folder for config, metrics and checkpoints")
    p.add_argument("-o", "--output", default=None,
                   help="adapter file (.safetensors); default RUN_DIR/adapter.safetensors")
    p.add_argument("--resume", action="store_true",
                   help="continue from the newest checkpoint in --run-dir (the same settings; --epochs may grow)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    options = add_config_options(p.add_argument_group("run settings (FinetuneConfig)"), FinetuneConfig,
                                 opts=OPTIONS)
    p.set_defaults(func=run, config_options=options)


def run(args: argparse.Namespace) -> int:
    from ..checks import check_guidance_scale, check_seed
    from ..train import FinetuneConfig, finetune

    check_seed(args.seed, 1, "--seed")
    check_guidance_scale(args.guidance_scale, "--guidance-scale")
    cfg = FinetuneConfig(**args.config_options.values(args))
    result = finetune(cfg, args.run_dir, resume=args.resume, output=args.output, progress=not args.no_progress)
    last = result.metrics[-1] if result.metrics else None
    if last is None:
        summary = ""
    elif cfg.algorithm == "filtered":
        summary = f"; last steps' reward of the kept scenes {last['kept']:.4g} (all candidates {last['all']:.4g})"
    else:
        summary = f"; last epoch reward {last['reward_mean']:.4g}, KL {last['kl']:.3g} nats"
    print(f"adapter: {result.adapter} ({result.epochs} epochs{summary})")
    return 0
