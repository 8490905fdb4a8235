"""A markdown report with PNG plots, built from a records file only.

Sections, one per reward set of the weighted settings (e.g. a pair, and a three-reward run):
the headline table at the most balanced w (mean weighted reward, fraction of the MORL oracle's
gain over the base, cost per image relative to the base), the oracle-gain fraction at every w,
the Pareto front and hypervolume of each method, and every setting's mean rewards with 95% CIs.
Then the DB-KLA lambda sweep, and image grids when the sweep saved images.
"""

from __future__ import annotations

import math
import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from . import plots
from .analysis import kla_table, method_fronts, oracle_gain, select, summarize, weight_grid_of, weighted_means
from .records import read_records
from .._io import atomic_write_text

__all__ = ["build_report", "write_report", "METHOD_ORDER"]

METHOD_ORDER = ("base", "soup", "code", "rgg", "rgg_tuned", "mpa", "ls", "ls_stratified", "ls_golden", "morl", "kla")


def _f(x: float, nd: int = 3) -> str:
    return "n/a" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def _pm(m: float, h: float, nd: int = 3) -> str:
    return _f(m, nd) if math.isnan(h) else f"{_f(m, nd)} ± {_f(h, nd)}"


def _wlabel(w: Mapping[str, float] | None) -> str:
    return "-" if w is None else ", ".join(f"{k}={v:g}" for k, v in w.items())


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)


def _ordered(methods) -> list[str]:
    ms = set(methods)
    return [m for m in METHOD_ORDER if m in ms] + sorted(ms - set(METHOD_ORDER))


def _balanced(grid: Sequence[Mapping[str, float]]) -> Mapping[str, float] | None:
    """The w of the grid closest to uniform (w = 0.5 for a pair)."""
    if not grid:
        return None
    return min(grid, key=lambda w: sum((v - 1 / len(w)) ** 2 for v in w.values()))


def _seconds(records, method, weights, lam=None) -> float:
    sel = select(records, method, None if method == "base" else weights, lam, any_lambda=True)
    return float(np.mean([r["seconds"] for r in sel.values()])) if sel else math.nan


def _nfe(records, method, weights) -> float:
    sel = select(records, method, None if method == "base" else weights, None, any_lambda=True)
    return float(np.mean([r.get("nfe", math.nan) for r in sel.values()])) if sel else math.nan


def _section(records: list[dict], names: list[str], out_dir: Path, tag: str, root: Path) -> str:
    sig = set(names)
    recs = [r for r in records if r["method"] == "base" or (r["weights"] is not None and set(r["weights"]) == sig
                                                              and r["method"] != "kla")]
    methods = _ordered({r["method"] for r in recs})
    others = [m for m in methods if m not in ("base", "morl")]
    grid = weight_grid_of(recs, "mpa") or weight_grid_of(recs, next((m for m in others), "mpa"))
    w_mid = _balanced(grid)
    md = [f"## Rewards: {', '.join(names)}", ""]
    have_oracle = any(r["method"] == "morl" for r in recs)
    if w_mid is not None:
        md += _headline(recs, methods, others, w_mid, have_oracle)
    if have_oracle and grid:
        md += _oracle_fractions(recs, others, grid)
    if len(names) >= 2:
        md += _fronts(recs, names, methods)
    if len(names) == 2:
        md += _figures(recs, names, methods, out_dir, tag, root)
    rows = []
    for row in summarize(recs):
        rows.append([_style_label(row["method"]), _wlabel(row["weights"]), row["n"]]
                    + [_pm(row["mean"][n], row["ci"][n]) for n in names]
                    + [_f(row["seconds"] * 1000, 1), _f(row["nfe"], 0)])
    md += ["### Every setting", "", _table(["method", "w", "n", *names, "ms / image", "NFE"], rows), ""]
    return "\n".join(md)


def _headline(recs: list[dict], methods: list[str], others: list[str], w_mid: dict, have_oracle: bool) -> list[str]:
    """The headline table at the balanced w: r(w), oracle-gain fraction, cost relative to the base."""
    gains = oracle_gain(recs, others + (["morl"] if have_oracle else []), w_mid) if have_oracle else {}
    base_s = _seconds(recs, "base", None)
    base_n = _nfe(recs, "base", None)
    rows = []
    for m in methods:
        mean_r = _mean_weighted(recs, m, w_mid)
        g = gains.get(m, {})
        frac = g.get("fraction", math.nan) if m not in ("base",) else 0.0
        ci = f" [{_f(g['lo'], 2)}, {_f(g['hi'], 2)}]" if "lo" in g and not math.isnan(g.get("lo", math.nan)) else ""
        s = _seconds(recs, m, w_mid)
        rows.append([_style_label(m), _pm(*mean_r[:2]), mean_r[2],
                     ("1.00 (oracle)" if m == "morl" else f"{_f(frac, 2)}{ci}") if have_oracle else "n/a",
                     _f(s / base_s if base_s > 0 else math.nan, 2), _f(_nfe(recs, m, w_mid) / base_n, 2),
                     _f(s * 1000, 1)])
    return [f"### Headline at w = ({_wlabel(w_mid)})", "",
            "Weighted reward r(w) = sum_i w_i r_i, mean ± 95% CI over images; fraction of the MORL oracle's "
            "gain over the base, (R_m - R_base) / (R_morl - R_base), with a paired-bootstrap 95% interval; "
            "cost = generation seconds per image and denoiser evaluations per image, relative to the base.", "",
            _table(["method", "r(w)", "n", "oracle-gain fraction", "time ratio", "NFE ratio", "ms / image"], rows),
            ""]


