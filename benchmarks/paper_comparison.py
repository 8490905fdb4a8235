"""The paper's comparison on an embedded model (Cheng et al., ICLR 2026, Table/Fig. on SD 1.5).

Methods: the base model, Rewarded Soup (RS), reward-gradient guidance (RGG, with the authors' settings
and, with --rgg-tune, with its scale chosen on held-out prompts), controlled decoding (CoDe), DB-MPA,
DB-MPA-LS and the MORL oracle, on a conflicting pair of rewards at w in {0, 0.25, 0.5, 0.75, 1}; the
DB-KLA sweep lambda in [0, 2] on each reward's adapter; and a three-reward run with DB-MPA and DB-MPA-LS
over a simplex grid (when a third adapter is shipped). Every setting sees the same noise per (prompt,
seed). Writes the records, a markdown report and PNG plots (default: docs/), and prints the headline
table: weighted reward at w = 0.5, fraction of the oracle's gain over the base, cost per image relative
to the base, and DB-MPA-LS minus DB-MPA with a paired interval.

    python benchmarks/paper_comparison.py            # the default model, its prompts x 3 seeds
    python benchmarks/paper_comparison.py --model colour --seeds 20 --rgg-tune --code-ws 0.5 --no-kla
    python benchmarks/paper_comparison.py --quick    # a smoke run in a minute or two (not for conclusions)

Rerunning resumes (records are appended per batch); ``--processes N --process-index I`` runs a share of
the settings (run every index, then once without them to merge the shards and write the report).
Timings are wall-clock on the machine at hand; the NFE ratio (denoiser evaluations per image) does not
depend on the machine's load.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import platform
import shlex
import sys
import tempfile
import time
from pathlib import Path

import torch

from diffblend._io import atomic_write_text
from diffblend.baselines.code import CoDeConfig
from diffblend.baselines.rgg import RGGConfig
from diffblend.evaluate import plots
from diffblend.evaluate.analysis import oracle_gain, paired_difference, weighted_reward
from diffblend.evaluate.methods import MethodOptions, Setting, generate
from diffblend.evaluate.records import read_records
from diffblend.evaluate.report import build_report, _mean_weighted, _seconds, _nfe  # noqa: PLC2701
from diffblend.evaluate.sweep import build_settings, pair_grid, run_sweep

PAPER = {"base": -0.04, "soup": 0.11, "code": 0.22, "rgg": 0.32, "mpa": 0.42, "morl": 0.46}  # SD 1.5, w = 0.5
PAPER_ORDER = "base < RS < CoDe < RGG < DB-MPA < MORL (LS: close to DB-MPA at half the cost)"
LABEL = {"base": "base", "soup": "RS", "rgg": "RGG", "rgg_tuned": "RGG tuned", "code": "CoDe", "mpa": "DB-MPA",
         "ls": "DB-MPA-LS", "morl": "MORL"}
RGG_GRID = (0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 100.0)  # kl_coeff alpha: guidance strength 1 / alpha; 0.1 = authors'


def simplex_grid(names: list[str]) -> list[dict[str, float]]:
    """One-hots, pair midpoints and the centre of the 3-simplex (7 points)."""
    a, b, c = names
    third = 1.0 / 3.0
    return [{a: 1.0, b: 0.0, c: 0.0}, {a: 0.0, b: 1.0, c: 0.0}, {a: 0.0, b: 0.0, c: 1.0},
            {a: 0.5, b: 0.5, c: 0.0}, {a: 0.5, b: 0.0, c: 0.5}, {a: 0.0, b: 0.5, c: 0.5},
            {a: third, b: third, c: 1.0 - 2 * third}]


def _floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="tiny counts: a smoke run, not for conclusions")
    p.add_argument("--out", default=None, help="output folder (default: docs/, or a temp folder with --quick)")
    p.add_argument("--backend", choices=["default", "toy"], default="default",
                   help="'default': an embedded model (--model); 'toy': the analytic toy (a check of this script)")
    p.add_argument("--model", default=None, help="the embedded model by name (default: the default one)")
    p.add_argument("--pair", default="", help="the conflicting pair R1,R2 (default: the model's demo pair)")
    p.add_argument("--third", default="", help="the third reward of the three-reward run (default: a remaining one)")
    p.add_argument("--no-third", action="store_true", help="skip the three-reward run")
    p.add_argument("--score", default="", help="comma-separated rewards also scored on every image (not blended), "
                                               "e.g. prompt_alignment to see reward hacking")
    p.add_argument("--no-kla", action="store_true", help="skip the DB-KLA lambda sweep")
    p.add_argument("--prompts", default="", help="comma-separated prompts (default: the model's default prompts)")
    p.add_argument("--seeds", type=int, default=3, help="seeds per prompt (images per setting = prompts x seeds)")
    p.add_argument("--ws", default="0,0.25,0.5,0.75,1", help="w grid along the pair (w = the second reward's share)")
    p.add_argument("--code-ws", default="", help="run CoDe only at these w (default: every w)")
    p.add_argument("--singles", action="store_true",
                   help="also run the single-reward adapters (the oracle at w = 0 and 1) when --ws leaves them out")
    p.add_argument("--rgg-tune", action="store_true",
                   help="add 'RGG tuned': kl_coeff from %s maximising mean r(w=0.5) on held-out prompts" % (RGG_GRID,))
    p.add_argument("--tune-prompts", default="", help="held-out prompts of the RGG tuning (default: the model's)")
    p.add_argument("--tune-seeds", type=int, default=2, help="seeds per held-out prompt (seeds 1000+; default 2)")
    p.add_argument("--tune-only", action="store_true", help="only tune RGG (rgg_tuning.json), e.g. before --processes")
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--batch-size", type=int, default=10)
    p.add_argument("--code-candidates", type=int, default=20)
    p.add_argument("--code-block", type=int, default=5)
    p.add_argument("--processes", type=int, default=1, help="run a share of the settings (see the docstring)")
    p.add_argument("--process-index", type=int, default=0)
    return p.parse_args(argv)


def _plan(args) -> dict:
    """The grids and counts of this run (--quick shrinks them)."""
    plan = dict(ws=_floats(args.ws), lambdas=[] if args.no_kla else [0.0, 0.5, 1.0, 1.5, 2.0],
                prompts=[x for x in args.prompts.split(",") if x.strip()], seeds=args.seeds, steps=args.steps,
                N=args.code_candidates, B=args.code_block, code_ws=_floats(args.code_ws) if args.code_ws else None,
                singles=args.singles)
    if args.quick:
        plan.update(ws=[0.0, 0.5, 1.0], lambdas=[] if args.no_kla else [0.0, 1.0, 2.0], seeds=1, steps=6, N=3, B=2)
    return plan


def _backend(args, plan):
    """(backend, pair, third, methods, embedded model or None); fills plan["prompts"] when empty."""
    if args.backend == "toy":
        from diffblend.evaluate.backends import ToyBackend

        plan["prompts"] = plan["prompts"] or ["0", "1"]
        backend = ToyBackend.default(num_steps=plan["steps"])
        methods = ["base", "rgg", "code", "mpa", "ls", "morl"] + (["rgg_tuned"] if args.rgg_tune else [])
        return backend, ["right", "up"], "" if args.no_third else "centre", methods, None
    from diffblend.evaluate.pipelines import default_backend, shipped_adapter_roles
    from diffblend.registry import default_model

    embedded = default_model(args.model)
    per_reward, oracles = shipped_adapter_roles(embedded.name)
    if len(per_reward) < 2:
        raise SystemExit(f"paper_comparison: needs two shipped per-reward adapters of the {embedded.name} model; "
                         f"found {sorted(per_reward)}")
    pair = args.pair.split(",") if args.pair else list(embedded.demo_pair or list(per_reward)[:2])
    rest = [r for r in per_reward if r not in pair]
    third = "" if args.no_third else (args.third or (rest[0] if rest else ""))
    calibration = embedded.adapters_dir / "calibration.json" if embedded.adapters_dir else None
    extra = [r for r in args.score.split(",") if r.strip() and r not in (*pair, third)]
    backend = default_backend([*pair, *([third] if third else []), *extra], num_steps=plan["steps"], model=embedded.name,
                              calibration=str(calibration) if calibration and calibration.is_file() else None)
    plan["prompts"] = plan["prompts"] or list(embedded.prompts)[: 2 if args.quick else None]
    plan["calibrated"] = bool(calibration and calibration.is_file())
    methods = ["base", "soup", "rgg", *(["rgg_tuned"] if args.rgg_tune else []), "code", "mpa", "ls", "morl"]
    return backend, pair, third, methods, embedded


def tune_rgg(backend, pair, prompts, seeds, options, grid=RGG_GRID) -> tuple[float, list[dict]]:
    """The documented rule for RGG's scale: on held-out prompts (not the comparison's) and seeds, generate at
    w = 0.5 with each kl_coeff of ``grid`` and keep the one with the highest mean r(w); ties: the smallest."""
    w = {pair[0]: 0.5, pair[1]: 0.5}
    table = []
    for alpha in grid:
        opts = MethodOptions(eta=options.eta, rgg=RGGConfig(kl_coeff=alpha), code=options.code)
        ps = [p for p in prompts for _ in seeds]
        ss = [s for _ in prompts for s in seeds]
        out = generate(backend, Setting.make("rgg", w), ps, ss, opts)
        images = backend.to_images(out.x0)
        with torch.no_grad():
            scores = backend.score(images if images is not None else out.x0, ps)
        r = [weighted_reward({k: float(v[i]) for k, v in scores.items()}, w) for i in range(len(ps))]
        table.append({"kl_coeff": alpha, "mean_r": sum(r) / len(r), "n": len(r)})
        print(f"  RGG tuning: kl_coeff {alpha:g}: mean r(w=0.5) {table[-1]['mean_r']:.3f} (n={len(r)})", flush=True)
    best = max(table, key=lambda row: (row["mean_r"], -row["kl_coeff"]))
    return best["kl_coeff"], table


def _tuned_options(args, backend, pair, plan, options, data: Path, embedded):
    """MethodOptions with rgg_tuned from data/rgg_tuning.json, or tuned now (and saved) when absent."""
    path = data / "rgg_tuning.json"
    if path.is_file():
        tuning = json.loads(path.read_text())
    else:
        prompts = [x for x in args.tune_prompts.split(",") if x.strip()] or plan["prompts"]
        seeds = list(range(1000, 1000 + (1 if args.quick else args.tune_seeds)))
        alpha, table = tune_rgg(backend, pair, prompts, seeds, options)
        tuning = {"kl_coeff": alpha, "table": table, "prompts": prompts, "seeds": seeds,
                  "rule": "argmax over kl_coeff of mean r(w=0.5) on held-out prompts and seeds"}
        atomic_write_text(path, json.dumps(tuning, indent=1) + "\n")
    plan["rgg_tuning"] = tuning
    return dataclasses.replace(options, rgg_tuned=RGGConfig(kl_coeff=tuning["kl_coeff"]))


def _settings(backend, methods, pair, third, plan):
    grid = pair_grid(pair, plan["ws"])
    kla_w = [{pair[0]: 1.0, pair[1]: 0.0}, {pair[0]: 0.0, pair[1]: 1.0}]
    main = [m for m in methods if m != "code" or plan["code_ws"] is None]
    settings = build_settings([*main, *(["kla"] if plan["lambdas"] else [])], grid, plan["lambdas"], kla_w)
    if "code" in methods and plan["code_ws"] is not None:
        settings += build_settings(["code"], pair_grid(pair, plan["code_ws"]))
    if plan["singles"] and "morl" in methods:
        settings += build_settings(["morl"], pair_grid(pair, [w for w in (0.0, 1.0) if w not in plan["ws"]]))
    missing = [s.weights_dict for s in settings if s.method == "morl" and not _has_oracle(backend, s)]
    if missing:
        print(f"paper_comparison: no MORL oracle for w in {missing}; those settings are left out", flush=True)
    settings = [s for s in settings if s.method != "morl" or _has_oracle(backend, s)]
    if third:
        settings += build_settings(["mpa", "ls"], simplex_grid([*pair, third]))
    return settings


def main(argv=None) -> int:
    args = parse_args(argv)
    t_start = time.time()
    # One thread by default: on a small shared machine, intra-op threads fight other processes for the
    # cores (measured: a digits UNet forward of 16 rows took 0.05 s on 1 thread, 0.44 s on 2 under load).
    torch.set_num_threads(args.threads)
    plan = _plan(args)
    out = Path(args.out) if args.out else (Path(tempfile.mkdtemp(prefix="paper_comparison_")) if args.quick
                                           else Path("docs"))
    data = out / "paper_comparison"
    data.mkdir(parents=True, exist_ok=True)
    backend, pair, third, methods, embedded = _backend(args, plan)
    options = MethodOptions(eta=1.0, rgg=RGGConfig(), code=CoDeConfig(num_candidates=plan["N"], block_size=plan["B"]))
    if "rgg_tuned" in methods:
        options = _tuned_options(args, backend, pair, plan, options, data, embedded)
    if args.tune_only:
        print(f"paper_comparison: RGG tuned kl_coeff = {options.rgg_tuned.kl_coeff if options.rgg_tuned else '-'}")
        return 0
    settings = _settings(backend, methods, pair, third, plan)
    records = data / "records.jsonl"
    seeds = list(range(plan["seeds"]))
    print(f"paper_comparison: {len(settings)} settings x {len(plan['prompts']) * len(seeds)} images, pair {pair}, "
          f"third {third or '-'}, {plan['steps']} steps -> {records}", flush=True)
    run = {"model": embedded.name if embedded else "toy", "steps": plan["steps"], "eta": 1.0,
           "rgg": vars(options.rgg), "rgg_tuned": vars(options.rgg_tuned) if options.rgg_tuned else None,
           "code": vars(options.code), "calibrated": plan.get("calibrated", False)}
    stats = run_sweep(backend, settings, plan["prompts"], seeds, records, options=options, batch_size=args.batch_size,
                      process_index=args.process_index, num_processes=args.processes, run_settings=run)
    if args.processes > 1:
        print(f"paper_comparison: share {args.process_index} of {args.processes} done ({stats.generated} images); "
              f"run once without --processes to merge and report")
        return 0
    return _write_report(args, plan, backend, pair, third, methods, options, data, records, stats, t_start, embedded)


def _write_report(args, plan, backend, pair, third, methods, options, data, records, stats, t_start, embedded) -> int:
    grid_png = _image_grid(args, backend, pair, methods, options, plan, data) if args.backend == "default" else None
    w_half = {pair[0]: 0.5, pair[1]: 0.5}
    timed = [m for m in methods if m != "base" and (m != "morl" or _has_oracle(backend, Setting.make("morl", w_half)))]
    costs = measure_costs(backend, timed, w_half, plan["prompts"][:5], options, repeats=1 if args.quick else 3)
    atomic_write_text(data / "costs.json", json.dumps(costs, indent=1) + "\n")
    wall = time.time() - t_start
    recs = read_records(records)
    intro = _intro(args, plan, pair, third, stats, wall, recs, costs, embedded)
    title = f"The paper's comparison on the embedded {embedded.name if embedded else 'toy'} model"
    text = build_report(recs, data, title=title, root=data, intro=intro)
    if grid_png is not None:
        text += (f"\n## Samples across w\n\nTwo prompts, seed 0, same noise along each row (w = the share of "
                 f"{pair[1]}).\n\n![grid]({grid_png.name})\n")
    md = data / "README.md"
    atomic_write_text(md, text.rstrip() + "\n")
    print(f"wrote {md} ({wall:.0f} s)")
    print(_headline(recs, pair, costs))
    return 0


def _image_grid(args, backend, pair, methods, options, plan, data):
    """Two prompts, seed 0, every method (but CoDe) along w, saved as data/grid.png."""
    with tempfile.TemporaryDirectory() as tmp:
        gsets = [s for s in build_settings([m for m in methods if m != "code"], pair_grid(pair, plan["ws"]))
                 if s.method != "morl" or _has_oracle(backend, s)]
        gpath = Path(tmp) / "grid.jsonl"
        run_sweep(backend, gsets, plan["prompts"][:2], [0], gpath, options=options, batch_size=2,
                  images_dir=Path(tmp) / "img", progress=False, warmup=False)
        return plots.plot_image_grid(read_records(gpath), tmp, data / "grid.png", pair,
                                     [m for m in methods if m != "code"])


def _adapter_hashes(embedded) -> str:
    import hashlib

    if embedded is None:
        return "-"
    files = embedded.adapters(True)
    return ", ".join(f"{n} {hashlib.sha256(p.read_bytes()).hexdigest()[:12]}" for n, p in files.items()) or "-"


def _has_oracle(backend, setting) -> bool:
    """Whether the backend has a MORL oracle for the setting's w (the toy has all of them)."""
    return not hasattr(backend, "oracle_name") or backend.oracle_name(setting.weights_dict) is not None


