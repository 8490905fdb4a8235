"""Pareto fronts against a brute-force definition, incl. ties and dominated duplicates."""

import itertools

import numpy as np
import pytest

from diffblend.evaluate.pareto import dominates, pareto_front, pareto_mask


def brute_mask(pts):
    return np.array([not any(dominates(q, p) for q in pts) for p in pts], dtype=bool)


@pytest.mark.parametrize("d", [1, 2, 3, 4])
@pytest.mark.parametrize("trial", range(20))
def test_mask_equals_brute_force_on_integer_grids(d, trial):
    # Small integer ranges force many ties and exact duplicates.
    rng = np.random.default_rng(1000 * d + trial)
    pts = rng.integers(0, 4, size=(rng.integers(1, 25), d)).astype(float)
    pts = np.concatenate([pts, pts[: len(pts) // 3]])  # duplicated rows, some dominated
    np.testing.assert_array_equal(pareto_mask(pts), brute_mask(pts))


def test_front_is_unique_nondominated_and_covers_every_point():
    rng = np.random.default_rng(7)
    pts = rng.integers(0, 5, size=(60, 3)).astype(float)
    front = pareto_front(pts)
    assert len(np.unique(front, axis=0)) == len(front)
    for p, q in itertools.permutations(front, 2):
        assert not dominates(p, q)
    for p in pts:  # every point is on the front or dominated by a front point
        assert any((p == f).all() or dominates(f, p) for f in front)


def test_duplicates_of_a_front_point_stay_on_front_and_dominated_duplicates_do_not():
    pts = [[1, 2], [1, 2], [2, 1], [0, 0], [0, 0], [1, 1]]
    np.testing.assert_array_equal(pareto_mask(pts), [True, True, True, False, False, False])
    np.testing.assert_array_equal(pareto_front(pts), [[2, 1], [1, 2]])


def test_bad_input_is_refused():
    with pytest.raises(ValueError, match="finite"):
        pareto_mask([[0.0, np.nan]])
    with pytest.raises(ValueError, match=r"\(n, d\)"):
        pareto_mask(np.zeros((2, 2, 2)))
    with pytest.raises(ValueError, match="at least one reward"):
        pareto_front(np.zeros((3, 0)))
