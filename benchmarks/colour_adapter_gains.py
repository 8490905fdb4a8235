"""Paired gains of colour-model adapters over the base, without the KL pass of ``diffblend.train.evaluate``.

    python benchmarks/colour_adapter_gains.py --per-prompt 20 src/diffblend/zoo/colour_adapters/morl_w0_25.safetensors ...

Draws ``--per-prompt`` images of each default prompt with the shipped base and with each adapter on the same noise
(20 DDIM steps, eta 1, CFG 3, image i seeded ``seed * 100000 + i``) and prints, per adapter, each reward's mean
change in units of the calibration's sd (the base's sd on its default prompts), and the gain in r(w) =
(1 - w) z_1 + w z_2 of the pair (``--pair``; default the colour model's demo pair, rms_contrast and
jpeg_compressibility) at w = 0.25, 0.5, 0.75 in units of the sd of r(w) over these base images; and, as a
check for reward hacking, how often the shipped attribute classifier reads the prompted colour (p > 0.5) and every
prompted attribute (argmax), on the base's images and on each adapter's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

REWARDS = ("rms_contrast", "colourfulness", "jpeg_compressibility", "prompt_alignment")
READ = ("colour read", "all read")  # shares of images the classifier reads as prompted (measure.read_rates)


def main(argv: list[str] | None = None) -> int:
    from diffblend.generation import load_pipeline
    from diffblend.rewards import get_reward
    from diffblend.zoo import weights_dir
    from diffblend.zoo.colour.data import DEFAULT_PROMPTS
    from diffblend.zoo.colour.measure import generate_images, read_rates
    from diffblend.zoo.plugin import colour_adapters_dir

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("adapters", nargs="+", help="LoRA files of the colour model")
    ap.add_argument("--per-prompt", type=int, default=20)
    ap.add_argument("--seed", type=int, default=5)
    ap.add_argument("--calibration", default=str(colour_adapters_dir() / "calibration.json"))
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pair", default=None, metavar="R1,R2", help="the pair of r(w) (default: the demo pair)")
    args = ap.parse_args(argv)
    from diffblend.registry import default_model

    pair = args.pair.split(",") if args.pair else list(default_model("colour").demo_pair)
    if len(pair) != 2 or not set(pair) <= set(REWARDS):
        ap.error(f"--pair must be two of {', '.join(REWARDS)}, got {args.pair!r}")
    torch.set_num_threads(args.threads)
    cal = json.loads(Path(args.calibration).read_text())["rewards"]
    batch = [p for p in DEFAULT_PROMPTS for _ in range(args.per_prompt)]
    fns = {k: get_reward(k) for k in REWARDS}

    def scores(adapter: str | None) -> dict[str, torch.Tensor]:
        pipe = load_pipeline(str(weights_dir("colour_base")))
        if adapter:
            pipe.load_lora_weights(adapter, adapter_name="a")
        images = generate_images(pipe, batch, seed=args.seed)
        out = {}
        for k in REWARDS:
            out[k], info = fns[k](images, batch, None)
            if k == "prompt_alignment":
                rates = read_rates(info)
                out["colour read"], out["all read"] = rates["colour"], rates["all"]
        return out

    def z(s: dict, k: str) -> torch.Tensor:
        return (s[k] - cal[k]["mean"]) / cal[k]["std"]

    base = scores(None)
    print(f"{len(batch)} paired images ({args.per_prompt} per default prompt, seed {args.seed}, CFG 3)")
    print("base", {k: round(base[k], 3) for k in READ}, flush=True)
    for f in args.adapters:
        s = scores(f)
        out = {k: round(float((s[k] - base[k]).mean() / cal[k]["std"]), 2) for k in REWARDS}
        out.update({k: round(s[k], 3) for k in READ})
        for w in (0.25, 0.5, 0.75):
            rb = (1 - w) * z(base, pair[0]) + w * z(base, pair[1])
            ro = (1 - w) * z(s, pair[0]) + w * z(s, pair[1])
            out[f"r({w}) gain / sd"] = round(float((ro - rb).mean() / rb.std(correction=0)), 2)
        print(Path(f).name, out, flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