def measure_costs(backend, methods, w, prompts, options, repeats: int = 3) -> dict[str, float]:
    """Seconds per image at w, round robin over the methods (base first in every round), median over
    rounds, so slow drifts in the machine's load hit every method alike. Returns ratios to the base."""
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
    ms = ["base", "soup", "code", "rgg", "rgg_tuned", "mpa", "ls", "morl"]
    have = {r["method"] for r in recs}
    g = oracle_gain(recs, [m for m in ms if m in have and m not in ("base", "morl")], w) if "morl" in have else {}
    bs, bn = _seconds(recs, "base", None), _nfe(recs, "base", None)
    lines = [f"Headline at w = 0.5 ({pair[0]} / {pair[1]}):",
             f"{'method':<11}{'r(w)':>16}{'n':>5}{'oracle frac [95% CI]':>24}{'time x':>8}{'rr x':>7}{'NFE x':>7}"
             f"{'paper r(w)':>12}"]
    for m in ms:
        if m not in have:
            continue
        mean, half, n = _mean_weighted(recs, m, w)
        if n == 0:
            continue
        gm = g.get(m, {})
        frac = ("0.00" if m == "base" else "1.00 (oracle)" if m == "morl" else
                f"{gm.get('fraction', float('nan')):.2f} [{gm.get('lo', float('nan')):.2f}, {gm.get('hi', float('nan')):.2f}]")
        paper = PAPER.get(m)
        rr = (costs or {}).get("ratio", {}).get(m, float("nan"))
        lines.append(f"{LABEL[m]:<11}{mean:>9.3f} ± {half:<5.3f}{n:>5}{frac:>24}{_seconds(recs, m, w) / bs:>8.2f}"
                     f"{rr:>7.2f}{_nfe(recs, m, w) / bn:>7.2f}{'' if paper is None else f'{paper:>12.2f}'}")
    if {"ls", "mpa"} <= have:
        d = paired_difference(recs, "ls", "mpa", w)
        lines.append(f"DB-MPA-LS - DB-MPA at w = 0.5: {d['diff']:+.3f} [95% CI {d['lo']:+.3f}, {d['hi']:+.3f}], "
                     f"n = {d['n']} paired images")
    lines.append("time x: seconds per image in the sweep / base; rr x: the same, timed round robin at w = 0.5 "
                 "(median of rounds, more robust to load drift); NFE x: denoiser evaluations per image / base.")
    return "\n".join(lines)


