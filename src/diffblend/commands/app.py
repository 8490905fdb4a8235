"""``diffblend app``: a local web page with live preference sliders (gradio)."""

from __future__ import annotations

import argparse


def add_parser(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "app", help="web page with live preference sliders (needs the 'app' extra: gradio)",
        description="Serve a web page to blend adapters live: one slider per adapter weight, lambda, method, "
                    "prompt, seed; the images and their rewards update as you move them. By default the embedded "
                    "digits model and its shipped adapters on the CPU; --model DIR --adapter NAME=PATH for a "
                    "diffusers model (e.g. on --device cuda). Serves until stopped (Ctrl-C).")
    p.add_argument("--host", default="127.0.0.1",
                   help="interface to bind (default 127.0.0.1: this machine only). 0.0.0.0 makes the page "
                        "reachable from the network, with no authentication: only on a network you trust")
    p.add_argument("--port", type=int, default=None, help="port (default: gradio's, 7860, or the next free one)")
    p.add_argument("--model", default=None, help="a diffusers pipeline folder or hub id (default: embedded digits)")
    p.add_argument("--adapter", action="append", default=[], metavar="NAME=PATH",
                   help="load a LoRA adapter (repeatable); added to the shipped ones for the default model")
    p.add_argument("--reward", action="append", default=None, metavar="NAME",
                   help="a registered reward to show beside the images (repeatable; default: every registered one "
                        "for the default model, the ones named after the adapters otherwise)")
    p.add_argument("--records", default=None, metavar="FILE",
                   help="a sweep's records JSONL: adds the methods' Pareto fronts; choosing a point regenerates it")
    p.add_argument("--device", default="cpu", help="torch device (default cpu)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    p.add_argument("--mode", choices=("auto", "batched", "sequential"), default="auto",
                   help="how MPA runs the adapters (default auto)")
    p.add_argument("--replace-shipped", action="store_true",
                   help="let --adapter NAME=PATH replace a shipped adapter of the same name (refused otherwise)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ._util import check_device, set_threads
    from .generate import merge_adapters, parse_adapters

    set_threads(args.threads)
    check_device(args.device)
    if args.port is not None and not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    try:
        from ..app import ui
    except ImportError as exc:
        raise ValueError(f"diffblend app needs gradio: pip install 'diffblend[app]' ({exc})") from None
    from ..app import make_session
    from ..generation import shipped_adapters

    extra = parse_adapters(args.adapter)
    adapters = merge_adapters(shipped_adapters() if args.model is None else {}, extra, args.replace_shipped)
    session = make_session(args.model, adapters, device=args.device, rewards=args.reward, records=args.records,
                           mode=args.mode)
    print(f"diffblend app: adapters {', '.join(session.adapter_names)}; rewards {', '.join(session.rewards)}")
    ui.launch(session, host=args.host, port=args.port, block=True)
    return 0
