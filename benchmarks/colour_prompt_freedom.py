"""How much room a prompt leaves a reward, on the colour model's own images.

    python benchmarks/colour_prompt_freedom.py                  # default prompts vs full held-out prompts
    python benchmarks/colour_prompt_freedom.py --per-prompt 8   # quicker

An RL adapter reweights what the base draws for a prompt; it cannot change the prompt. So a reward can be moved
without leaving the base's images only as far as it varies *within* a prompt. For each prompt set this draws
``--per-prompt`` images of each prompt from the shipped base (20 DDIM steps, eta 1, CFG 3, image i seeded
``seed * 100000 + i``), scores them and prints, per reward: its sd over all the images; the mean sd within a
prompt as a fraction of it; and the gain of keeping each prompt's best q of its images (mean of the top q minus
the prompt's mean, averaged over prompts, in units of the overall sd): what a perfect reweighting of the base
reaches (best-of-n selection). Then, for each aesthetic proxy paired with JPEG compressibility (rms_contrast, the
demo pair's, and colourfulness), the pair's Pearson r across images and within prompts
(``analysis.reward_correlations``: negative = in conflict), and the same gains for r(0.5) = (z_1 + z_2) / 2
standardised on these images.

The full prompts name all five attributes, so the prompt fixes both colours and the pattern; the default prompts
(shape and colour, some a size) leave the background to the model. Results: docs/colour_default.md.
"""

from __future__ import annotations

import argparse
import json

import numpy as np
import torch

from diffblend.evaluate.analysis import reward_correlations
from diffblend.rewards import get_reward
from diffblend.zoo.colour.data import DEFAULT_PROMPTS
from diffblend.zoo.colour.measure import generate_images, heldout_prompts

PAIRS = (("rms_contrast", "jpeg_compressibility"), ("colourfulness", "jpeg_compressibility"))
REWARDS = ("rms_contrast", "colourfulness", "jpeg_compressibility", "prompt_alignment")
FRACTIONS = (0.5, 0.25, 0.1)


def best_fraction_gain(scores: np.ndarray, q: float) -> float:
    """(prompts, n) scores -> mean over prompts of (mean of the top ceil(q n)) - (mean), in units of the overall sd."""
    k = max(1, int(np.ceil(q * scores.shape[1])))
    top = np.sort(scores, axis=1)[:, ::-1][:, :k].mean(1)
    return float((top - scores.mean(1)).mean() / scores.std())


def describe(scores: dict[str, np.ndarray], prompts: list[str]) -> dict:
    out = {}
    for name, s in scores.items():
        out[name] = {"mean": float(s.mean()), "sd": float(s.std()), "within_sd_ratio": float(s.std(1).mean() / s.std()),
                     "best_fraction_gain": {str(q): best_fraction_gain(s, q) for q in FRACTIONS}}
    n = scores[REWARDS[0]].shape[1]
    for pair in PAIRS:
        records = [{"method": "base", "weights": None, "lambda": None, "prompt": p, "seed": j,
                    "rewards": {k: float(scores[k][i, j]) for k in pair}} for i, p in enumerate(prompts) for j in range(n)]
        z = [(scores[k] - scores[k].mean()) / scores[k].std() for k in pair]
        rw = 0.5 * z[0] + 0.5 * z[1]
        out["/".join(pair)] = {"r": reward_correlations(records, *pair), "r(0.5)": {
            "sd": float(rw.std()), "best_fraction_gain": {str(q): best_fraction_gain(rw, q) for q in FRACTIONS}}}
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--per-prompt", type=int, default=20, help="images per prompt (default 20)")
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("-o", "--output", default=None, help="also write the numbers as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from diffblend.zoo import weights_dir
    from diffblend.zoo.generate import load_pipeline

    pipe = load_pipeline(str(weights_dir("colour_base")))
    fns = {k: get_reward(k, device="cpu") for k in REWARDS}
    results = {}
    for label, prompts in (("default prompts", list(DEFAULT_PROMPTS)), ("full held-out prompts", heldout_prompts(10))):
        batch = [p for p in prompts for _ in range(args.per_prompt)]
        images = generate_images(pipe, batch, seed=args.seed)
        scores = {k: torch.cat([fn(images[i:i + 50], batch[i:i + 50], None)[0] for i in range(0, len(batch), 50)])
                  .numpy().reshape(len(prompts), args.per_prompt) for k, fn in fns.items()}
        res = results[label] = describe(scores, prompts)
        print(f"\n{label} ({len(prompts)} x {args.per_prompt} images, CFG 3): {', '.join(prompts[:3])}, ...")
        print(f"  {'reward':22s} {'sd':>8s} {'within/sd':>9s}  best-fraction gain (sd) " + " ".join(f"q={q}" for q in FRACTIONS))
        for k in REWARDS:
            r = res[k]
            print(f"  {k:22s} {r['sd']:8.3f} {r['within_sd_ratio']:9.2f}  {' ' * 24}"
                  + " ".join(f"{v:5.2f}" for v in r["best_fraction_gain"].values()))
        for pair in PAIRS:
            r = res["/".join(pair)]
            print(f"  {' / '.join(pair)}: Pearson r across images {r['r']['across']:+.2f}, within prompts "
                  f"{r['r']['within']:+.2f}; r(0.5) best-fraction gain (sd) "
                  + " ".join(f"{v:5.2f}" for v in r["r(0.5)"]["best_fraction_gain"].values()))
    if args.output:
        from diffblend._io import atomic_write_json

        atomic_write_json(args.output, {"per_prompt": args.per_prompt, "seed": args.seed, "results": results})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