def _ls_vs_mpa(recs, pair, ws) -> list[str]:
    rows = ["| w | DB-MPA-LS - DB-MPA | 95% CI | n |", "|---|---|---|---|"]
    for w2 in ws:
        w = {pair[0]: round(1 - w2, 12), pair[1]: w2}
        d = paired_difference(recs, "ls", "mpa", w)
        if d["n"]:
            rows.append(f"| {w2:g} | {d['diff']:+.3f} | [{d['lo']:+.3f}, {d['hi']:+.3f}] | {d['n']} |")
    return rows


def _adapter_checks(recs, pair) -> list[str]:
    """Each shipped model (the single-reward adapters = the oracle at w = 0 / 1, the oracles) against the base:
    the mean change of every scored reward in base-sd units, and the oracle's r(0.5) gain."""
    import numpy as np

    from diffblend.evaluate.analysis import reward_names, select

    names = reward_names(recs)
    base = select(recs, "base", None, any_lambda=True)
    if not base:
        return ["(no base records)"]
    sd = {n: float(np.std([r["rewards"][n] for r in base.values()], ddof=1)) for n in names}
    half = {pair[0]: 0.5, pair[1]: 0.5}
    sd_half = float(np.std([weighted_reward(r["rewards"], half) for r in base.values()], ddof=1))
    rows = ["| model | " + " | ".join(f"{n} change / sd" for n in names) + " | r(0.5) gain / sd | n |",
            "|---|" + "---|" * (len(names) + 2)]
    for w2 in sorted({float(r["weights"][pair[1]]) for r in recs if r["method"] == "morl" and r["weights"]}):
        w = {pair[0]: round(1 - w2, 12), pair[1]: w2}
        sel = select(recs, "morl", w, any_lambda=True)
        keys = sorted(set(sel) & set(base))
        if not keys:
            continue
        ch = [np.mean([sel[k]["rewards"][n] - base[k]["rewards"][n] for k in keys]) / sd[n] for n in names]
        g = np.mean([weighted_reward(sel[k]["rewards"], half) - weighted_reward(base[k]["rewards"], half)
                     for k in keys]) / sd_half
        label = pair[0] if w2 == 0 else pair[1] if w2 == 1 else f"MORL oracle w = {w2:g}"
        rows.append(f"| {label} | " + " | ".join(f"{c:+.2f}" for c in ch) + f" | {g:+.2f} | {len(keys)} |")
    from diffblend.evaluate.analysis import reward_correlations

    c = reward_correlations(recs, pair[0], pair[1])
    rows += ["", f"The pair on the base's {c['n']} images ({c['prompts']} prompts): Pearson r {c['across']:+.2f} across "
                 f"images, {c['within']:+.2f} within prompts (each prompt's mean removed; negative = in conflict)."]
    return rows


