"""``diffblend toy``: DB-MPA, DB-MPA-LS and DB-KLA on an exact 2-D Gaussian-mixture diffusion.

Thin: parses options, calls :mod:`diffblend.toybench`, prints its table, writes JSON + PNG.
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    p = subparsers.add_parser(
        "toy",
        help="the exact analytic benchmark: blends vs closed-form targets, Jensen gap (CPU, < 1 min)",
        description="Sample DB-MPA, DB-MPA-LS (eta = 1) and DB-KLA from exact reward-aligned Gaussian-mixture "
                    "models over a grid of w and lambda in [0, 2]; compare with the exact target of each setting "
                    "(expected rewards, energy distance vs its Monte-Carlo floor), LS vs MPA, and the Jensen gap "
                    "of Lemma 1 as a function of t. Writes toy.json and toy.png.",
    )
    p.add_argument("--output-dir", default="toy_out", help="folder for toy.json and toy.png (default: toy_out)")
    p.add_argument("--seed", type=int, default=0, help="seed of all noise (default: 0)")
    p.add_argument("--num-samples", type=int, default=None, help="samples per setting (default: 4000; quick: 500)")
    p.add_argument("--steps", type=int, default=None, help="DDIM steps over 1000 timesteps (default: 200; quick: 50)")
    p.add_argument("--alpha", type=float, default=1.0, help="KL weight of the per-reward aligned models (default: 1)")
    p.add_argument("--quick", action="store_true", help="a small grid and fewer samples (a few seconds)")
    p.add_argument("--beyond", action="store_true",
                   help="also measure what goes beyond the paper (stratified LS draws, SMC / Langevin correctors of "
                        "the Jensen gap vs NFE, weight schedules w(t)); writes beyond.json and beyond.png "
                        "(about 4 min at defaults, seconds with --quick)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads (default: 1; the tensors are tiny, more threads only add overhead)")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..toybench import ToyConfig, format_table, run_toybench, write_outputs
    from ._util import set_threads

    set_threads(args.threads)
    kwargs = dict(seed=args.seed, alpha=args.alpha)
    if args.quick:
        kwargs.update(num_samples=500, steps=50, w_grid=(0.0, 0.5, 1.0), lambda_grid=(0.0, 1.0, 2.0),
                      floor_repeats=3, jensen_timesteps=(0, 50, 200, 400, 999))
    if args.num_samples is not None:
        kwargs["num_samples"] = args.num_samples
    if args.steps is not None:
        kwargs["steps"] = args.steps
    result = run_toybench(ToyConfig(**kwargs), progress=not args.no_progress)
    paths = write_outputs(result, args.output_dir)
    print(format_table(result))
    print(f"wrote {paths['json']} and {paths['png']}")
    if args.beyond:
        _run_beyond(args)
    return 0


def _run_beyond(args: argparse.Namespace) -> None:
    from ..toybeyond import BeyondConfig, format_beyond, run_beyond, write_beyond

    kwargs = dict(seed=args.seed)
    if args.quick:
        kwargs.update(num_samples=500, ls_repeats=1, steps=30, alphas=(0.25, 1.0), ws=(0.5,), particles=(4,),
                      exact_particles=0, ls_steps=(5, 10))
    if args.num_samples is not None:
        kwargs["num_samples"] = args.num_samples
    result = run_beyond(BeyondConfig(**kwargs))
    paths = write_beyond(result, args.output_dir)
    print()
    print(format_beyond(result))
    print(f"wrote {paths['json']} and {paths['png']}")
