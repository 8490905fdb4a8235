"""Evaluate fine-tuned adapters against their base: every reward, legibility and the KL to the base.

Each adapter and the base generate the same images' noise (per-sample seeds: paired comparisons);
the path KL is estimated along the adapter's own trajectories as sum_t KL(p_adapter(.|x_t) ||
p_base(.|x_t)), in nats per image, which bounds KL(p_adapter(x0) || p_base(x0)) from above.

    python -m diffblend.train.evaluate [--model colour] --adapter NAME=FILE ... [--per-prompt 16] [--calibration FILE]
        [--no-kl] [-o evaluation.json]
"""

from __future__ import annotations

import argparse
import json
import math
import os
import time
from collections.abc import Mapping, Sequence

import torch

from .config import DIGIT_PROMPTS
from .dpok import evaluate_transition, rollout, transition_kl
from .lora import add_lora, base_model, load_lora_file, set_lora_state_dict
from .policy import DiffusionPolicy, unet_denoiser
from .trainer import sample_generators
from ..core.sampling import map_cond
from .._io import atomic_write_text

__all__ = ["evaluate_adapters", "main"]


@torch.no_grad()
def _evaluate(policy: DiffusionPolicy, rewards: Mapping[str, object], prompts: Sequence[str], seed: int,
              num_steps: int, guidance_scale: float, with_kl: bool) -> dict:
    den = unet_denoiser(policy.unet)
    uncond = map_cond(policy.uncond(), lambda v: v.to(policy.device)) if guidance_scale != 1.0 else None
    kw = dict(eta=1.0, guidance_scale=guidance_scale, uncond=uncond)
    ro = rollout(den, policy, prompts, sample_generators(seed, 0, 0, len(prompts)), num_steps=num_steps, **kw)
    out: dict[str, float] = {}
    for name, fn in rewards.items():
        scores, info = fn(ro.images, list(prompts), None)
        out[name] = float(torch.as_tensor(scores).float().mean())
        if name == "legibility" and "correct" in info:
            out["accuracy"] = float(torch.as_tensor(info["correct"]).float().mean())
    if with_kl:
        ts, N, kl = ro.timesteps, ro.timesteps.shape[0], torch.zeros(len(prompts))
        for i in range(N):
            prev = ts[i + 1] if i + 1 < N else torch.tensor(-1)
            cur, _ = evaluate_transition(den, policy, ro.latents[i], ts[i], prev, ro.latents[i + 1], ro.cond, **kw)
            with base_model(policy.unet):
                pre, _ = evaluate_transition(den, policy, ro.latents[i], ts[i], prev, ro.latents[i + 1], ro.cond,
                                             **kw)
            kl += transition_kl(cur.mean, pre.mean, cur.std).cpu()
        out["kl_path"] = float(kl.mean())
    return out


def evaluate_adapters(policy: DiffusionPolicy, adapters: Mapping[str, str | os.PathLike],
                      rewards: Sequence[str] = ("jpeg_compressibility", "legibility", "boldness"), *,
                      prompts: Sequence[str] = DIGIT_PROMPTS, per_prompt: int = 16, seed: int = 1234,
                      num_steps: int = 20, guidance_scale: float = 2.0,
                      kl: bool = True) -> dict[str, dict[str, float]]:
    """Mean rewards (and legibility accuracy, path KL) of the base and of each adapter.

    Args:
        policy: the base model; it gets a LoRA adapter whose weights are swapped per file.
        adapters: ``{name: file}`` of diffusers LoRA files trained on this base.
        rewards: registry names to score with.
        per_prompt: images per prompt (the same seeds for every model).
        kl: estimate each adapter's path KL (two network passes per step of its images: most of the time).

    Returns:
        ``{"base": {...}, name: {...}}`` with one mean per reward, ``accuracy`` (share of images the
        classifier reads as the prompted digit) and, for adapters when ``kl``, ``kl_path`` (nats per image).
    """
    from diffblend.rewards import get_reward

    fns = {r: get_reward(r, device=policy.device) for r in rewards}
    batch = [p for p in prompts for _ in range(per_prompt)]
    files = {n: load_lora_file(p) for n, p in adapters.items()}
    ranks = {int(meta.get("r", 4)) for _, meta in files.values()}
    if len(ranks) > 1:
        raise ValueError(f"adapters must share one rank to be swapped into one model, got ranks {sorted(ranks)}")
    rank = ranks.pop() if ranks else 4
    add_lora(policy.unet, rank)  # lora_alpha = r: scale 1; each file's own scale is folded into its B below
    results = {}
    with base_model(policy.unet):
        results["base"] = _evaluate(policy, fns, batch, seed, num_steps, guidance_scale, with_kl=False)
    for name, (state, meta) in files.items():
        set_lora_state_dict(policy.unet, _scaled_to_one(name, state, meta, rank))
        results[name] = _evaluate(policy, fns, batch, seed, num_steps, guidance_scale, with_kl=kl)
    return results


