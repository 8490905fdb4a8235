"""``diffblend sweep``: methods x weight grid (x lambda grid) over prompts and paired seeds -> JSONL records."""

from __future__ import annotations

import argparse

from ._options import Opt, add_config_options

METHOD_HELP = "base, mpa, ls, ls_stratified, ls_golden, soup, kla, rgg, rgg_tuned (with --rgg-tuned-kl), code, morl"


def _floats(text: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"expected comma-separated numbers, got {text!r}") from None


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "sweep", help="run methods over a grid of weights (and lambdas) and record every image's rewards",
        description="Generate every (prompt, seed) with every setting (method x w, x lambda for kla), score "
                    "each image with every reward and append one JSONL record per image. Every setting uses "
                    "the same noise for a given (prompt, seed). Rerunning resumes; `accelerate launch -m "
                    "diffblend.cli sweep ...` splits the settings across processes.")
    p.add_argument("-o", "--output", default="sweep/records.jsonl", help="records file (default: sweep/records.jsonl)")
    p.add_argument("--model", default="default",
                   help="'default' (the embedded digits model + shipped adapters), 'toy' (the analytic toy), "
                        "or a diffusers pipeline folder (with --adapter)")
    p.add_argument("--adapter", action="append", default=[], metavar="REWARD=PATH",
                   help="per-reward LoRA adapter for a --model folder (repeat); named after its reward")
    p.add_argument("--oracle", action="append", default=[], metavar="R1=W1,R2=W2:PATH",
                   help="MORL oracle adapter for w (repeat)")
    p.add_argument("--rewards", default="",
                   help="the pair of rewards of --weights, comma-separated (default model: the pair of its MORL oracles; "
                        "toy: right,up)")
    p.add_argument("--score", default="", help="rewards to score every image with (default: all registered / the toy's)")
    p.add_argument("--calibration", default=None, metavar="FILE",
                   help="score with every reward standardised by a calibration manifest (diffblend calibrate): "
                        "(r - mean) / std of the base model's images; stored with the records' settings")
    p.add_argument("--methods", default="base,mpa,ls,soup,rgg,code,morl", help=f"comma-separated among {METHOD_HELP}")
    p.add_argument("--weights", default="0,0.25,0.5,0.75,1",
                   help="w of the second reward of the pair (the first gets 1 - w)")
    p.add_argument("--weight-grid", default="", metavar="R=W,...;R=W,...",
                   help="explicit weight vectors separated by ';' (any number of rewards); overrides --weights")
    p.add_argument("--lambdas", default="0,0.5,1,1.5,2", help="lambda grid of kla")
    p.add_argument("--kla-weights", default="", metavar="R=W,...;...", help="weights of kla (default: the weight grid)")
    p.add_argument("--prompts", default="0,1,2,3,4,5,6,7,8,9", help="comma-separated prompts")
    p.add_argument("--seeds", type=int, default=4, help="seeds 0..N-1 per prompt (default 4)")
    p.add_argument("--steps", type=int, default=20, help="DDIM steps (default 20)")
    p.add_argument("--guidance-scale", type=float, default=2.0, help="CFG scale (default 2)")
    p.add_argument("--noise-level", type=float, default=None, metavar="A",
                   help="flow-matching models (SD3, Flux): the flow SDE's noise level a >= 0 at eta 1 (the sampler's "
                        "stochasticity is a * eta; 0: the ODE, where ls is a heuristic); default: the backend's "
                        "(0.7, Flow-GRPO's). Refused for DDIM models (the toy, the digits model, SD 1.5, SDXL)")
    p.add_argument("--batch-size", type=int, default=8, help="images per generation call (default 8)")
    p.add_argument("--rgg-non-differentiable", choices=["skip", "error"], default="skip",
                   help="RGG with a reward without gradient: guide with the other terms, or refuse")
    p.add_argument("--save-images", action="store_true", help="save every image as PNG next to the records")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=0, help="torch intra-op threads per process (0: torch's default)")
    p.add_argument("--no-progress", action="store_true")
    p.set_defaults(func=run, config_options=_method_options(p))
    return p


