"""LS draws on the embedded default: how far each image of DB-MPA-LS (iid / stratified / golden) lands from the
DB-MPA image with the same noise, per reward (paired by prompt and seed).

    diffblend sweep --methods base,mpa,ls,ls_stratified,ls_golden,morl --weights 0.5 --seeds 20 --threads 1 \
        --no-progress -o runs/ls_draws/records.jsonl
    python benchmarks/ls_draws_default.py runs/ls_draws/records.jsonl
"""

from __future__ import annotations

import argparse
from collections import defaultdict

import numpy as np

from diffblend.evaluate.records import read_records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records")
    args = parser.parse_args()
    images: dict[str, dict] = defaultdict(dict)
    for rec in read_records(args.records):
        images[rec["method"]][(rec["prompt"], rec["seed"])] = rec["rewards"]
    keys = sorted(images["mpa"])
    rewards = sorted(images["mpa"][keys[0]])
    print(f"{len(keys)} paired images per method; per reward: mean, sd across images, and image - MPA image "
          f"(paired: mean, sd)")
    for method in [m for m in ("base", "mpa", "ls", "ls_stratified", "ls_golden", "morl") if m in images]:
        cells = []
        for r in rewards:
            x = np.array([images[method][k][r] for k in keys])
            d = x - np.array([images["mpa"][k][r] for k in keys])
            cells.append(f"{r} {x.mean():+.4f} sd {x.std(ddof=1):.4f} | -MPA {d.mean():+.4f} sd {d.std(ddof=1):.4f}")
        print(f"{method:14s} " + " || ".join(cells))


if __name__ == "__main__":
    main()
