"""Analysis of sweep records: pure functions from records to tables (no plotting, no models).

Conventions (DESIGN.md 8, "records first, plots second"):
    weighted reward   r(w) = sum_i w_i r_i of one image (PAPER.md, "The problem")
    R_m(w)            mean weighted reward of method m's setting at w, over its images
    oracle gain       (R_m(w) - R_base(w)) / (R_morl(w) - R_base(w)): the share of the MORL oracle's
                      improvement over the base model that method m recovers at w (paper: DB-MPA ~0.9,
                      Rewarded Soup ~0.3). The base has no w: its images are scored with the query w.
    cost ratio        mean seconds per image of a method / that of the base, from the same records.

Comparisons are paired: every setting of a sweep uses the same (prompt, seed) noise, so differences
are computed on the images the settings have in common, and confidence intervals of a fraction come
from a paired bootstrap over those images (explicit numpy Generator, fixed seed).
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence

import numpy as np

from .hypervolume import hypervolume
from .pareto import pareto_mask
from .records import record_key, setting_key

__all__ = [
    "weighted_reward", "mean_ci", "reward_names", "summarize", "select", "weighted_means",
    "oracle_gain", "paired_difference", "cost_table", "method_fronts", "kla_table", "weight_grid_of",
]


def weighted_reward(rewards: Mapping[str, float], weights: Mapping[str, float]) -> float:
    """sum_i w_i r_i over the rewards named in ``weights`` (each must be in ``rewards``)."""
    missing = [k for k in weights if k not in rewards]
    if missing:
        raise ValueError(f"weights name reward(s) {missing} that the record does not have; it has {list(rewards)}")
    return float(sum(float(w) * float(rewards[k]) for k, w in weights.items()))


def mean_ci(values: Sequence[float], level: float = 0.95) -> tuple[float, float]:
    """(mean, half-width of the Student-t confidence interval at ``level``); half-width is NaN for n < 2."""
    from scipy.stats import t as student_t  # scipy comes with scikit-learn

    _check_level(level)
    x = np.asarray(values, dtype=np.float64)
    if x.size == 0:
        return math.nan, math.nan
    if x.size < 2:
        return float(x.mean()), math.nan
    half = student_t.ppf(0.5 + level / 2, x.size - 1) * x.std(ddof=1) / math.sqrt(x.size)
    return float(x.mean()), float(half)


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level (the confidence level) must be in (0, 1), e.g. 0.95; got {level}")


def reward_names(records: Iterable[Mapping]) -> list[str]:
    """The reward names present in every record, in the order of the first record."""
    records = list(records)
    if not records:
        return []
    common = set(records[0]["rewards"])
    for r in records[1:]:
        common &= set(r["rewards"])
    return [k for k in records[0]["rewards"] if k in common]


def _by_setting(records: Iterable[Mapping]) -> dict[str, list[Mapping]]:
    groups: dict[str, list[Mapping]] = defaultdict(list)
    for r in records:
        groups[setting_key(r["method"], r["weights"], r["lambda"])].append(r)
    return groups


def summarize(records: Iterable[Mapping], level: float = 0.95) -> list[dict]:
    """One row per setting (method, w, lambda): n, mean and CI half-width of every reward,
    mean seconds and nfe per image. Rows sorted by method, then lambda, then w."""
    records = list(records)
    names = reward_names(records)
    rows = []
    for key, recs in _by_setting(records).items():
        r0 = recs[0]
        row = {"setting": key, "method": r0["method"], "weights": r0["weights"], "lambda": r0["lambda"],
               "n": len(recs), "mean": {}, "ci": {}}
        for name in names:
            row["mean"][name], row["ci"][name] = mean_ci([r["rewards"][name] for r in recs], level)
        row["seconds"] = float(np.mean([r["seconds"] for r in recs]))
        row["nfe"] = float(np.mean([r.get("nfe", math.nan) for r in recs]))
        rows.append(row)
    rows.sort(key=lambda r: (r["method"], -1 if r["lambda"] is None else r["lambda"],
                             sorted((r["weights"] or {}).items())))
    return rows


def select(records: Iterable[Mapping], method: str, weights: Mapping[str, float] | None = None,
           lam: float | None = None, *, any_lambda: bool = False) -> dict[tuple[str, int], Mapping]:
    """The records of one setting, keyed by (prompt, seed) for pairing.

    ``weights=None`` matches a setting without weights (the base). With ``any_lambda`` the lambda
    of the records is not compared (for methods recorded with lambda = 1 or None alike).
    """
    want_w = setting_key(method, weights, None).split("|")[1]
    out = {}
    for r in records:
        if r["method"] != method:
            continue
        k, prompt, seed = record_key(r)
        _, w, lam_key = k.split("|")
        if w != want_w:
            continue
        if not any_lambda and lam_key != setting_key(method, None, lam).split("|")[2]:
            continue
        out[(prompt, seed)] = r
    return out


def weighted_means(records: Iterable[Mapping], method: str, weights: Mapping[str, float],
                   lam: float | None = None) -> tuple[float, float, int]:
    """(mean, CI half-width, n) of r(w) for ``method`` at w (base: its images scored with w)."""
    recs = list(records)
    sel = select(recs, method, None if method == "base" else weights, lam, any_lambda=lam is None)
    vals = [weighted_reward(r["rewards"], weights) for r in sel.values()]
    m, h = mean_ci(vals)
    return m, h, len(vals)


def paired_difference(records: Iterable[Mapping], a: str, b: str, weights: Mapping[str, float],
                      level: float = 0.95) -> dict[str, float]:
    """r(w) of method ``a`` minus that of ``b`` at w, paired over the (prompt, seed) images both have (the same
    noise): ``{"diff": mean, "lo", "hi": Student-t interval at level, "n"}`` (NaN bounds for n < 2)."""
    recs = list(records)
    sa = select(recs, a, None if a == "base" else weights, None, any_lambda=True)
    sb = select(recs, b, None if b == "base" else weights, None, any_lambda=True)
    shared = sorted(set(sa) & set(sb))
    d = [weighted_reward(sa[k]["rewards"], weights) - weighted_reward(sb[k]["rewards"], weights) for k in shared]
    m, h = mean_ci(d, level)
    return {"diff": m, "lo": m - h, "hi": m + h, "n": len(d)}


def reward_correlations(records: Iterable[Mapping], a: str, b: str, method: str = "base",
                        weights: Mapping[str, float] | None = None) -> dict[str, float]:
    """How two rewards go together on one setting's images (default the base's).

    ``{"across": Pearson r over all images, "within": Pearson r after removing each prompt's mean (how they go
    together between the images of one prompt: what an adapter, which reweights those, meets), "n", "prompts"}``;
    NaN where a correlation is undefined (fewer than 2 images or no spread).
    """
    sel = select(list(records), method, weights, any_lambda=True)
    if not sel:
        return {"across": float("nan"), "within": float("nan"), "n": 0, "prompts": 0}
    keys = sorted(sel)
    x = np.array([sel[k]["rewards"][a] for k in keys], dtype=float)
    y = np.array([sel[k]["rewards"][b] for k in keys], dtype=float)
    prompts = [k[0] for k in keys]
    xc, yc = x.copy(), y.copy()
    for p in set(prompts):
        idx = [i for i, q in enumerate(prompts) if q == p]
        xc[idx] -= x[idx].mean()
        yc[idx] -= y[idx].mean()

    def pearson(u: np.ndarray, v: np.ndarray) -> float:
        u, v = u - u.mean(), v - v.mean()
        den = float(np.sqrt((u ** 2).sum() * (v ** 2).sum()))
        return float((u * v).sum() / den) if den > 0 else float("nan")

    return {"across": pearson(x, y), "within": pearson(xc, yc), "n": len(keys), "prompts": len(set(prompts))}


def weight_grid_of(records: Iterable[Mapping], method: str = "mpa") -> list[dict[str, float]]:
    """The distinct weight vectors a method was run at, sorted by their values."""
    seen = {}
    for r in records:
        if r["method"] == method and r["weights"] is not None:
            seen[setting_key(method, r["weights"], None)] = dict(r["weights"])
    return sorted(seen.values(), key=lambda w: tuple(v for _, v in sorted(w.items())))


def oracle_gain(records: Iterable[Mapping], methods: Sequence[str], weights: Mapping[str, float],
                *, lam: float | None = None, oracle: str = "morl", n_boot: int = 2000,
                seed: int = 0, level: float = 0.95) -> dict[str, dict]:
    """Fraction of the oracle's gain over the base that each method recovers at w.

    Uses only the (prompt, seed) images that the base, the oracle and the method all have
    (paired). Returns ``{method: {"R": mean r(w), "fraction": f, "lo": ..., "hi": ..., "n": ...}}``
    plus entries for ``"base"`` and the oracle (their "R" and "n", over the images the two share,
    whatever the methods; absent when they share none). The interval is a percentile
    paired bootstrap over images; a bound is -inf / inf when too many resamples lose the oracle's
    gain. The fraction and its interval are NaN when the oracle does not beat the base; the interval
    is NaN for a single image.
    """
    _check_level(level)
    recs = list(records)
    base = select(recs, "base", None, any_lambda=True)
    orc = select(recs, oracle, weights, any_lambda=True)
    out: dict[str, dict] = {}
    shared = sorted(set(base) & set(orc))  # the base's and the oracle's R: over the images they share
    if shared:
        out["base"] = {"R": float(np.mean([weighted_reward(base[k]["rewards"], weights) for k in shared])),
                       "n": len(shared)}
        out[oracle] = {"R": float(np.mean([weighted_reward(orc[k]["rewards"], weights) for k in shared])),
                       "n": len(shared)}
    for m in methods:
        sel = select(recs, m, weights, lam, any_lambda=lam is None)
        keys = sorted(set(base) & set(orc) & set(sel))
        if not keys:
            out[m] = {"R": math.nan, "fraction": math.nan, "lo": math.nan, "hi": math.nan, "n": 0}
            continue
        rb = np.array([weighted_reward(base[k]["rewards"], weights) for k in keys])
        ro = np.array([weighted_reward(orc[k]["rewards"], weights) for k in keys])
        rm = np.array([weighted_reward(sel[k]["rewards"], weights) for k in keys])
        frac = _fraction(rm.mean(), rb.mean(), ro.mean())
        # A fresh generator per method: its interval does not depend on which methods come before
        # it, and methods with the same images share their resamples.
        idx = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
        num, gain = rm[idx].mean(1) - rb[idx].mean(1), ro[idx].mean(1) - rb[idx].mean(1)
        # A resample where the oracle does not beat the base has no fraction: the ratio ran off to
        # +-inf (the sign of the method's own gain) as the oracle's gain fell to 0. Dropping such
        # resamples would narrow the interval exactly when the oracle's gain is uncertain.
        with np.errstate(divide="ignore", invalid="ignore"):
            boots = np.sort(np.where(gain > 0, num / gain, np.where(num >= 0, np.inf, -np.inf)))
        lo, hi = ((_percentile(boots, 0.5 - level / 2), _percentile(boots, 0.5 + level / 2))
                  if np.isfinite(frac) and len(keys) > 1 and n_boot > 0 else (math.nan, math.nan))  # 1 image: no spread
        out[m] = {"R": float(rm.mean()), "fraction": float(frac), "lo": float(lo), "hi": float(hi), "n": len(keys)}
    return out


def _percentile(sorted_vals: np.ndarray, p: float) -> float:
    """numpy's default (linear) percentile of sorted values that may hold +-inf (np.quantile gives NaN there)."""
    h = (len(sorted_vals) - 1) * p
    i = int(math.floor(h))
    a, b, g = sorted_vals[i], sorted_vals[min(i + 1, len(sorted_vals) - 1)], h - i
    if g == 0 or a == b or math.isinf(a):
        return float(a)
    return float(b) if math.isinf(b) else float(a + (b - a) * g)


