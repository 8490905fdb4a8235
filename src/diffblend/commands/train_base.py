"""``diffblend train-base``: train the embedded default digits model (and optionally its classifier)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "train-base", help="train the embedded default digits model from scratch",
        description="Train the default text-to-image digits model (DigitsPipeline) on scikit-learn's digits. "
                    "Writes RUN_DIR/config.json, metrics.jsonl, checkpoint.pt, pipeline/ (save_pretrained) and "
                    "eval.json (classifier accuracy on generated digits). Defaults reproduce the shipped model.")
    p.add_argument("run_dir", help="output run directory")
    p.add_argument("--steps", type=int, default=1000, help="optimizer steps (default 1000)")
    p.add_argument("--batch-size", type=int, default=64, help="images per step (default 64)")
    p.add_argument("--lr", type=float, default=1e-3, help="peak AdamW learning rate (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="seed of everything (default 0)")
    p.add_argument("--eval-per-digit", type=int, default=20,
                   help="generated images per digit for the accuracy metric (default 20; 0 skips)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: on a busy machine more threads of these tiny ops spin "
                        "against other jobs and can be 10x slower; the shipped model used 2 on an idle machine)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--resume", action="store_true", help="continue the run in RUN_DIR from its checkpoint.pt (the same settings; --steps may grow)")
    p.add_argument("--classifier", action="store_true",
                   help="also train the legibility classifier into RUN_DIR/classifier (about 20 s)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..zoo.train_base import TrainBaseConfig, train_base
    from ._util import set_threads
    from ._util import check_device

    set_threads(args.threads)
    check_device(args.device)
    if args.eval_per_digit < 0:
        raise ValueError(f"--eval-per-digit must be >= 0, got {args.eval_per_digit}")
    cfg = TrainBaseConfig(steps=args.steps, batch_size=args.batch_size, lr=args.lr, seed=args.seed,
                          eval_per_digit=args.eval_per_digit)
    if args.classifier:
        from pathlib import Path

        from ..zoo.classifier import ClassifierConfig, evaluate_classifier, save_classifier, train_classifier

        clf = train_classifier(ClassifierConfig(seed=args.seed))
        acc = evaluate_classifier(clf, "test")
        save_classifier(clf, Path(args.run_dir) / "classifier", extra={"heldout_accuracy": acc})
        print(f"classifier: held-out accuracy {acc:.4f} -> {Path(args.run_dir) / 'classifier'}")
    summary = train_base(cfg, args.run_dir, resume=args.resume, progress=not args.no_progress, device=args.device)
    loss = ("no step left to train" if summary["first_loss"] is None
            else f"loss {summary['first_loss']:.4f} -> {summary['final_loss']:.4f}")
    print(f"trained {summary['steps']} steps in {summary['train_seconds']:.0f} s; {loss}; "
          f"pipeline: {summary['pipeline']}")
    ev = summary.get("eval")
    if ev:
        per = " ".join(f"{d}:{a:.2f}" for d, a in enumerate(ev["per_digit"]))
        print(f"sample quality ({ev['images']} images, {ev['steps']} DDIM steps, eta {ev['eta']}, CFG "
              f"{ev['guidance_scale']}): classifier accuracy {ev['accuracy']:.3f} [{per}]")
    return 0
