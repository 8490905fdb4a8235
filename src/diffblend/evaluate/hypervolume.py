"""Exact hypervolume of a set of reward vectors (maximisation) with respect to a reference point.

HV(P; ref) = Lebesgue measure of the union over p in P of the boxes [ref, p]. Points that do not
exceed ref in every reward contribute nothing (their box is empty after clipping to ref).

- d = 1: max(p) - ref.
- d = 2: exact sweep over the front sorted by the first reward, O(n log n).
- d >= 3: exact "hypervolume by slicing objectives" (HSO, While et al. 2006): sort by the last
  reward, and sum slabs whose cross-section is the (d-1)-dimensional hypervolume of the points
  above the slab. Exponential in d in the worst case, fast for the fronts of a sweep (tens of
  points, d <= 4).
"""

from __future__ import annotations

import numpy as np

from .pareto import as_points, pareto_front

__all__ = ["hypervolume"]


def _hv2(front: np.ndarray, ref: np.ndarray) -> float:
    """2-D sweep: front non-dominated and strictly above ref; (k, 2)."""
    order = np.argsort(-front[:, 0], kind="stable")  # x descending => y ascending on a front
    total, y_prev = 0.0, ref[1]
    for x, y in front[order]:
        if y > y_prev:
            total += (x - ref[0]) * (y - y_prev)
            y_prev = y
    return float(total)


def _hv(points: np.ndarray, ref: np.ndarray) -> float:
    d = points.shape[1]
    if len(points) == 0:
        return 0.0
    if d == 1:
        return float(points[:, 0].max() - ref[0])
    front = pareto_front(points)
    if d == 2:
        return _hv2(front, ref)
    # Slice along the last reward, from the top: between consecutive distinct levels z_k > z_{k+1}
    # the cross-section is the (d-1)-D union of the points whose last reward is >= z_k.
    order = np.argsort(-front[:, -1], kind="stable")
    front = front[order]
    levels = np.append(front[:, -1], ref[-1])
    total = 0.0
    for k in range(len(front)):
        height = levels[k] - levels[k + 1]
        if height > 0:
            total += height * _hv(front[: k + 1, :-1], ref[:-1])
    return float(total)


def hypervolume(points, ref) -> float:
    """Exact hypervolume dominated by ``points`` above ``ref`` (every reward maximised).

    Args:
        points: (n, d) reward vectors (e.g. the mean rewards of each setting of one method).
        ref: (d,) reference point, usually a point every method should beat (e.g. the worst
            mean reward seen in each coordinate). Points not strictly above it in every reward
            add nothing.

    Returns:
        The hypervolume, >= 0, in the product of the rewards' units.
    """
    pts = as_points(points)
    ref = np.asarray(ref, dtype=np.float64).reshape(-1)
    if pts.shape[1] != ref.shape[0] and len(pts):
        raise ValueError(f"ref must have one entry per reward ({pts.shape[1]}), got {ref.shape[0]}")
    if not np.isfinite(ref).all():
        raise ValueError("ref must be finite")
    pts = pts[(pts > ref).all(1)] if len(pts) else pts
    return _hv(pts, ref)
