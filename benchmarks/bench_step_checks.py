"""Per-denoiser-call cost of validating the blend at every call (before) vs once per pipeline call (after).

A tiny SD-style UNet with two random LoRA adapters, DB-MPA m = 2 in batched mode, 2 rows ([uncond; cond]);
the two paths are timed interleaved in one process (same machine load), median over repeats:

    python benchmarks/bench_step_checks.py [--repeats 200] [--threads 1]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def _unet():
    from diffusers import UNet2DConditionModel
    from peft import LoraConfig

    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=32, attention_head_dim=4, norm_num_groups=8).eval()
    for name in ("a", "b"):
        unet.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False), adapter_name=name)
    return unet


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    from diffblend.adapters.blender import Blender
    from diffblend.core.blend import Blend

    unet = _unet()
    blender = Blender(unet, "batched")
    blend = Blend.create({"a": 0.5, "b": 0.5}, blender.adapter_names)
    g = torch.Generator().manual_seed(0)
    kw = {"sample": torch.randn((2, 4, 8, 8), generator=g), "timestep": torch.tensor(500),
          "encoder_hidden_states": torch.randn((2, 8, 32), generator=g), "return_dict": False}
    inner = unet.forward
    times: dict[bool, list[float]] = {False: [], True: []}
    with torch.no_grad():
        for checked in (False, True):  # warm-up (merged-weight cache)
            blender.forward(inner, blend, 2, (), kw, "batched", checked=checked)
        for _ in range(args.repeats):
            for checked in (False, True):
                t0 = time.perf_counter()
                blender.forward(inner, blend, 2, (), kw, "batched", checked=checked)
                times[checked].append(time.perf_counter() - t0)
        checks = []
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            blender.sync()
            blender.check(blend, blender.resolve(blend, "batched"))
            checks.append(time.perf_counter() - t0)
    before, after = (statistics.median(times[c]) * 1e3 for c in (False, True))
    print(f"per denoiser call, median of {args.repeats}: checks at every call {before:.3f} ms, checked once per "
          f"pipeline call {after:.3f} ms, ratio before/after {before / after:.3f}; the checks alone "
          f"{statistics.median(checks) * 1e3:.3f} ms ({len(blender.layers)} LoRA layers)")


if __name__ == "__main__":
    main()
