"""Exact hypervolume against brute force: counted unit cells on integer points, and
inclusion-exclusion over all subsets on real-valued points."""

import itertools

import numpy as np
import pytest

from diffblend.evaluate.hypervolume import hypervolume


def cells_covered(pts, ref, hi):
    """Count unit cells [c, c+1]^d, ref <= c < hi, inside the union of boxes [ref, p].

    With integer points and reference, a cell lies in box [ref, p] iff c + 1 <= p
    coordinate-wise, so the count is the exact hypervolume.
    """
    d = len(ref)
    count = 0
    for c in itertools.product(*(range(int(ref[j]), hi) for j in range(d))):
        c = np.array(c)
        if any((c + 1 <= p).all() for p in pts):
            count += 1
    return count


def inclusion_exclusion(pts, ref):
    """sum over non-empty subsets S of (-1)^(|S|+1) vol(intersection) = vol(box to min over S)."""
    pts = [p for p in pts if (p > ref).all()]
    total = 0.0
    for k in range(1, len(pts) + 1):
        for sub in itertools.combinations(pts, k):
            total += (-1) ** (k + 1) * np.prod(np.min(sub, axis=0) - ref)
    return total


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("trial", range(12))
def test_integer_points_equal_cell_count(d, trial):
    rng = np.random.default_rng(100 * d + trial)
    hi = 5 if d <= 3 else 4
    pts = rng.integers(0, hi + 1, size=(rng.integers(1, 12), d)).astype(float)
    pts = np.concatenate([pts, pts[:3]])  # exact duplicates (ties)
    ref = np.zeros(d)
    assert hypervolume(pts, ref) == cells_covered(pts, ref, hi)


@pytest.mark.parametrize("d", [2, 3])
@pytest.mark.parametrize("trial", range(10))
def test_real_points_equal_inclusion_exclusion(d, trial):
    rng = np.random.default_rng(7 + 31 * trial + d)
    pts = rng.normal(size=(rng.integers(1, 9), d))
    ref = np.full(d, -1.5)  # some points fall below ref in a coordinate and must add nothing
    # float64 sums of <= 2^8 products of O(1) terms: round-off far below 1e-9.
    assert hypervolume(pts, ref) == pytest.approx(inclusion_exclusion(pts, ref), abs=1e-9)


def test_dominated_points_and_points_below_ref_add_nothing():
    front = np.array([[3.0, 1.0], [2.0, 2.0], [1.0, 3.0]])
    hv = hypervolume(front, [0, 0])
    assert hv == 6.0  # 3*1 + 2*1 + 1*1
    more = np.concatenate([front, [[1.0, 1.0], [2.0, 2.0], [5.0, -1.0], [-1.0, 9.0]]])
    assert hypervolume(more, [0, 0]) == hv


def test_empty_and_bad_reference():
    assert hypervolume(np.zeros((0, 2)), [0, 0]) == 0.0
    with pytest.raises(ValueError, match="one entry per reward"):
        hypervolume([[1.0, 2.0]], [0.0, 0.0, 0.0])