def _intro(args, plan, pair, third, stats, wall, recs, costs, embedded) -> str:
    cmd = "python " + shlex.join(["benchmarks/paper_comparison.py", *sys.argv[1:]])
    model = (f"the embedded {embedded.name} model, CFG {embedded.guidance_scale:g}" if embedded else "the analytic toy")
    calib = " (calibrated: each reward standardised by the base model's mean and sd, shipped calibration.json)" \
        if plan.get("calibrated") else ""
    tuning = plan.get("rgg_tuning")
    tuned = None
    if tuning:
        grid = [row["kl_coeff"] for row in tuning["table"]]
        means = ", ".join("%.3f" % row["mean_r"] for row in tuning["table"])
        tuned = (f"- RGG tuned: kl_coeff {tuning['kl_coeff']:g} chosen by the rule '{tuning['rule']}' over {grid} on "
                 f"{len(tuning['prompts'])} held-out prompts x seeds {tuning['seeds']} (mean r: {means}); "
                 f"rgg_tuning.json.")
    code_at = "" if plan["code_ws"] is None else f", at w in {plan['code_ws']} only"
    lines = [
        f"Generated by `{cmd}` ({wall / 60:.1f} min wall for this invocation, {stats.generated} images generated "
        f"now, {stats.skipped} resumed from earlier records; {len(recs)} records in all). Machine: "
        f"{platform.machine()}, {os.cpu_count()} CPU threads ({torch.get_num_threads()} used by torch), torch "
        f"{torch.__version__}; timings are wall-clock with whatever else ran on the machine, the NFE ratio is exact.",
        "",
        f"- Model: {model}, DDIM eta = 1, {plan['steps']} steps; {len(plan['prompts'])} prompts x seeds "
        f"0..{plan['seeds'] - 1} ({len(plan['prompts']) * plan['seeds']} images per setting), paired noise.",
        f"- Pair: {pair[0]} (w = 0) vs {pair[1]} (w = 1), w in {plan['ws']}; r(w) = (1 - w) {pair[0]} + w "
        f"{pair[1]}{calib}.",
        "- MORL oracle: the shipped oracles at interior w; at w = 0 and 1 the single-reward adapter.",
        f"- Adapters used (sha256, first 12 hex): {_adapter_hashes(embedded)}.",
        "- RGG: base model, kl_coeff 0.1, per-pixel RMS gradient normalisation, tempering gamma 0.024 (the "
        "authors' settings); a reward without a gradient (JPEG size) contributes no guidance.",
        *([tuned] if tuned else []),
        f"- CoDe: base model, N = {plan['N']} candidates, blocks of B = {plan['B']} steps{code_at}.",
        f"- DB-KLA: lambda in {plan['lambdas']} on each reward's adapter." if plan["lambdas"] else "- DB-KLA: not run.",
        f"- Three rewards: DB-MPA and DB-MPA-LS on {', '.join([*pair, third])} over 7 simplex points." if third
        else "- Three rewards: not run.",
        f"- Paper anchor (SD 1.5, Short-DrawBench, ImageReward + VILA, w = 0.5): base -0.04, RS 0.11, CoDe 0.22, "
        f"RGG 0.32, DB-MPA 0.42, MORL 0.46 (order: {PAPER_ORDER}); cost DB-MPA 2.03x, LS 1.03x. Different model "
        "and rewards: compare orderings and oracle fractions, not values.",
        "", "```", _headline(recs, pair, costs), "```", "",
        "DB-MPA-LS against DB-MPA along w (paired over images with the same noise):", "",
        *_ls_vs_mpa(recs, pair, plan["ws"]), "",
        "The adapters against the base (paired images; each reward's change in units of its sd over the base's "
        "images in this run; r(0.5) in units of the sd of r(0.5) over the base's images):", "",
        *_adapter_checks(recs, pair),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