def _fraction(rm, rb, ro):
    gain = np.asarray(ro - rb, dtype=np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(gain > 0, (rm - rb) / gain, np.nan)


def cost_table(records: Iterable[Mapping], base: str = "base") -> dict[str, dict]:
    """Per method: mean seconds and nfe per image, and their ratios to the base's."""
    per: dict[str, list[Mapping]] = defaultdict(list)
    for r in records:
        per[r["method"]].append(r)
    if base not in per:
        raise ValueError(f"cost ratios need records of method {base!r}; methods present: {sorted(per)}")
    b_s = float(np.mean([r["seconds"] for r in per[base]]))
    b_n = float(np.mean([r.get("nfe", math.nan) for r in per[base]]))
    out = {}
    for m, recs in per.items():
        s = float(np.mean([r["seconds"] for r in recs]))
        n = float(np.mean([r.get("nfe", math.nan) for r in recs]))
        out[m] = {"seconds": s, "nfe": n, "ratio": s / b_s if b_s > 0 else math.nan,
                  "nfe_ratio": n / b_n if b_n > 0 else math.nan}
    return out


def method_fronts(records: Iterable[Mapping], names: Sequence[str] | None = None,
                  methods: Sequence[str] | None = None, ref: Sequence[float] | None = None) -> dict[str, dict]:
    """Per method, the mean reward vectors of its settings (lambda = 1 or none), their Pareto
    front and the hypervolume, all against one common reference point.

    ref defaults to the per-reward minimum over the means of every setting of every method
    (base and KLA included), so a hypervolume measures the area beyond the worst observed mean.
    Returns ``{method: {"weights": [...], "points": (k, d), "front_mask": (k,), "hv": float}}``
    and ``{"__ref__": ref}``.
    """
    recs = list(records)
    names = list(names) if names is not None else reward_names(recs)
    rows = summarize(recs)
    all_pts = np.array([[row["mean"][n] for n in names] for row in rows])
    ref = np.asarray(ref, dtype=np.float64) if ref is not None else all_pts.min(0)
    out: dict[str, dict] = {"__ref__": {"ref": ref, "names": names}}
    for m in methods or sorted({row["method"] for row in rows}):
        mine = [row for row in rows if row["method"] == m and (row["lambda"] is None or abs(row["lambda"] - 1) < 1e-9)]
        if not mine:
            continue
        pts = np.array([[row["mean"][n] for n in names] for row in mine])
        out[m] = {"weights": [row["weights"] for row in mine], "points": pts,
                  "front_mask": pareto_mask(pts), "hv": hypervolume(pts, ref)}
    return out


def kla_table(records: Iterable[Mapping], method: str = "kla") -> list[dict]:
    """Rows of the DB-KLA lambda sweep: weights, lambda, n, mean and CI of every reward, and of r(w)."""
    recs = [r for r in records if r["method"] == method]
    rows = []
    for row in summarize(recs):
        sel = select(recs, method, row["weights"], row["lambda"])
        row["weighted"] = mean_ci([weighted_reward(r["rewards"], row["weights"]) for r in sel.values()])
        rows.append(row)
    rows.sort(key=lambda r: (sorted(r["weights"].items()), r["lambda"]))
    return rows
