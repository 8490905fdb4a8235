"""Measure every reward on samples of the default model (or a blend), and which pairs conflict.

    python -m diffblend.zoo.measure [--per-digit 50] [--seed 0] [--adapter NAME=PATH --weights NAME=1]

prints the mean (and std) of each registered reward and, for each pair, the Pearson / Spearman
correlation across samples and the correlation within prompts (between per-digit-centred
rewards, what per-prompt advantage normalisation in RL sees). Negative = the pair conflicts.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .data import prompt_for

__all__ = ["sample_rewards", "main"]


def sample_rewards(bp: Any, per_digit: int = 50, seed: int = 0, weights: Mapping[str, float] | None = None,
                   rewards: Sequence[str] | None = None, steps: int = 20, guidance_scale: float = 2.0,
                   batch_size: int = 100, kl_strength: float = 1.0, method: str = "mpa") -> dict:
    """Generate ``per_digit`` images of each digit (template j mod 5) and score them.

    Args:
        bp: a ``BlendPipeline`` (``weights=None``: its base model).
    Returns:
        ``{"scores": {name: (N,) tensor}, "prompts": [...], "summary": {name: {"mean", "std"}},
        "correlations": [...]}`` (see :func:`diffblend.rewards.analysis.reward_correlations`).
    """
    from ..rewards import available_rewards
    from ..rewards.analysis import reward_correlations
    from .generate import generate, score_images

    names = list(rewards or available_rewards())
    prompts = [prompt_for(d, j) for d in range(10) for j in range(per_digit)]
    scores: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    for i in range(0, len(prompts), batch_size):
        chunk = prompts[i:i + batch_size]
        # seed + i: image i keeps its noise whatever the batch size
        x = generate(bp, chunk, weights, kl_strength=kl_strength, method=method, seed=seed * 1_000_003 + i,
                     num_inference_steps=steps, guidance_scale=guidance_scale)
        for n, s in score_images(x, chunk, names).items():
            scores[n].append(s)
    cat = {n: torch.cat(v) for n, v in scores.items()}
    groups = [str(d) for d in range(10) for _ in range(per_digit)]  # the prompted digit, templates pooled
    return {"scores": cat, "prompts": prompts,
            "summary": {n: {"mean": float(s.mean()), "std": float(s.std())} for n, s in cat.items()},
            "correlations": reward_correlations(cat, groups=groups)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    from ..weights import parse_weights
    from ..generation import parse_adapters
    from .generate import load_blend_pipeline, resolve_weight_names

    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--per-digit", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH")
    p.add_argument("--weights", default=None)
    p.add_argument("--kl-strength", type=float, default=1.0)
    p.add_argument("--guidance-scale", type=float, default=2.0)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--json", default=None, help="also write the summary and correlations to this JSON file")
    args = p.parse_args(argv)
    bp = load_blend_pipeline(None, parse_adapters(args.adapter) or None)
    w = resolve_weight_names(parse_weights(args.weights), bp.adapter_names) if args.weights else None
    torch.set_num_threads(1)  # tiny ops: more threads only spin on a shared machine
    res = sample_rewards(bp, args.per_digit, args.seed, w, kl_strength=args.kl_strength, steps=args.steps,
                         guidance_scale=args.guidance_scale)
    n = len(res["prompts"])
    print(f"{n} samples ({args.per_digit} per digit), weights {w}, lambda {args.kl_strength}, "
          f"CFG {args.guidance_scale}, {args.steps} DDIM steps (eta 1)")
    for name, s in res["summary"].items():
        print(f"  {name:<22} mean {s['mean']:.4f}  std {s['std']:.4f}")
    for r in res["correlations"]:
        print(f"  {r['a']} vs {r['b']}: pearson {r['pearson']:+.3f}  spearman {r['spearman']:+.3f}  "
              f"within-digit pearson {r['pearson_within']:+.3f}")
    if args.json:
        from .._io import atomic_write_json

        atomic_write_json(args.json, {k: res[k] for k in ("summary", "correlations")} | {"samples": n,
                          "per_digit": args.per_digit, "seed": args.seed, "weights": w})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
