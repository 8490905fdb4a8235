"""``diffblend generate``: images from a blend of adapters (the embedded default model or a diffusers model)."""

from __future__ import annotations

import argparse
import inspect

from ..generation import parse_adapters  # noqa: F401  (re-exported: demo and app import it from here)


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "generate", help="generate images with a blend of reward adapters",
        description="Generate images with Diffusion Blend. By default the default embedded model and its shipped "
                    "adapters; --model DIR (a diffusers pipeline folder or hub id) with --adapter NAME=PATH for "
                    "another model. --weights omitted: the base model.")
    _blend_options(p)
    _model_options(p)
    p.set_defaults(func=run)


def _blend_options(p: argparse.ArgumentParser) -> None:
    """What to generate: prompts, weights, method, seeds, sampler settings."""
    p.add_argument("--prompt", action="append", default=None,
                   help="a prompt (repeatable; default: the embedded model's first default prompt); the digits "
                        "model: '7', 'a digit 7', 'seven'...; the colour model: 'a small red triangle on a striped "
                        "blue background' or part of it")
    p.add_argument("--weights", default=None,
                   help="preference weights over adapters, NAME=W[,NAME=W...] summing to 1, e.g. "
                        "compressibility=0.3,legibility=0.7 (reward aliases accepted); omit for the base model")
    p.add_argument("--normalize", action="store_true", help="rescale --weights to sum to 1")
    p.add_argument("--kl-strength", type=float, default=1.0,
                   help="lambda >= 0: 1 = DB-MPA, < 1 closer to the base, > 1 extrapolates (mpa, soup; not ls)")
    p.add_argument("--method", choices=("mpa", "ls", "soup"), default="mpa",
                   help="mpa (weighted predictions), ls (one adapter per step, 1x cost), soup (Rewarded Soup)")
    p.add_argument("--ls-draws", choices=("iid", "stratified", "golden"), default="iid",
                   help="how --method ls draws each image's adapters over the steps: iid (the paper's), stratified "
                        "(counts within 1 of steps * w, random order) or golden (evenly spread); same per-step law")
    p.add_argument("--seed", type=int, default=0, help="image j uses noise seed SEED + j; LS draws use SEED")
    p.add_argument("--num-images", type=int, default=4, help="images per prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=None,
                   help="guidance scale (default: an embedded model's, 3 colour, 2 digits; else the pipeline's own, "
                        "7.5 SD 1.5, 3.5 Flux): "
                        "the CFG scale; for a guidance-distilled Flux (FLUX.1-dev) its guidance input, as "
                        "FluxPipeline's guidance_scale (refused for a Flux without one, e.g. FLUX.1-schnell, which "
                        "would ignore it)")
    p.add_argument("--height", type=int, default=None,
                   help="image height in pixels (default: the pipeline's; a multiple of its VAE factor, x2 for "
                        "Flux / SD3, e.g. 16 for Flux with an 8x VAE)")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (as --height)")
    p.add_argument("--eta", type=float, default=None,
                   help="DDIM eta in [0, 1] (default 1: the stochastic sampler; pipelines without eta, such as "
                        "SD3's flow matching, get none: their scheduler decides)")


def _model_options(p: argparse.ArgumentParser) -> None:
    """Which model and adapters, where the image goes, how it runs."""
    p.add_argument("--model", default=None,
                   help="a diffusers pipeline folder or hub id, or an embedded model by name (colour, digits); "
                        "default: the default embedded model")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load a LoRA adapter (repeatable); added to the shipped ones for the default model")
    p.add_argument("--replace-shipped", action="store_true",
                   help="let --adapter NAME=PATH replace a shipped adapter of the same name (refused otherwise)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="accept pickle adapter files (.bin, .ckpt, .pt, .pth): loading one can run code, use only "
                        "files you trust")
    p.add_argument("--oracles", action="store_true",
                   help="also load the shipped MORL oracle adapters (e.g. --weights morl_w0_5=1) for comparison")
    p.add_argument("--no-scores", action="store_true", help="do not print the rewards of the images")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="print the rewards standardised by a calibration manifest (diffblend calibrate): "
                        "(r - mean) / std of the base model's images")
    p.add_argument("--scale", type=int, default=4, help="pixel upscaling of the saved grid (default 4)")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch CPU threads (default 1: these tiny models gain little from more, and on a busy "
                        "machine extra threads spin against other jobs, measured 20x slower)")
    p.add_argument("--mode", choices=("auto", "batched", "sequential"), default="auto",
                   help="how MPA runs the adapters (default auto: batched on CUDA)")
    p.add_argument("-o", "--output", default="diffblend.png",
                   help="output image; the extension picks the format: .png (default diffblend.png), .jpg, .webp")


def merge_adapters(shipped: dict, extra: dict[str, str], replace: bool, flag: str = "--replace-shipped") -> dict:
    """``shipped`` plus the user's ``extra`` adapters; a user adapter may replace a shipped one only with ``replace``."""
    clash = sorted(set(shipped) & set(extra))
    if clash and not replace:
        raise ValueError(f"--adapter {clash[0]}=... would replace the shipped adapter {clash[0]!r}; choose another "
                         f"name, or pass {flag} to replace it")
    return {**shipped, **extra}


