"""Per-image cost of Diffusion Blend's methods, as ratios to the base model measured in the same run.

    python benchmarks/bench_cost.py                                  # tiny SD-shaped UNet, CPU
    python benchmarks/bench_cost.py --device cuda --model sd15       # SD 1.5-sized UNet (random weights)
    python benchmarks/bench_cost.py --device cuda --model DIR        # a diffusers UNet dir (or pipeline dir)

What is timed: the denoising loop of one batch (DDIM, eta = 1, classifier-free guidance with
scale 7.5, so every step is a forward of 2B rows per model run), through ``core.sample`` and
``adapters.blend_denoiser`` -- the text encoder and VAE are left out (they cost the same for every
method). Rows: base; one adapter; MPA batched and sequential; LS (batched routing); Rewarded Soup;
for m = 2, 3, 4 rank-4 LoRA adapters on the attention projections (the paper's DPOK setting) with
uniform w. All rows are timed round robin: one warm-up round, then ``--repeats`` rounds; the
median per row is reported. The Blender keeps one soup's merged weights (w changes between calls),
so every timed soup loop includes one rebuild of them, as when w changes between images; a cost
per batch, not per image (in benchmarks/results the soup rows are 1.11-1.14x the base at B = 1 and
1.03-1.05x at B = 4).

Paper anchor (SD 1.5, fp32, 50 steps, GPU): DB-MPA 2.03x, DB-MPA-LS 1.03x the base.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from diffblend._io import atomic_write_text
from diffblend.adapters import blend_denoiser
from diffblend.adapters.blender import Blender
from diffblend.core.blend import Blend
from diffblend.core.sampling import NoiseSchedule, sample

SD15 = dict(  # Stable Diffusion 1.5's UNet config (860M parameters)
    sample_size=64, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(320, 640, 1280, 1280),
    down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=768, attention_head_dim=8, norm_num_groups=32)
TINY = dict(
    sample_size=16, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(32, 64),
    down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
    cross_attention_dim=64, attention_head_dim=8, norm_num_groups=8)
TEXT_LEN = 77  # CLIP prompt length, as SD


def build_unet(model: str, device: str, dtype: torch.dtype):
    """The base UNet: "tiny" / "sd15" from configs with random weights, or a local diffusers directory."""
    from diffusers import UNet2DConditionModel

    if model in ("tiny", "sd15"):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            unet = UNet2DConditionModel(**(TINY if model == "tiny" else SD15))
    else:
        path = Path(model)
        sub = "unet" if (path / "unet").is_dir() else None
        unet = UNet2DConditionModel.from_pretrained(path, subfolder=sub)
    return unet.to(device=device, dtype=dtype).eval()


def add_adapters(unet, m: int, rank: int) -> list[str]:
    """m random rank-`rank` LoRA adapters on the attention projections (non-zero B: they change the model)."""
    from peft import LoraConfig

    names = [f"r{i}" for i in range(m)]
    gen = torch.Generator().manual_seed(1)
    for n in names:
        unet.add_adapter(LoraConfig(r=rank, lora_alpha=rank, target_modules=["to_q", "to_k", "to_v", "to_out.0"],
                                    init_lora_weights=False), adapter_name=n)
    with torch.no_grad():
        for pname, p in unet.named_parameters():
            if ".lora_B." in pname:
                p.copy_((torch.randn(p.shape, generator=gen) * 0.01).to(p))
    return names


def time_loop(den, unet, args, schedule, ts, device, dtype, seed: int) -> float:
    """Seconds of one denoising loop of a batch."""
    size = unet.config.sample_size
    g = torch.Generator().manual_seed(0)
    x = torch.randn((args.batch, 4, size, size), generator=g).to(device, dtype)
    cond = torch.randn((args.batch, TEXT_LEN, unet.config.cross_attention_dim), generator=g).to(device, dtype)
    if device == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    with torch.no_grad():
        sample(den, x, schedule, ts, cond, eta=1.0, generators=torch.Generator().manual_seed(seed))
    if device == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    p.add_argument("--model", default="tiny", help="tiny | sd15 | a local diffusers UNet or pipeline directory")
    p.add_argument("--batch", type=int, default=1, help="images per batch (B); CFG doubles the rows")
    p.add_argument("--steps", type=int, default=10, help="DDIM steps per image (the paper uses 50)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median reported)")
    p.add_argument("--m", type=int, nargs="+", default=[2, 3, 4], help="numbers of adapters")
    p.add_argument("--rank", type=int, default=4, help="LoRA rank (the paper: 4)")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default="float32")
    p.add_argument("--threads", type=int, default=0, help="CPU intra-op threads (0: torch's default)")
    p.add_argument("--out", type=Path, default=None, help="also write the table as JSON here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    unet = build_unet(args.model, args.device, dtype)
    names = add_adapters(unet, max(args.m), args.rank)
    blender = Blender(unet)
    schedule = NoiseSchedule(torch.linspace(0.00085**0.5, 0.012**0.5, 1000, dtype=torch.float64).pow(2)
                             .neg().add(1).cumprod(0))
    ts = schedule.timesteps(args.steps, steps_offset=1)
    uncond = torch.zeros((args.batch, TEXT_LEN, unet.config.cross_attention_dim), device=args.device, dtype=dtype)

    def den(blend, mode):
        return blend_denoiser(unet, blend, mode=mode, guidance_scale=7.5, uncond=uncond, blender=blender)

    cases = [("base", 1, den(None, "sequential")),
             ("single adapter", 1, den(Blend.create({names[0]: 1.0}, names), "sequential"))]
    for m in args.m:
        w = {n: 1.0 / m for n in names[:m]}
        for label, method, mode in [("MPA batched", "mpa", "batched"), ("MPA sequential", "mpa", "sequential"),
                                    ("LS", "ls", "batched"), ("soup", "soup", "sequential")]:
            cases.append((label, m, den(Blend.create(w, names, method=method, normalize=True), mode)))
    # Round robin (every case once per repeat, the first repeat a warm-up), so that a slow phase
    # of a shared machine hits all cases alike; the median over repeats is reported.
    times: list[list[float]] = [[] for _ in cases]
    for r in range(args.repeats + 1):
        for i, (_, _, d) in enumerate(cases):
            sec = time_loop(d, unet, args, schedule, ts, args.device, dtype, seed=r) / args.batch
            if r:
                times[i].append(sec)
    rows = [(label, m, statistics.median(t)) for (label, m, _), t in zip(cases, times)]
    base = rows[0][2]
    print(f"device={args.device} ({torch.cuda.get_device_name() if args.device == 'cuda' else 'cpu'}), "
          f"model={args.model}, dtype={args.dtype}, batch={args.batch}, steps={args.steps}, CFG on, "
          f"repeats={args.repeats}, torch threads={torch.get_num_threads()}")
    print(f"{'method':<16}{'m':>3}{'s/image':>11}{'x base':>9}")
    for label, m, sec in rows:
        print(f"{label:<16}{m:>3}{sec:>11.4f}{sec / base:>9.2f}")
    if args.out is not None:
        record = {"config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                  "rows": [{"method": r[0], "m": r[1], "s_per_image": r[2], "ratio": r[2] / base} for r in rows]}
        atomic_write_text(args.out, json.dumps(record, indent=1))  # a reader never sees half a file
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
