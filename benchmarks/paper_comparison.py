"""The paper's comparison on the embedded default model (Cheng et al., ICLR 2026, Table/Fig. on SD 1.5).

Methods: the base model, Rewarded Soup (RS), reward-gradient guidance (RGG), controlled decoding
(CoDe), DB-MPA, DB-MPA-LS and the MORL oracle, on a conflicting pair of rewards at
w in {0, 0.25, 0.5, 0.75, 1}; the DB-KLA sweep lambda in [0, 2] on each reward's adapter; and a
three-reward run with DB-MPA and DB-MPA-LS over a simplex grid. Every setting sees the same noise
per (prompt, seed). Writes the records, a markdown report and PNG plots (default: docs/), and
prints the headline table: weighted reward at w = 0.5, fraction of the oracle's gain over the
base, cost per image relative to the base.

    python benchmarks/paper_comparison.py            # the full run, about 20 minutes on 2 CPU cores
    python benchmarks/paper_comparison.py --quick    # a smoke run in a minute or two (not for conclusions)

Rerunning resumes (records are appended per batch). Timings are wall-clock on the machine at hand;
the NFE ratio (denoiser evaluations per image) does not depend on the machine's load.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffblend._io import atomic_write_text
from diffblend.baselines.code import CoDeConfig
from diffblend.baselines.rgg import RGGConfig
from diffblend.evaluate import plots
from diffblend.evaluate.analysis import oracle_gain
from diffblend.evaluate.methods import MethodOptions, Setting
from diffblend.evaluate.records import read_records
from diffblend.evaluate.report import build_report, _mean_weighted, _seconds, _nfe  # noqa: PLC2701
from diffblend.evaluate.sweep import build_settings, pair_grid, run_sweep

PAPER = {"base": -0.04, "soup": 0.11, "code": 0.22, "rgg": 0.32, "mpa": 0.42, "morl": 0.46}  # SD 1.5, w = 0.5
LABEL = {"base": "base", "soup": "RS", "rgg": "RGG", "code": "CoDe", "mpa": "DB-MPA", "ls": "DB-MPA-LS",
         "morl": "MORL"}


def simplex_grid(names: list[str]) -> list[dict[str, float]]:
    """One-hots, pair midpoints and the centre of the 3-simplex (7 points)."""
    a, b, c = names
    third = 1.0 / 3.0
    return [{a: 1.0, b: 0.0, c: 0.0}, {a: 0.0, b: 1.0, c: 0.0}, {a: 0.0, b: 0.0, c: 1.0},
            {a: 0.5, b: 0.5, c: 0.0}, {a: 0.5, b: 0.0, c: 0.5}, {a: 0.0, b: 0.5, c: 0.5},
            {a: third, b: third, c: 1.0 - 2 * third}]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not for conclusions")
    p.add_argument("--out", default=None, help="output folder (default: docs/, or a temp folder with --quick)")
    p.add_argument("--backend", choices=["default", "toy"], default="default",
                   help="'default': the embedded digits model; 'toy': the analytic toy (a check of this script)")
    p.add_argument("--pair", default="", help="the conflicting pair R1,R2 (default: the pair of the shipped MORL oracles)")
    p.add_argument("--third", default="", help="the third reward of the three-reward run (default: the remaining one)")
    p.add_argument("--prompts", default="0,1,2,3,4,5,6,7,8,9")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (images per setting = prompts x seeds)")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--code-candidates", type=int, default=20)
    p.add_argument("--code-block", type=int, default=5)
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    # One thread by default: on a small shared machine, intra-op threads fight other processes for the
    # cores (measured: a digits UNet forward of 16 rows took 0.05 s on 1 thread, 0.44 s on 2 under load).
    torch.set_num_threads(args.threads)
    ws = [0.0, 0.25, 0.5, 0.75, 1.0]
    lambdas = [0.0, 0.5, 1.0, 1.5, 2.0]
    prompts = [p for p in args.prompts.split(",") if p]
    seeds, steps, N, B = args.seeds, args.steps, args.code_candidates, args.code_block
    if args.quick:
        ws, lambdas, prompts, seeds, steps, N, B = [0.0, 0.5, 1.0], [0.0, 1.0, 2.0], prompts[:2], 1, 6, 3, 2
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="paper_comparison_")) if args.quick
                                           else Path("docs"))
    data = out / "paper_comparison"
    data.mkdir(parents=True, exist_ok=True)

    if args.backend == "toy":
        from diffblend.evaluate.backends import ToyBackend

        backend = ToyBackend.default(num_steps=steps)
        pair, third, methods = ["right", "up"], "centre", ["base", "rgg", "code", "mpa", "ls", "morl"]
    else:
        from diffblend.evaluate.pipelines import default_backend, shipped_adapter_roles

        per_reward, oracles = shipped_adapter_roles()
        if len(per_reward) < 2:
            print(f"paper_comparison: needs the shipped per-reward adapters in diffblend/zoo/adapters; found "
                  f"{sorted(per_reward)}", file=sys.stderr)
            return 1
        if args.pair:
            pair = args.pair.split(",")
        elif oracles:
            pair = sorted({k for w, _ in oracles for k, v in w.items()}, key=lambda k: list(per_reward).index(k)
                          if k in per_reward else 99)[:2]
        else:
            pair = list(per_reward)[:2]
        rest = [r for r in per_reward if r not in pair]
        third = args.third or (rest[0] if rest else "")
        backend = default_backend([*pair, *([third] if third else [])], num_steps=steps)
        methods = ["base", "soup", "rgg", "code", "mpa", "ls", "morl"]
    options = MethodOptions(eta=1.0, rgg=RGGConfig(), code=CoDeConfig(num_candidates=N, block_size=B))
    grid = pair_grid(pair, ws)
    kla_w = [{pair[0]: 1.0, pair[1]: 0.0}, {pair[0]: 0.0, pair[1]: 1.0}]
    settings = build_settings([*methods, "kla"], grid, lambdas, kla_w)
    missing = [s.weights_dict for s in settings if s.method == "morl" and not _has_oracle(backend, s)]
    if missing:
        print(f"paper_comparison: no MORL oracle for w in {missing}; those settings are left out", flush=True)
    settings = [s for s in settings if s.method != "morl" or _has_oracle(backend, s)]
    if third:
        settings += build_settings(["mpa", "ls"], simplex_grid([*pair, third]))
    records = data / "records.jsonl"
    seed_list = list(range(seeds))
    print(f"paper_comparison: {len(settings)} settings x {len(prompts) * seeds} images, pair {pair}, third "
          f"{third or '-'}, {steps} steps -> {records}", flush=True)
    stats = run_sweep(backend, settings, prompts, seed_list, records, options=options, batch_size=args.batch_size)
    # Image grid: two prompts, one seed, every method along w (images saved to a scratch folder).
    grid_png = None
    if args.backend == "default":
        with tempfile.TemporaryDirectory() as tmp:
            gsets = [s for s in build_settings([m for m in methods if m != "code"], grid)
                     if s.method != "morl" or _has_oracle(backend, s)]
            gpath = Path(tmp) / "grid.jsonl"
            run_sweep(backend, gsets, prompts[:2], [0], gpath, options=options, batch_size=2,
                      images_dir=Path(tmp) / "img", progress=False, warmup=False)
            grid_png = plots.plot_image_grid(read_records(gpath), tmp, data / "grid.png", pair, methods)
    w_half = {pair[0]: 0.5, pair[1]: 0.5}
    costs = measure_costs(backend, [m for m in methods if m != "base" and (m != "morl" or _has_oracle(
        backend, Setting.make("morl", w_half)))], w_half, prompts,
                          options, repeats=1 if args.quick else 3)
    (data / "costs.json").write_text(json.dumps(costs, indent=1) + "\n")
    wall = time.time() - t_start
    recs = read_records(records)
    intro = _intro(args, pair, third, ws, lambdas, prompts, seeds, steps, N, B, stats, wall, recs, costs)
    text = build_report(recs, data, title="The paper's comparison on the embedded default", root=data, intro=intro)
    if grid_png is not None:
        text += f"\n## Samples across w\n\nTwo prompts, seed 0, same noise along each row.\n\n![grid]({grid_png.name})\n"
    md = data / "README.md"
    atomic_write_text(md, text.rstrip() + "\n")
    print(f"wrote {md} ({wall:.0f} s)")
    print(_headline(recs, pair, costs))
    return 0


def _adapter_hashes() -> str:
    import hashlib

    try:
        from diffblend.zoo.generate import shipped_adapters
    except ImportError:
        return "-"
    try:
        files = shipped_adapters(include_oracles=True)
    except TypeError:
        files = shipped_adapters()
    return ", ".join(f"{n} {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}" for n, p in files.items()) or "-"


def _has_oracle(backend, setting) -> bool:
    """Whether the backend has a MORL oracle for the setting's w (the toy has all of them)."""
    return not hasattr(backend, "oracle_name") or backend.oracle_name(setting.weights_dict) is not None