def check_args(args: argparse.Namespace) -> None:
    """Every flag checked before anything is loaded (one line naming the flag on a bad value)."""
    from ..checks import check_count, check_guidance_scale, check_output_file, check_seed
    from ..generation import image_format
    from ._util import check_device

    check_device(args.device)
    check_count(args.num_images, "--num-images")
    check_count(args.steps, "--steps")
    check_seed(args.seed, args.num_images * len(args.prompt or ["7"]), "--seed")
    if args.guidance_scale is not None:
        check_guidance_scale(args.guidance_scale, "--guidance-scale")
    for flag, value in (("--height", args.height), ("--width", args.width)):
        if value is not None and value < 1:
            raise ValueError(f"{flag} must be a positive number of pixels, got {value}")
    image_format(args.output, "-o")
    check_output_file(args.output, "-o")
    if args.eta is not None and not 0.0 <= args.eta <= 1.0:  # DDIM's variance is defined for eta in [0, 1]; beyond, NaN images
        raise ValueError(f"--eta must be in [0, 1], got {args.eta}")
    if args.scale < 1:
        raise ValueError(f"--scale must be >= 1, got {args.scale}")
    if args.ls_draws != "iid" and args.method != "ls":
        raise ValueError(f"--ls-draws {args.ls_draws} applies to --method ls, got --method {args.method}")
    if args.weights is None and (args.kl_strength != 1.0 or args.method != "mpa"):
        raise ValueError("--kl-strength and --method blend adapters: give --weights too (without it, the base model)")


def check_pipeline_args(pipe, args: argparse.Namespace) -> None:
    """The flags that depend on the loaded pipeline: --height / --width multiples of its latent grid, and
    --guidance-scale on a Flux that has no guidance input (FluxPipeline would ignore it)."""
    from ..generation import check_image_size

    try:
        check_image_size(pipe, args.height, args.width)
    except ValueError as exc:
        raise ValueError(f"--{exc}") from None  # the message starts with the argument's name
    transformer = getattr(pipe, "transformer", None)
    if args.guidance_scale is not None and "Flux" in type(pipe).__name__ and transformer is not None \
            and not getattr(transformer.config, "guidance_embeds", False):
        raise ValueError(f"--guidance-scale: this Flux transformer has no guidance input (guidance_embeds=False, "
                         f"e.g. FLUX.1-schnell), so {type(pipe).__name__} would ignore it; leave it out")


def print_rewards(images, batch: list[str], calibration: str | None, names: list[str] | None = None) -> None:
    """The mean of each reward of ``names`` (default: every option-free reward) over the images (standardised
    with a calibration manifest)."""
    from ..generation import score_images
    from ..rewards import available_rewards

    names = available_rewards() if names is None else names
    if calibration:  # the rewards the manifest standardises
        from ..rewards.calibration import load_calibration

        names = [n for n in names if n in load_calibration(calibration)]
    parts = []
    for name in names:
        try:
            score = score_images(images, batch, [name], calibration=calibration)[name]
            parts.append(f"{name} {float(score.mean()):.4f}")
        except ValueError:  # e.g. legibility of a prompt that names no digit
            parts.append(f"{name} n/a")
    print(("mean calibrated rewards (base-model sd units): " if calibration else "mean rewards: ") + ", ".join(parts))


def run(args: argparse.Namespace) -> int:
    from ._util import set_threads

    set_threads(args.threads)
    from ..generation import embedded_model, generate, image_grid, load_blend_pipeline, reward_names_for, \
        resolve_weight_names, save_png, shipped_adapters
    from ._util import parse_weights

    check_args(args)
    embedded = embedded_model(args.model)
    prompts = args.prompt or (list(embedded.prompts[:1]) if embedded and embedded.prompts else ["7"])
    if args.guidance_scale is None and embedded is not None:
        args.guidance_scale = embedded.guidance_scale
    extra = parse_adapters(args.adapter)
    weights = parse_weights(args.weights) if args.weights is not None else None
    shipped = shipped_adapters(include_oracles=args.oracles, model=args.model) if embedded else {}
    adapters = merge_adapters(shipped, extra, args.replace_shipped)
    bp = load_blend_pipeline(args.model, adapters, device=args.device, mode=args.mode, allow_pickle=args.allow_pickle)
    if args.eta is None:  # DDIM pipelines: 1 (stochastic); flow-matching ones take no eta
        args.eta = 1.0 if "eta" in inspect.signature(type(bp.pipe).__call__).parameters else None
    check_pipeline_args(bp.pipe, args)
    bp.pipe.set_progress_bar_config(disable=False, desc="generate", leave=False)
    if weights is not None:
        weights = resolve_weight_names(weights, bp.adapter_names)
    batch = [p for p in prompts for _ in range(args.num_images)]
    images = generate(bp, batch, weights, kl_strength=args.kl_strength, method=args.method, seed=args.seed,
                      num_inference_steps=args.steps, guidance_scale=args.guidance_scale, eta=args.eta,
                      normalize=args.normalize, ls_draws=args.ls_draws, height=args.height, width=args.width)
    out = save_png(image_grid(images, ncols=args.num_images, scale=args.scale), args.output)
    what = "base model" if weights is None else f"{args.method} w={weights} lambda={args.kl_strength}"
    print(f"wrote {out} ({len(prompts)} prompt(s) x {args.num_images} images, {what})")
    if not args.no_scores and embedded is not None:
        names = None if embedded.name == "digits" else reward_names_for(bp.adapter_names, embedded.report_rewards)
        print_rewards(images, batch, args.calibration, names)
    return 0
