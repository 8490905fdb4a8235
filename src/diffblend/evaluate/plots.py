"""Plots from records (matplotlib, Agg backend, PNG files written atomically).

Every function takes records (or tables made from them by ``evaluate.analysis``) and a path; none
touches a model. Colours are fixed per method so every figure reads the same.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from .analysis import kla_table, summarize
from .._io import atomic_write

__all__ = ["METHOD_STYLE", "plot_pareto", "pareto_figure", "plot_kla", "plot_image_grid"]

METHOD_STYLE = {  # label, colour, marker
    "base": ("base", "black", "*"), "mpa": ("DB-MPA", "tab:blue", "o"), "ls": ("DB-MPA-LS", "tab:cyan", "s"),
    "ls_stratified": ("DB-MPA-LS stratified", "teal", "s"), "ls_golden": ("DB-MPA-LS golden", "darkcyan", "s"),
    "soup": ("Rewarded Soup", "tab:orange", "^"), "rgg": ("RGG", "tab:green", "v"),
    "rgg_tuned": ("RGG (tuned scale)", "darkgreen", "<"),
    "code": ("CoDe", "tab:purple", "D"), "morl": ("MORL oracle", "tab:red", "P"), "kla": ("DB-KLA", "tab:brown", "x"),
}


def _style(m: str):
    return METHOD_STYLE.get(m, (m, "gray", "."))


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: str | os.PathLike) -> Path:
    path = Path(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=path.suffix.lstrip(".") or "png", dpi=120,
                                               bbox_inches="tight"))
    return path


def plot_pareto(records: Sequence[Mapping], names: Sequence[str], path: str | os.PathLike,
                methods: Sequence[str] | None = None, title: str = "") -> Path:
    """Mean (r_a, r_b) of every setting (lambda = 1 or none) with 95% CIs, one curve per method
    across w (in w order), the base as a star and the MORL oracles as filled markers."""
    fig = pareto_figure(records, names, methods, title)
    out = _save(fig, path)
    _plt().close(fig)
    return out


def pareto_figure(records: Sequence[Mapping], names: Sequence[str], methods: Sequence[str] | None = None,
                  title: str = ""):
    """The matplotlib figure of :func:`plot_pareto` (for a caller that shows it rather than saves it)."""
    plt = _plt()
    a, b = names
    rows = [r for r in summarize(records) if r["lambda"] is None or abs(r["lambda"] - 1) < 1e-9]
    fig, ax = plt.subplots(figsize=(6, 4.5))
    for m in methods or sorted({r["method"] for r in rows}):
        mine = [r for r in rows if r["method"] == m and (r["weights"] is None or set(r["weights"]) <= set(names))]
        if not mine:
            continue
        mine.sort(key=lambda r: (r["weights"] or {}).get(b, 0.0))
        x = np.array([r["mean"][a] for r in mine])
        y = np.array([r["mean"][b] for r in mine])
        xe = np.array([r["ci"][a] for r in mine])
        ye = np.array([r["ci"][b] for r in mine])
        label, colour, marker = _style(m)
        size = 14 if m == "base" else 7
        ax.errorbar(x, y, xerr=np.nan_to_num(xe), yerr=np.nan_to_num(ye), color=colour, marker=marker,
                    ms=size, lw=1.2 if m not in ("base", "morl") else 0, elinewidth=0.6, capsize=2, label=label)
    ax.set_xlabel(f"{a} (mean, 95% CI)")
    ax.set_ylabel(f"{b} (mean, 95% CI)")
    ax.set_title(title or f"Reward trade-off across w ({a} vs {b})")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_kla(records: Sequence[Mapping], path: str | os.PathLike, method: str = "kla") -> Path | None:
    """Mean rewards against lambda for each KLA weight vector (DB-KLA sweep); None without KLA records."""
    rows = kla_table(records, method)
    if not rows:
        return None
    plt = _plt()
    names = list(rows[0]["mean"])
    groups: dict[str, list[dict]] = {}
    for r in rows:
        groups.setdefault(",".join(f"{k}={v:g}" for k, v in r["weights"].items()), []).append(r)
    fig, axes = plt.subplots(1, len(groups), figsize=(5.5 * len(groups), 4), squeeze=False)
    for ax, (wlabel, rs) in zip(axes[0], groups.items()):
        lam = np.array([r["lambda"] for r in rs])
        for i, n in enumerate(names):
            ax.errorbar(lam, [r["mean"][n] for r in rs], yerr=np.nan_to_num([r["ci"][n] for r in rs]),
                        marker="o", ms=4, capsize=2, label=n, color=f"C{i}")
        ax.axvline(1.0, color="gray", ls=":", lw=1)
        ax.set_xlabel("lambda (KL strength; 1 = the fine-tuned adapter)")
        ax.set_ylabel("mean reward (95% CI)")
        ax.set_title(f"DB-KLA, w: {wlabel}")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    out = _save(fig, path)
    plt.close(fig)
    return out


def plot_image_grid(records: Sequence[Mapping], root: str | os.PathLike, path: str | os.PathLike,
                    names: Sequence[str], methods: Sequence[str] | None = None, samples: int = 2) -> Path | None:
    """Rows = method (x a few (prompt, seed) samples), columns = w along the pair; saved images only.

    ``root`` is the folder the records' image paths are relative to. None if no image was saved.
    """
    from PIL import Image

    recs = [r for r in records if r.get("image") and (r["lambda"] is None or abs(r["lambda"] - 1) < 1e-9)]
    if not recs:
        return None
    b = names[1]
    ws = sorted({round(r["weights"][b], 6) for r in recs if r["weights"] and set(r["weights"]) <= set(names)})
    keys = sorted({(r["prompt"], r["seed"]) for r in recs})[:samples]
    methods = [m for m in (methods or sorted({r["method"] for r in recs})) if any(r["method"] == m for r in recs)]
    if not ws or not keys:
        return None
    plt = _plt()
    nrow, ncol = len(methods) * len(keys), len(ws)
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.1 * ncol + 1.2, 1.1 * nrow), squeeze=False)
    index = {(r["method"], None if r["weights"] is None else round(r["weights"].get(b, 0.0), 6),
              r["prompt"], r["seed"]): r for r in recs}
    for i, m in enumerate(methods):
        for j, key in enumerate(keys):
            row = i * len(keys) + j
            for c, w in enumerate(ws):
                ax = axes[row][c]
                ax.set_xticks([])
                ax.set_yticks([])
                r = index.get((m, None if m == "base" else w, *key))
                if r is not None:
                    ax.imshow(np.asarray(Image.open(Path(root) / r["image"])), cmap="gray", vmin=0, vmax=255)
                if c == 0:
                    ax.set_ylabel(f"{_style(m)[0]}\n{key[0]}", fontsize=7)
                if row == 0:
                    ax.set_title(f"w({b})={w:g}", fontsize=7)
    fig.suptitle(f"Samples across w (same noise per row): {names[0]} -> {names[1]}", fontsize=9)
    out = _save(fig, path)
    plt.close(fig)
    return out