def _method_options(p: argparse.ArgumentParser) -> tuple:
    """The options of MethodOptions, CoDeConfig (--code-*) and RGGConfig (--rgg-*), from their fields.
    The methods' own eta is MethodOptions.eta (--eta), so CoDeConfig's and RGGConfig's are not options."""
    from ..baselines.code import CoDeConfig
    from ..baselines.rgg import RGGConfig
    from ..evaluate.methods import MethodOptions

    every = add_config_options(p.add_argument_group("every method (MethodOptions)"), MethodOptions,
                               skip=("rgg", "rgg_tuned", "code"))
    code = add_config_options(p.add_argument_group("code: controlled decoding (CoDeConfig)"), CoDeConfig,
                              skip=("eta",), opts={"num_candidates": Opt(flag="--code-candidates"),
                                                   "block_size": Opt(flag="--code-block")})
    rgg = add_config_options(
        p.add_argument_group("rgg: reward-gradient guidance (RGGConfig)"), RGGConfig, skip=("eta",),
        opts={"kl_coeff": Opt(flag="--rgg-kl"), "grad_norm": Opt(flag="--rgg-norm"),
              "tempering_gamma": Opt(flag="--rgg-gamma", help="tempering gamma: s_i = min((1+gamma)^i - 1, 1); "
                                                               "0 or none: s_i = 1")})
    p.add_argument("--rgg-tuned-kl", type=float, default=None, metavar="ALPHA",
                   help="kl_coeff of method rgg_tuned (RGG with another scale, the rest as --rgg-*); needed to run it")
    return every, code, rgg


def method_options(args: argparse.Namespace):
    """The MethodOptions of the parsed options."""
    from ..baselines.code import CoDeConfig
    from ..baselines.rgg import RGGConfig
    from ..evaluate.methods import MethodOptions

    every, code, rgg = args.config_options
    r = rgg.values(args)
    r["tempering_gamma"] = r["tempering_gamma"] or None  # 0 = no tempering, as --rgg-gamma always took it
    tuned = None if args.rgg_tuned_kl is None else RGGConfig(**{**r, "kl_coeff": args.rgg_tuned_kl})
    return MethodOptions(**every.values(args), code=CoDeConfig(**code.values(args)), rgg=RGGConfig(**r),
                         rgg_tuned=tuned)


def _weight_vectors(text: str) -> list[dict[str, float]]:
    from ._util import parse_weights

    return [parse_weights(part) for part in text.split(";") if part.strip()]


def build_backend(args: argparse.Namespace):
    """The backend named by --model."""
    from pathlib import Path

    score = [s for s in args.score.split(",") if s.strip()]
    if args.noise_level is not None and args.model in ("toy", "default"):
        raise ValueError(f"--noise-level is the flow SDE's (SD3, Flux); --model {args.model} is sampled with DDIM: "
                         f"set its stochasticity with --eta")
    if args.model == "toy":
        from ..evaluate.backends import ToyBackend

        return ToyBackend.default(num_steps=args.steps)
    if args.model == "default":
        from ..evaluate.pipelines import default_backend

        return default_backend(score or None, num_steps=args.steps, guidance_scale=args.guidance_scale,
                               non_differentiable=args.rgg_non_differentiable, device=args.device,
                               calibration=args.calibration)
    from ..evaluate.pipelines import DiffusersBackend
    from ..generation import load_pipeline, parse_adapters

    adapters = {name: Path(path) for name, path in parse_adapters(args.adapter).items()}
    oracles = []
    for item in args.oracle:
        spec, sep, path = item.rpartition(":")
        if not sep or not spec:
            raise ValueError(f"--oracle {item!r} is malformed; expected R1=W1,R2=W2:PATH")
        oracles.append((_weight_vectors(spec)[0], Path(path)))
    pipe = load_pipeline(args.model, device=args.device)
    noise = {} if args.noise_level is None else {"noise_level": args.noise_level}
    backend = DiffusersBackend(pipe, adapters, score or list(adapters), oracles=oracles, num_steps=args.steps,
                               guidance_scale=args.guidance_scale, non_differentiable=args.rgg_non_differentiable,
                               device=args.device, calibration=args.calibration, **noise)
    if noise and not backend.model.is_flow:
        raise ValueError(f"--noise-level is the flow SDE's (SD3, Flux); {args.model!r} is a {backend.model.family} "
                         f"model, sampled with DDIM: set its stochasticity with --eta")
    return backend