def measure_costs(backend, methods, w, prompts, options, repeats: int = 3) -> dict[str, float]:
    """Seconds per image at w, round robin over the methods (base first in every round), median over
    rounds, so slow drifts in the machine's load hit every method alike. Returns ratios to the base."""
    from diffblend.evaluate.methods import Setting, generate

    settings = {"base": Setting.make("base")}
    for m in methods:
        settings[m] = Setting.make(m, w, 1.0 if m in ("mpa", "ls", "soup") else None)
    times: dict[str, list[float]] = {m: [] for m in settings}
    seeds = [10_000 + i for i in range(len(prompts))]  # not the sweep's seeds; timing only
    generate(backend, settings["base"], prompts[:1], seeds[:1], options)  # warm-up
    for _ in range(repeats):
        for m, st in settings.items():
            t0 = time.perf_counter()
            generate(backend, st, prompts, seeds, options)
            times[m].append((time.perf_counter() - t0) / len(prompts))
    med = {m: sorted(v)[len(v) // 2] for m, v in times.items()}
    return {"seconds_per_image": med, "ratio": {m: med[m] / med["base"] for m in med}, "rounds": repeats,
            "batch": len(prompts)}


def _headline(recs, pair, costs=None) -> str:
    w = {pair[0]: 0.5, pair[1]: 0.5}
    ms = ["base", "soup", "code", "rgg", "mpa", "ls", "morl"]
    have = {r["method"] for r in recs}
    g = oracle_gain(recs, [m for m in ms if m in have and m not in ("base", "morl")], w) if "morl" in have else {}
    bs, bn = _seconds(recs, "base", None), _nfe(recs, "base", None)
    lines = [f"Headline at w = 0.5 ({pair[0]} / {pair[1]}):",
             f"{'method':<11}{'r(w)':>16}{'oracle frac':>13}{'time x':>8}{'rr x':>7}{'NFE x':>7}{'paper r(w)':>12}"]
    for m in ms:
        if m not in have:
            continue
        mean, half, n = _mean_weighted(recs, m, w)
        if n == 0:
            continue
        frac = 0.0 if m == "base" else (1.0 if m == "morl" else g.get(m, {}).get("fraction", float("nan")))
        paper = PAPER.get(m)
        rr = (costs or {}).get("ratio", {}).get(m, float("nan"))
        lines.append(f"{LABEL[m]:<11}{mean:>9.3f} ± {half:<5.3f}{frac:>12.2f}{_seconds(recs, m, w) / bs:>8.2f}"
                     f"{rr:>7.2f}{_nfe(recs, m, w) / bn:>7.2f}{'' if paper is None else f'{paper:>12.2f}'}")
    lines.append("time x: seconds per image in the sweep / base; rr x: the same, timed round robin at w = 0.5 "
                 "(median of rounds, more robust to load drift); NFE x: denoiser evaluations per image / base.")
    return "\n".join(lines)


def _intro(args, pair, third, ws, lambdas, prompts, seeds, steps, N, B, stats, wall, recs, costs) -> str:
    cmd = "python benchmarks/paper_comparison.py" + (" --quick" if args.quick else "") + (
        f" --backend {args.backend}" if args.backend != "default" else "")
    return "\n".join([
        f"Generated by `{cmd}` ({wall / 60:.1f} min wall for this invocation, {stats.generated} images generated "
        f"now, {stats.skipped} resumed from earlier records; {len(recs)} records in all). Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU threads ({torch.get_num_threads()} used by torch), torch "
        f"{torch.__version__}; timings are wall-clock "
        f"with whatever else ran on the machine, the NFE ratio is exact.", "",
        f"- Model: {'the embedded digits model, CFG 2.0' if args.backend == 'default' else 'the analytic toy'}, "
        f"DDIM eta = 1, {steps} steps; prompts "
        f"{', '.join(prompts)} x seeds 0..{seeds - 1} ({len(prompts) * seeds} images per setting), paired noise.",
        f"- Pair: {pair[0]} (w = 0) vs {pair[1]} (w = 1), w in {ws}; r(w) = (1 - w) {pair[0]} + w {pair[1]}.",
        f"- MORL oracle: the shipped oracles at interior w; at w = 0 and 1 the single-reward adapter.",
        f"- Adapters used (sha256, first 12 hex): {_adapter_hashes()}.",
        f"- RGG: base model, kl_coeff 0.1, per-pixel RMS gradient normalisation, tempering gamma 0.024 (the "
        f"authors' settings); a reward without a gradient (JPEG size) contributes no guidance.",
        f"- CoDe: base model, N = {N} candidates, blocks of B = {B} steps.",
        f"- DB-KLA: lambda in {lambdas} on each reward's adapter. Three rewards: DB-MPA and DB-MPA-LS on "
        f"{', '.join([*pair, third]) if third else '-'} over 7 simplex points.",
        "- Paper anchor (SD 1.5, Short-DrawBench, ImageReward + VILA, w = 0.5): base -0.04, RS 0.11, CoDe 0.22, "
        "RGG 0.32, DB-MPA 0.42, MORL 0.46; cost DB-MPA 2.03x, LS 1.03x. Different model and rewards: compare "
        "orderings and oracle fractions, not values.",
        "", "```", _headline(recs, pair, costs), "```",
    ])


if __name__ == "__main__":
    sys.exit(main())
