"""paired_difference against a hand computation on hand-made records."""

import math

import pytest

from diffblend.evaluate.analysis import paired_difference


def _rec(method, w, prompt, seed, r1, r2):
    return {"method": method, "weights": w, "lambda": 1.0 if method in ("mpa", "ls") else None, "prompt": prompt,
            "seed": seed, "rewards": {"a": r1, "b": r2}}


def test_paired_difference_matches_the_t_interval_by_hand():
    w = {"a": 0.5, "b": 0.5}
    recs = [_rec("mpa", w, "p", s, 1.0 + s, 2.0) for s in range(4)]
    recs += [_rec("ls", w, "p", s, 1.0 + 2 * s, 2.0) for s in range(3)]  # seed 3 missing: unpaired, left out
    out = paired_difference(recs, "ls", "mpa", w)
    d = [0.5 * s for s in range(3)]  # ls - mpa = 0.5 * (2s - s)
    mean = sum(d) / 3
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 2)
    half = 4.302652729911275 * sd / math.sqrt(3)  # t_{0.975, 2}
    assert out["n"] == 3
    assert out["diff"] == pytest.approx(mean) and out["lo"] == pytest.approx(mean - half)
    assert out["hi"] == pytest.approx(mean + half)
    assert math.isnan(paired_difference(recs[:1] + recs[4:5], "ls", "mpa", w)["lo"])


def test_reward_correlations_across_images_and_within_prompts():
    """Two prompts whose means move the rewards together while, within each prompt, they go against each other:
    across images r > 0, within prompts r = -1 (each prompt's mean removed), checked against numpy's corrcoef."""
    import numpy as np

    from diffblend.evaluate.analysis import reward_correlations

    recs = []
    for p, (ma, mb) in {"p": (0.0, 0.0), "q": (10.0, 10.0)}.items():
        for s, d in enumerate((-1.0, 0.0, 1.0)):
            recs.append({"method": "base", "weights": None, "lambda": None, "prompt": p, "seed": s,
                         "rewards": {"a": ma + d, "b": mb - d}})
    c = reward_correlations(recs, "a", "b")
    xs = [r["rewards"]["a"] for r in recs]
    ys = [r["rewards"]["b"] for r in recs]
    assert c["across"] == pytest.approx(float(np.corrcoef(xs, ys)[0, 1])) and c["across"] > 0.9
    assert c["within"] == pytest.approx(-1.0) and c["n"] == 6 and c["prompts"] == 2
    assert math.isnan(reward_correlations([], "a", "b")["across"])