def _oracle_fractions(recs: list[dict], others: list[str], grid: list) -> list[str]:
    """Each method's fraction of the MORL oracle's gain at every w of the grid."""
    rows = []
    for w in grid:
        g = oracle_gain(recs, others, w)
        base_r = g.get("base", {}).get("R", math.nan)
        orc_r = g.get("morl", {}).get("R", math.nan)
        rows.append([_wlabel(w), _f(base_r), _f(orc_r)] + [_f(g[m]["fraction"], 2) for m in others])
    return ["### Fraction of the oracle's gain at each w", "",
            "n/a where the fraction is undefined: no oracle (or no images of the method) at that w, or "
            "the oracle does not beat the base there.", "",
            _table(["w", "R_base", "R_morl"] + [_style_label(m) for m in others], rows), ""]


def _fronts(recs: list[dict], names: list[str], methods: list[str]) -> list[str]:
    """Per method: settings, how many are on its own Pareto front, and the hypervolume."""
    fr = method_fronts(recs, names, methods)
    ref = fr.pop("__ref__")["ref"]
    rows = [[_style_label(m), len(v["points"]), int(v["front_mask"].sum()), _f(v["hv"], 4)]
            for m, v in fr.items()]
    return ["### Pareto fronts and hypervolume", "",
            f"Per method, the mean reward vectors of its settings (lambda = 1), how many are Pareto-optimal "
            f"within the method, and the exact hypervolume above the common reference point "
            f"({', '.join(f'{n}={x:.3f}' for n, x in zip(names, ref))}: the worst mean of any setting).", "",
            _table(["method", "settings", "on own front", "hypervolume"], rows), ""]


def _figures(recs: list[dict], names: list[str], methods: list[str], out_dir: Path, tag: str, root: Path
             ) -> list[str]:
    """Two rewards: the Pareto curves and the grid of sample images across w (when images were saved)."""
    p = plots.plot_pareto(recs, names, out_dir / f"{tag}pareto.png", methods)
    md = [f"![Pareto curves]({os.path.relpath(p, out_dir)})", ""]
    g = plots.plot_image_grid(recs, root, out_dir / f"{tag}grid.png", names, [m for m in methods if m != "kla"])
    if g is not None:
        md += [f"![Samples across w]({os.path.relpath(g, out_dir)})", ""]
    return md


def _mean_weighted(recs, m, w):
    return weighted_means(recs, m, w)  # (mean, CI half-width, n) of r(w)


def _style_label(m: str) -> str:
    return plots.METHOD_STYLE.get(m, (m,))[0]


def _kla_section(records: list[dict], out_dir: Path, tag: str) -> str:
    rows = kla_table(records)
    if not rows:
        return ""
    names = list(rows[0]["mean"])
    p = plots.plot_kla(records, out_dir / f"{tag}kla.png")
    table = [[_wlabel(r["weights"]), _f(r["lambda"], 2), r["n"], _pm(*r["weighted"])]
             + [_pm(r["mean"][n], r["ci"][n]) for n in names] for r in rows]
    return "\n".join([
        "## DB-KLA: the KL strength lambda", "",
        "eps = (1 - lambda) eps_pre + lambda sum_i w_i eps_i: lambda < 1 stays closer to the base, lambda > 1 "
        "extrapolates beyond the fine-tuned adapter (stronger alignment, risk of reward hacking).", "",
        _table(["w", "lambda", "n", "r(w)", *names], table), "",
        f"![DB-KLA sweep]({os.path.relpath(p, out_dir)})" if p else "", ""])


def build_report(records: Sequence[Mapping], out_dir: str | os.PathLike, *, title: str = "Diffusion Blend sweep",
                 root: str | os.PathLike | None = None, tag: str = "", intro: str = "") -> str:
    """Write the plots into ``out_dir`` and return the markdown (image links relative to out_dir).

    Args:
        records: sweep records (``evaluate.records``).
        root: folder the records' image paths are relative to (the records file's folder).
        tag: prefix of the plot file names (several reports in one folder).
        intro: markdown put under the title (e.g. the command and setup that made the records).
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    records = [dict(r) for r in records]
    if not records:
        raise ValueError("no records to report on")
    root = Path(root) if root is not None else out_dir
    sigs = []
    for r in records:
        if r["weights"] is not None and r["method"] != "kla":
            s = list(r["weights"])
            if not any(set(s) == set(x) for x in sigs):  # one section per reward set, in any order
                sigs.append(s)
    md = [f"# {title}", ""]
    if intro:
        md += [intro, ""]
    for i, names in enumerate(sorted(sigs, key=len)):
        md.append(_section(records, names, out_dir, f"{tag}{len(names)}r{i}_" if len(sigs) > 1 else tag, root))
    md.append(_kla_section(records, out_dir, tag))
    return "\n".join(md).rstrip() + "\n"


def write_report(records_path: str | os.PathLike, out_dir: str | os.PathLike, *, title: str = "Diffusion Blend sweep",
                 name: str = "report.md", intro: str = "") -> Path:
    """Read a records file, write ``out_dir/report.md`` (atomically) and its PNG plots."""
    records_path = Path(records_path)
    recs = read_records(records_path)
    text = build_report(recs, out_dir, title=title, root=records_path.parent, intro=intro)
    path = Path(out_dir) / name
    atomic_write_text(path, text)
    return path