# The options that change what an image is, besides its setting (method, w, lambda), prompt and seed.
RUN_SETTINGS = ("model", "adapter", "oracle", "score", "calibration", "steps", "guidance_scale", "eta", "code_candidates",
                "code_block", "rgg_kl", "rgg_gamma", "rgg_norm", "rgg_non_differentiable")
# Settings added later, recorded only when set (a records file written before them stays resumable at their
# default): {option: its default}.
LATER_SETTINGS = {"noise_level": None, "blend_seed": 0, "rgg_tuned_kl": None}


def run_settings(args: argparse.Namespace) -> dict:
    """The settings stored with every record (a rerun with other values is refused, see check_run_settings)."""
    out = {name: getattr(args, name) for name in RUN_SETTINGS}
    out.update({k: getattr(args, k) for k, default in LATER_SETTINGS.items() if getattr(args, k) != default})
    return out


def run(args: argparse.Namespace) -> int:
    from accelerate import PartialState

    from ..evaluate.sweep import build_settings, merge_shards, pair_grid, run_sweep
    from ._util import check_device

    from ..checks import check_guidance_scale

    check_device(args.device)
    check_guidance_scale(args.guidance_scale, "--guidance-scale")
    if args.threads != 0:  # 0: leave torch's default
        from ._util import set_threads

        set_threads(args.threads)
    methods = [m.strip() for m in args.methods.split(",") if m.strip()]
    if args.weight_grid:
        grid = _weight_vectors(args.weight_grid)
    else:
        names = [r.strip() for r in args.rewards.split(",") if r.strip()]
        if not names and args.model == "default":  # the pair the shipped MORL oracles were trained on
            from ..evaluate.pipelines import shipped_adapter_roles

            names = sorted({k for w, _ in shipped_adapter_roles()[1] for k in w})
        elif not names and args.model == "toy":
            names = ["right", "up"]  # the conflicting pair of ToyBackend.default
        if len(names) != 2:
            raise ValueError("--rewards must name the pair of rewards of --weights (e.g. "
                             "jpeg_compressibility,legibility), or give --weight-grid")
        grid = pair_grid(names, _floats(args.weights))
    kla_w = _weight_vectors(args.kla_weights) if args.kla_weights else None
    settings = build_settings(methods, grid, _floats(args.lambdas) if "kla" in methods else (), kla_w)
    options = method_options(args)
    prompts = [p.strip() for p in args.prompts.split(",") if p.strip()]
    # cpu=True lets torchrun / accelerate launch start several CPU processes (gloo) when there is no GPU.
    state = PartialState(cpu=args.device == "cpu")
    backend = build_backend(args)
    from pathlib import Path

    out = Path(args.output)
    stats = run_sweep(backend, settings, prompts, list(range(args.seeds)), out, options=options,
                      batch_size=args.batch_size, images_dir=out.parent / "images" if args.save_images else None,
                      process_index=state.process_index, num_processes=state.num_processes,
                      progress=not args.no_progress, run_settings=run_settings(args))
    state.wait_for_everyone()
    if state.is_main_process:
        n = merge_shards(out) if state.num_processes > 1 else None
        total = f", {n} records in all" if n is not None else ""
        print(f"sweep: {stats.generated} images generated, {stats.skipped} already recorded{total} -> {out}")
    return 0
