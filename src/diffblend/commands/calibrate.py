"""``diffblend calibrate``: per-reward mean and std on the base model's own samples -> a calibration manifest.

With the manifest, ``get_reward(name, calibration=FILE)`` scores ``(r - mean) / std``, so preference weights
count every reward in units of one standard deviation of the base model's images (docs/rewards.md).
"""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "calibrate", help="standardise rewards against the base model's samples (a calibration manifest)",
        description="Generate N images per prompt with the base model (no adapter), score them with each reward and "
                    "write {reward: mean, std, n} to a manifest, to keep beside the adapters. Pass it as "
                    "calibration=FILE to get_reward, or --calibration FILE to diffblend generate.")
    p.add_argument("--rewards", required=True, help="comma-separated reward names, e.g. jpeg_compressibility,legibility")
    p.add_argument("--model", default=None,
                   help="a diffusers pipeline folder, or an embedded model by name (default: the default one)")
    p.add_argument("--prompts", default=None,
                   help="comma-separated prompts (default: the embedded model's default prompts)")
    p.add_argument("--num-images", type=int, default=16, help="images per prompt (default 16)")
    p.add_argument("--steps", type=int, default=20, help="sampler steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="CFG scale (default: the embedded model's, else the pipeline's own)")
    p.add_argument("--seed", type=int, default=0, help="image j uses noise seed SEED + j")
    p.add_argument("--batch-size", type=int, default=16, help="images per generation call (default 16)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("-o", "--output", default="calibration.json", help="manifest path (default calibration.json)")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    import torch

    from ..checks import check_count, check_guidance_scale, check_seed
    from ..rewards.calibration import calibrate_images, save_calibration
    from ..generation import embedded_model, generate, load_blend_pipeline
    from ._util import check_device

    check_device(args.device)
    embedded = embedded_model(args.model)
    rewards = [r.strip() for r in args.rewards.split(",") if r.strip()]
    if args.prompts is None and embedded is None:
        raise ValueError("--prompts: give the prompts to calibrate on (a pipeline folder has no default prompts)")
    prompts = list(embedded.prompts) if args.prompts is None else [p.strip() for p in args.prompts.split(",")
                                                                    if p.strip()]
    if not rewards or not prompts:
        raise ValueError("--rewards and --prompts must each name at least one item")
    if args.guidance_scale is None and embedded is not None:
        args.guidance_scale = embedded.guidance_scale
    check_count(args.num_images * len(prompts), "--num-images x prompts", 2)
    check_count(args.steps, "--steps")
    check_count(args.batch_size, "--batch-size")
    check_seed(args.seed, args.num_images * len(prompts), "--seed")
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    bp = load_blend_pipeline(args.model, {}, device=args.device)
    batch = [p for p in prompts for _ in range(args.num_images)]
    images = torch.cat([
        generate(bp, batch[i:i + args.batch_size], None, seed=args.seed + i, num_inference_steps=args.steps,
                 guidance_scale=args.guidance_scale) for i in range(0, len(batch), args.batch_size)])
    stats = calibrate_images(images, batch, rewards, device=args.device)
    out = save_calibration(args.output, stats, model=args.model or f"embedded {embedded.name} model")
    for name, st in stats.items():
        print(f"{name}: mean {st['mean']:.4g}, std {st['std']:.4g} over {st['n']} base images")
    print(f"wrote {out}")
    return 0
