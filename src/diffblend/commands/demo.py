"""``diffblend demo``: a grid from pure r1 to pure r2 for DB-MPA and DB-MPA-LS, with mean rewards."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "demo", help="sweep w from one reward adapter to another (MPA and LS) on the embedded model",
        description="Generate the same images with w going from pure r1 to pure r2, for DB-MPA and DB-MPA-LS, "
                    "print the mean rewards of each column and write a PNG grid. About a minute on a CPU.")
    p.add_argument("--model", default=None,
                   help="an embedded model by name (default: the default one; see diffblend generate --help)")
    p.add_argument("--pair", default=None,
                   help="two adapters R1,R2 (default: the embedded model's demo pair when shipped)")
    p.add_argument("--columns", type=int, default=5, help="number of w values from 0 to 1 (default 5)")
    p.add_argument("--methods", default="mpa,ls", help="comma-separated methods among mpa, ls, soup (default mpa,ls)")
    p.add_argument("--num-images", type=int, default=10,
                   help="images per column: the model's default prompts in turn (default 10)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=None, help="CFG scale (default: the model's, 2 or 3)")
    p.add_argument("--kl-strength", type=float, default=1.0, help="lambda (default 1)")
    p.add_argument("--seed", type=int, default=0, help="noise seed (the same for every column)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="add a LoRA adapter of the default model (repeatable)")
    p.add_argument("--replace-shipped", action="store_true",
                   help="let --adapter NAME=PATH replace a shipped adapter of the same name (refused otherwise)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these tiny models gain little from more, and on a busy "
                        "machine extra threads spin against other jobs, measured 20x slower)")
    p.add_argument("-o", "--output", default="diffblend_demo.png", help="output figure; the extension picks the format: .png (default diffblend_demo.png), .jpg, .pdf, .svg")
    p.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ._util import set_threads

    set_threads(args.threads)
    from ..core.blend import METHODS
    from ..zoo.demo import blend_sweep, demo_figure, format_table, reward_names_for
    from ..generation import load_blend_pipeline, resolve_weight_names, shipped_adapters
    from ._util import check_device
    from ..checks import check_count, check_guidance_scale, check_output_file, check_seed
    from ..zoo.demo import figure_format
    from .generate import merge_adapters, parse_adapters

    check_device(args.device)
    check_count(args.columns, "--columns", 2)
    check_count(args.steps, "--steps")
    check_count(args.num_images, "--num-images")
    check_seed(args.seed, args.num_images, "--seed")
    embedded = _embedded(args.model)
    guidance = embedded.guidance_scale if args.guidance_scale is None else args.guidance_scale
    check_guidance_scale(guidance, "--guidance-scale")
    figure_format(args.output, "-o")
    check_output_file(args.output, "-o")
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    bad = [m for m in methods if m not in METHODS]
    if not methods or bad:
        raise ValueError(f"--methods must list some of {', '.join(METHODS)}; got {args.methods!r}")
    adapters = merge_adapters(shipped_adapters(model=embedded.name), parse_adapters(args.adapter), args.replace_shipped)
    bp = load_blend_pipeline(embedded.name, adapters, device=args.device)
    names = bp.adapter_names
    if args.pair is None:
        default = embedded.demo_pair or ()
        pair = tuple(default) if default and all(n in names for n in default) else tuple(names[:2])
    else:
        pair = tuple(p.strip() for p in args.pair.split(","))
        if len(pair) != 2:
            raise ValueError(f"--pair must name two adapters R1,R2, got {args.pair!r}")
        pair = tuple(resolve_weight_names({p: 0.5}, names, arg="--pair") for p in pair)
        pair = tuple(next(iter(d)) for d in pair)
    if len(pair) != 2:
        raise ValueError(f"the demo needs two adapters, but {len(names)} are loaded ({', '.join(names) or 'none'}); "
                         f"pass --adapter NAME=PATH")
    ws = [k / (args.columns - 1) for k in range(args.columns)]
    prompts = [embedded.prompts[j % len(embedded.prompts)] for j in range(args.num_images)]
    res = blend_sweep(bp, pair, prompts, ws, methods, reward_names_for(pair, embedded.report_rewards), seed=args.seed,
                      num_inference_steps=args.steps, guidance_scale=guidance,
                      kl_strength=args.kl_strength, progress=not args.no_progress)
    print(format_table(res))
    out = demo_figure(res, args.output)
    print(f"wrote {out} ({len(methods)} methods x {len(ws)} columns x {len(prompts)} images, {res.seconds:.0f} s)")
    return 0


def _embedded(model: str | None):  # noqa: ANN202
    """The embedded model the demo runs (``--model NAME``; None: the default), or a ValueError naming them."""
    from ..registry import default_model, embedded_models

    try:
        return default_model(model)
    except LookupError:
        raise ValueError(f"--model must name an embedded model, one of {', '.join(embedded_models())}; got "
                         f"{model!r} (a pipeline folder: use diffblend generate --model DIR)") from None