def _scaled_to_one(name: str, state: dict[str, torch.Tensor], meta: dict, rank: int) -> dict[str, torch.Tensor]:
    """The adapter's state with peft's scale (lora_alpha / r, or / sqrt(r) with rsLoRA) folded into B, so that it
    computes the same update in a LoRA layer of scale 1: delta W = scale * B A."""
    if meta.get("rank_pattern") or meta.get("alpha_pattern") or meta.get("use_dora"):
        raise ValueError(f"adapter {name!r}: per-module ranks / alphas and DoRA are not supported here")
    alpha = float(meta.get("lora_alpha", rank))
    scale = alpha / (math.sqrt(rank) if meta.get("use_rslora") else rank)
    return {k: v * scale if ".lora_B." in k else v for k, v in state.items()}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m diffblend.train.evaluate", description=__doc__.split("\n")[0])
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=FILE", help="an adapter (repeatable)")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder or an embedded model by name (default: "
                                                 "the default embedded model)")
    p.add_argument("--prompts", default="", metavar="A,B,...",
                   help="prompts (default: an embedded model's; a folder needs them)")
    p.add_argument("--rewards", default="", metavar="A,B,...",
                   help="rewards scored (default: an embedded model's demo pair and reported rewards)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="a reward calibration (diffblend calibrate): also print each change in base sd units")
    p.add_argument("--per-prompt", type=int, default=16, help="images per prompt (default 16)")
    p.add_argument("--seed", type=int, default=1234, help="noise seed of the evaluation images")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--guidance-scale", type=float, default=None, help="default: an embedded model's (else 2)")
    p.add_argument("--no-kl", action="store_true",
                   help="skip the path KL estimate (two more network passes per step of each adapter's images)")
    p.add_argument("-o", "--output", default=None, help="write the results as JSON here")
    args = p.parse_args(argv)
    from ..generation import embedded_model
    from .trainer import load_policy

    adapters = {}
    for item in args.adapter:
        name, sep, path = item.partition("=")
        if not sep or not name or not path:
            p.error(f"--adapter {item!r} is malformed; expected NAME=FILE")
        adapters[name] = path
    embedded = embedded_model(args.model)
    prompts = [x for x in args.prompts.split(",") if x.strip()] or list(embedded.prompts if embedded else [])
    if not prompts:
        p.error(f"--prompts: the model {args.model!r} has no default prompts; give them")
    rewards = [x for x in args.rewards.split(",") if x.strip()] or (
        list(dict.fromkeys([*(embedded.demo_pair or ()), *embedded.report_rewards])) if embedded else [])
    if not rewards:
        p.error("--rewards: give the rewards to score")
    guidance = args.guidance_scale if args.guidance_scale is not None else (
        embedded.guidance_scale if embedded else 2.0)
    t0 = time.perf_counter()
    res = evaluate_adapters(load_policy(args.model, "cpu"), adapters, rewards, prompts=prompts,
                            per_prompt=args.per_prompt, seed=args.seed, num_steps=args.steps, guidance_scale=guidance,
                            kl=not args.no_kl)
    cols = sorted({k for r in res.values() for k in r})
    print("model".ljust(28) + "".join(c.rjust(22) for c in cols))
    for name, r in res.items():
        print(name.ljust(28) + "".join((f"{r[c]:.4f}" if c in r else "-").rjust(22) for c in cols))
    if args.calibration:
        from ..rewards.calibration import load_calibration

        sd = {k: v["std"] for k, v in load_calibration(args.calibration).items()}
        print("change from the base in base sd units (" + args.calibration + "):")
        for name, r in res.items():
            if name != "base":
                print(name.ljust(28) + "".join(f"{k} {(r[k] - res['base'][k]) / sd[k]:+.2f}".rjust(30)
                                               for k in rewards if k in sd))
    print(f"({time.perf_counter() - t0:.0f} s)")
    if args.output:
        atomic_write_text(args.output, json.dumps({"settings": dict(vars(args), prompts=prompts, rewards=rewards,
                                                                    guidance_scale=guidance),
                                                   "results": res}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
