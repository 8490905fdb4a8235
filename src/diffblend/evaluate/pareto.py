"""Pareto fronts of reward vectors (every reward is maximised). Pure numpy, no torch.

A point p dominates q when p >= q in every reward and p > q in at least one. Points equal in
every reward do not dominate each other, so duplicates of a front point are all on the front
(:func:`pareto_mask`); :func:`pareto_front` returns each front point once.
"""

from __future__ import annotations

import numpy as np

__all__ = ["as_points", "dominates", "pareto_mask", "pareto_front"]


def as_points(points) -> np.ndarray:
    """Validate and convert to a float64 array of shape (n, d), d >= 1; NaN/inf refused."""
    arr = np.asarray(points, dtype=np.float64)
    if arr.ndim == 1 and arr.size == 0:
        arr = arr.reshape(0, 1)
    if arr.ndim != 2:
        raise ValueError(f"points must have shape (n, d), got {arr.shape}")
    if arr.shape[1] < 1:
        raise ValueError(f"points need at least one reward (d >= 1), got shape {arr.shape}")
    if not np.isfinite(arr).all():
        raise ValueError("points must be finite (no NaN or inf)")
    return arr


def dominates(p, q) -> bool:
    """True if p dominates q (maximisation): p >= q everywhere and p > q somewhere."""
    p, q = np.asarray(p, dtype=np.float64), np.asarray(q, dtype=np.float64)
    return bool(np.all(p >= q) and np.any(p > q))


def pareto_mask(points) -> np.ndarray:
    """(n,) bool: True for the points that no other point dominates (duplicates kept).

    O(n^2 d) with numpy broadcasting, chunked so memory stays O(chunk * n * d); fronts here
    come from a few hundred settings at most.
    """
    pts = as_points(points)
    n = len(pts)
    mask = np.ones(n, dtype=bool)
    chunk = max(1, 4_000_000 // max(1, n * pts.shape[1]))
    for s in range(0, n, chunk):
        q = pts[s:s + chunk, None, :]  # (c, 1, d): candidates to test
        ge = (pts[None, :, :] >= q).all(-1)  # (c, n): other point >= candidate everywhere
        gt = (pts[None, :, :] > q).any(-1)  # (c, n): ... and strictly better somewhere
        mask[s:s + chunk] = ~(ge & gt).any(1)
    return mask


def pareto_front(points) -> np.ndarray:
    """The non-dominated points, each once, sorted by the first reward descending; (k, d)."""
    pts = as_points(points)
    if len(pts) == 0:
        return pts
    front = np.unique(pts[pareto_mask(pts)], axis=0)
    return front[np.lexsort(tuple(-front[:, j] for j in reversed(range(front.shape[1]))))]
