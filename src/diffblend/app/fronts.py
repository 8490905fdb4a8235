"""The app's records view: the methods' Pareto fronts from a sweep's records, and one chosen point
regenerated through the library (``evaluate.methods.generate`` on the session's pipeline).

Plain functions; the means, fronts and figure come from ``evaluate.analysis`` / ``evaluate.plots``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from ..evaluate.analysis import reward_names, summarize
from ..evaluate.pareto import pareto_mask
from ..evaluate.plots import METHOD_STYLE, pareto_figure
from ..evaluate.records import setting_key
from .callbacks import Session, View, _caption, to_arrays

__all__ = ["front_rows", "front_choices", "front_figure", "point_view"]


def front_rows(records: Sequence[Mapping], x: str, y: str) -> list[dict]:
    """Summary rows (``analysis.summarize``) at lambda = 1 or none, each with ``on_front``: whether it is
    on its method's Pareto front in (x, y)."""
    rows = [r for r in summarize(records) if r["lambda"] is None or abs(r["lambda"] - 1) < 1e-9]
    for m in {r["method"] for r in rows}:
        mine = [r for r in rows if r["method"] == m]
        for r, on in zip(mine, pareto_mask(np.array([[r["mean"][x], r["mean"][y]] for r in mine]))):
            r["on_front"] = bool(on)
    return rows


def _label(row: Mapping, x: str, y: str) -> str:
    w = "base" if row["weights"] is None else ", ".join(f"{n} {v:.2f}" for n, v in row["weights"].items())
    star = " *front*" if row["on_front"] else ""
    return (f"{METHOD_STYLE.get(row['method'], (row['method'],))[0]} [{w}] -> {x} {row['mean'][x]:.3f}, "
            f"{y} {row['mean'][y]:.3f}{star}")


def front_choices(records: Sequence[Mapping], x: str, y: str) -> list[tuple[str, str]]:
    """(label, setting key) of every point of the plot, front points first."""
    rows = sorted(front_rows(records, x, y), key=lambda r: (not r["on_front"], r["method"], r["setting"]))
    return [(_label(r, x, y), r["setting"]) for r in rows]


def front_figure(records: Sequence[Mapping], x: str, y: str):
    """The Pareto plot of the methods in (x, y) (``evaluate.plots.pareto_figure``)."""
    names = reward_names(records)
    for n in (x, y):
        if n not in names:
            raise ValueError(f"reward {n!r} is not in the records; they have {names}")
    if x == y:
        raise ValueError("choose two different rewards for the plot axes")
    return pareto_figure(records, [x, y])


def _backend(session: Session, steps: int, guidance: float):
    from ..evaluate.pipelines import DiffusersBackend

    key = (int(steps), float(guidance))
    if key not in session.backends:
        session.backends[key] = DiffusersBackend(session.bp, rewards=session.rewards, num_steps=key[0],
                                                 guidance_scale=key[1])
    return session.backends[key]


def point_view(session: Session, setting: str, steps: int, guidance: float, num_images: int = 4) -> tuple[str, View]:
    """The chosen point's setting (method, w, lambda, recorded means) and its first ``num_images``
    images (prompt, seed) regenerated with the library's method registry on the session's pipeline."""
    import time

    from ..evaluate.methods import Setting, generate

    records = session.records or []
    recs = [r for r in records if setting_key(r["method"], r["weights"], r["lambda"]) == setting]
    if not recs:
        raise ValueError(f"no records of setting {setting!r}")
    row = summarize(recs)[0]
    r0 = recs[0]
    picked = recs[:int(num_images)]
    prompts, seeds = [str(r["prompt"]) for r in picked], [int(r["seed"]) for r in picked]
    backend = _backend(session, steps, guidance)
    with session.lock:
        t0 = time.perf_counter()
        res = generate(backend, Setting.make(r0["method"], r0["weights"], r0["lambda"]), prompts, seeds)
        images = backend.to_images(res.x0).float().cpu()
        secs = time.perf_counter() - t0
    scores = {n: [float(v) for v in s] for n, s in backend.score(images, prompts).items()}
    caps = [_caption(scores, j, f"prompt {p!r} seed {s}") for j, (p, s) in enumerate(zip(prompts, seeds))]
    text = (f"**{METHOD_STYLE.get(row['method'], (row['method'],))[0]}** (`{row['method']}`), "
            f"w = {row['weights']}, lambda = {row['lambda']}; {row['n']} recorded images, mean rewards: "
            + ", ".join(f"{n} {m:.3f}" for n, m in row["mean"].items())
            + f". Below: the first {len(picked)} regenerated ({steps} steps, guidance {guidance}).")
    return text, View(to_arrays(images, session.scale), scores, caps, r0["weights"] or {}, secs)
