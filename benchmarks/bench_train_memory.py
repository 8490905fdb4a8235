"""Peak memory and step time of `finetune` with the SD-scale options, on an SDXL-shaped pipeline with a mid-size UNet
(64/128 channels, 32x32 latents, 8 trajectories x 4 steps per epoch, 3 epochs), one option set per process (peak
RSS is per process), printed side by side with ratios to the plain run:

    python benchmarks/bench_train_memory.py [--sets plain,ckpt,chunk,bf16] [--threads 1]

plain: no option; ckpt: --gradient-checkpointing; chunk: --decode-chunk 1; bf16: --mixed-precision bf16 (slow on CPU).
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OPTIONS = {"plain": {}, "ckpt": {"gradient_checkpointing": True}, "bf16": {"mixed_precision": "bf16"},
           "chunk": {"decode_chunk": 1}}


def one(name: str, threads: int) -> dict:
    """Train in this process with option set ``name``; return its timings and peak RSS."""
    import torch
    from diffusers import UNet2DConditionModel

    sys.path.insert(0, str(ROOT / "tests"))
    from helpers_pipelines import _seeded, tiny_sdxl

    from diffblend.model import DiffusionModel
    from diffblend.train import FinetuneConfig, finetune

    torch.set_num_threads(threads)
    with tempfile.TemporaryDirectory() as tmp:
        pipe = tiny_sdxl(tmp)
        pipe.unet = _seeded(0, lambda: UNet2DConditionModel(
            sample_size=32, in_channels=4, out_channels=4, layers_per_block=2, block_out_channels=(64, 128),
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
            attention_head_dim=(2, 4), use_linear_projection=True, addition_embed_type="text_time",
            addition_time_embed_dim=8, transformer_layers_per_block=(1, 2), projection_class_embeddings_input_dim=80,
            cross_attention_dim=64, norm_num_groups=8).eval())
        cfg = FinetuneConfig(reward="boldness", kl=0.1, prompts=("a", "b"), epochs=3, prompts_per_epoch=2,
                             samples_per_prompt=4, num_steps=4, minibatch_size=8, guidance_scale=1.0, **OPTIONS[name])
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res = finetune(cfg, Path(tmp) / "run", policy=DiffusionModel.from_pipeline(pipe), progress=False)
    return {"set": name, "s_per_epoch": sum(r["seconds"] for r in res.metrics[1:]) / (len(res.metrics) - 1),
            "peak_rss_MiB": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "rss_before_MiB": before,
            "grad_norm_epoch0": res.metrics[0]["grad_norm"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sets", default="plain,ckpt,chunk")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(one(args.child, args.threads)))
        return
    rows = []
    for name in args.sets.split(","):
        out = subprocess.run([sys.executable, __file__, "--child", name, "--threads", str(args.threads)],
                             capture_output=True, text=True, check=True).stdout
        rows.append(json.loads(out.strip().splitlines()[-1]))
    ref = rows[0]
    print(f"{'set':6} {'s/epoch':>8} {'x first':>8} {'peak MiB':>9} {'above start':>12} {'x first':>8} {'grad norm':>10}")
    for r in rows:
        above, ref_above = r["peak_rss_MiB"] - r["rss_before_MiB"], ref["peak_rss_MiB"] - ref["rss_before_MiB"]
        print(f"{r['set']:6} {r['s_per_epoch']:8.2f} {r['s_per_epoch'] / ref['s_per_epoch']:8.2f} "
              f"{r['peak_rss_MiB']:9.0f} {above:12.0f} {above / ref_above:8.2f} {r['grad_norm_epoch0']:10.4f}")


if __name__ == "__main__":
    main()
