"""The report builds from a small records file, and its numbers are the ones we can compute by hand."""

import math

import numpy as np
import pytest

from diffblend.evaluate.analysis import cost_table, mean_ci, method_fronts, oracle_gain, summarize
from diffblend.evaluate.records import RecordWriter, read_records
from diffblend.evaluate.report import build_report, write_report

A, B = "r_a", "r_b"
SEEDS = range(6)


def records(with_images_root=None):
    """Base at (0, 0); MORL at (1-w, w); MPA at 0.8 x that; soup at 0.3 x. Per-seed offsets are the
    same for every method, so paired differences are exact and oracle fractions are 0.8 and 0.3."""
    out = []
    off = {s: 0.1 * (s - 2.5) for s in SEEDS}
    for s in SEEDS:
        out.append(dict(method="base", weights=None, **{"lambda": None}, prompt="p", seed=s,
                        rewards={A: off[s], B: off[s]}, seconds=1.0, nfe=10))
    for w in (0.0, 0.5, 1.0):
        wd = {A: 1 - w, B: w}
        for m, k, sec, lam in (("morl", 1.0, 1.0, None), ("mpa", 0.8, 2.0, 1.0), ("soup", 0.3, 1.1, 1.0)):
            for s in SEEDS:
                out.append(dict(method=m, weights=wd, **{"lambda": lam}, prompt="p", seed=s,
                                rewards={A: k * (1 - w) + off[s], B: k * w + off[s]}, seconds=sec,
                                nfe=20 if m == "mpa" else 10))
    for lam in (0.0, 1.0, 2.0):
        for s in SEEDS:
            out.append(dict(method="kla", weights={A: 1.0, B: 0.0}, **{"lambda": lam}, prompt="p", seed=s,
                            rewards={A: 0.5 * lam + off[s], B: -0.1 * lam}, seconds=1.5, nfe=20))
    return out


def test_oracle_fraction_and_cost_by_hand():
    recs = records()
    g = oracle_gain(recs, ["mpa", "soup"], {A: 0.5, B: 0.5})
    assert g["mpa"]["fraction"] == pytest.approx(0.8)
    assert g["soup"]["fraction"] == pytest.approx(0.3)
    # Paired offsets cancel in every bootstrap resample, so the interval collapses on the value.
    assert g["mpa"]["lo"] == pytest.approx(0.8) and g["mpa"]["hi"] == pytest.approx(0.8)
    c = cost_table(recs)
    assert c["mpa"]["ratio"] == pytest.approx(2.0) and c["mpa"]["nfe_ratio"] == pytest.approx(2.0)


def test_summary_means_and_ci():
    rows = {(r["method"], r["lambda"], None if r["weights"] is None else r["weights"][B]): r
            for r in summarize(records())}
    row = rows[("mpa", 1.0, 0.5)]
    vals = [0.4 + 0.1 * (s - 2.5) for s in SEEDS]
    m, h = mean_ci(vals)
    assert row["n"] == 6 and row["mean"][A] == pytest.approx(m) and row["ci"][A] == pytest.approx(h)
    # t_{0.975, 5} = 2.5706; sd of the offsets = 0.1 * sd(0..5) = 0.18708
    assert h == pytest.approx(2.5706 * 0.187083 / math.sqrt(6), rel=1e-4)


def test_fronts_and_hypervolume():
    fr = method_fronts(records(), [A, B], ["mpa", "morl", "soup"])
    ref = fr.pop("__ref__")["ref"]
    # The worst means: r_a = 0 (base, soup at w=1...), r_b = -0.2 (kla at lambda = 2).
    np.testing.assert_allclose(ref, [0.0, -0.2], atol=1e-12)
    # MORL points (1,0), (.5,.5), (0,1); (0,1) is not above ref in r_a, so adds nothing; the
    # staircase of the other two: 1 * (0 + 0.2) + 0.5 * (0.5 - 0).
    hv = 0.2 + 0.25
    assert fr["morl"]["hv"] == pytest.approx(hv)
    assert fr["mpa"]["hv"] < fr["morl"]["hv"] and fr["soup"]["hv"] < fr["mpa"]["hv"]
    assert fr["morl"]["front_mask"].all()


def test_report_builds_from_a_records_file(tmp_path):
    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for r in records():
            w.write(r)
    out = write_report(path, tmp_path / "report", title="Test report")
    text = out.read_text()
    assert text.startswith("# Test report")
    assert "Headline at w = (r_a=0.5, r_b=0.5)" in text
    assert "| DB-MPA |" in text and "0.80 [0.80, 0.80]" in text and "0.30 [0.30, 0.30]" in text
    assert "DB-KLA" in text and (tmp_path / "report" / "pareto.png").stat().st_size > 1000
    assert (tmp_path / "report" / "kla.png").exists()
    assert len(read_records(path)) == len(records())


def test_report_cli(tmp_path):
    from diffblend.cli import main

    path = tmp_path / "records.jsonl"
    with RecordWriter(path) as w:
        for r in records():
            w.write(r)
    assert main(["report", str(path), "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "report.md").exists()
    assert main(["report", str(tmp_path / "missing.jsonl"), "-o", str(tmp_path / "x")]) == 1


def _gain_records(oracle_shift, n=20):
    """Base r = 0; MORL r = shift + noise (sd ~1); MPA exactly half the oracle's reward, image by image."""
    noise = np.random.default_rng(3).normal(size=n)
    noise -= noise.mean()
    out = []
    for s in range(n):
        for m, r in (("base", 0.0), ("morl", oracle_shift + noise[s]), ("mpa", 0.5 * (oracle_shift + noise[s]))):
            out.append(dict(method=m, weights=None if m == "base" else {A: 1.0}, **{"lambda": None}, prompt="p",
                            seed=s, rewards={A: float(r)}, seconds=1.0, nfe=10))
    return out


def test_oracle_gain_interval_is_unbounded_when_the_oracle_gain_is_uncertain():
    # The oracle beats the base by 0.05 with a standard error of ~0.22: many resamples have no
    # oracle gain, where the fraction runs off to -inf (the method's own gain is negative there).
    # Dropping those resamples would report [0.5, 0.5], a certainty the data do not have.
    g = oracle_gain(_gain_records(0.05), ["mpa"], {A: 1.0})["mpa"]
    assert g["fraction"] == pytest.approx(0.5)
    assert g["lo"] == -math.inf and g["hi"] == pytest.approx(0.5)
    # A clear gain: no resample loses it, and the interval is the usual one.
    g = oracle_gain(_gain_records(5.0), ["mpa"], {A: 1.0})["mpa"]
    assert g["lo"] == pytest.approx(0.5) and g["hi"] == pytest.approx(0.5)


def test_oracle_gain_has_no_interval_when_the_oracle_does_not_beat_the_base():
    g = oracle_gain(_gain_records(-0.05), ["mpa"], {A: 1.0})["mpa"]
    assert math.isnan(g["fraction"]) and math.isnan(g["lo"]) and math.isnan(g["hi"])


def test_oracle_gain_of_one_image_has_no_interval():
    g = oracle_gain(_gain_records(5.0, n=1), ["mpa"], {A: 1.0})["mpa"]
    assert g["fraction"] == pytest.approx(0.5) and g["n"] == 1
    assert math.isnan(g["lo"]) and math.isnan(g["hi"])  # not [0.5, 0.5]: one image gives no spread


def test_a_methods_oracle_gain_interval_does_not_depend_on_the_other_methods_asked_for():
    recs = _gain_records(2.0)
    noise = np.random.default_rng(5).normal(size=20)
    recs += [dict(r, method="soup", rewards={A: 0.3 * r["rewards"][A] + noise[r["seed"]]})
             for r in recs if r["method"] == "mpa"]
    alone = oracle_gain(recs, ["soup"], {A: 1.0})["soup"]
    after = oracle_gain(recs, ["mpa", "soup"], {A: 1.0})["soup"]
    assert alone["lo"] < alone["fraction"] < alone["hi"]
    assert (alone["lo"], alone["hi"]) == (after["lo"], after["hi"])


def test_one_section_per_reward_set_whatever_the_order_of_the_weights(tmp_path):
    # Records of a second sweep that named the pair the other way round: the same two rewards.
    recs = records() + [dict(r, method="ls", weights={B: r["weights"][B], A: r["weights"][A]})
                        for r in records() if r["method"] == "mpa"]
    text = build_report(recs, tmp_path)
    assert text.count("## Rewards:") == 1 and "| DB-MPA-LS |" in text


def test_the_per_w_fraction_table_explains_its_blank_cells(tmp_path):
    recs = [r for r in records() if not (r["method"] == "morl" and r["weights"][B] == 1.0)]  # no oracle at w = 1
    text = build_report(recs, tmp_path)
    table = text.split("### Fraction of the oracle's gain at each w")[1].split("###")[0]
    assert "| r_a=0, r_b=1 | n/a | n/a | n/a | n/a |" in table
    assert "n/a where" in table and "no oracle" in table


def test_oracle_gain_base_and_oracle_means_do_not_depend_on_the_methods_asked_for():
    # The base's and the oracle's R are over the images those two share, whichever method comes first
    # (here DB-MPA lacks two images, or has none at w).
    w = {A: 0.5, B: 0.5}
    recs = [r for r in records() if not (r["method"] == "mpa" and r["seed"] < 2)]
    recs = [dict(r, rewards={A: r["rewards"][A] + r["seed"] ** 2, B: r["rewards"][B]})
            if r["method"] in ("base", "morl") else r for r in recs]
    ref = oracle_gain(recs, ["soup"], w)
    for methods in (["mpa", "soup"], ["mpa"], ["ls"]):
        g = oracle_gain(recs, methods, w)
        assert g["base"] == ref["base"] and g["morl"] == ref["morl"] and g["base"]["n"] == len(SEEDS)


def test_oracle_gain_without_resamples_gives_the_fraction_and_no_interval():
    g = oracle_gain(records(), ["mpa"], {A: 0.5, B: 0.5}, n_boot=0)["mpa"]
    assert g["fraction"] == pytest.approx(0.8) and math.isnan(g["lo"]) and math.isnan(g["hi"])


def test_a_confidence_level_outside_0_1_is_refused():
    for bad in (95, 0.0, 1.0):
        with pytest.raises(ValueError, match="level"):
            mean_ci([1.0, 2.0, 3.0], level=bad)
        with pytest.raises(ValueError, match="level"):
            oracle_gain(records(), ["mpa"], {A: 0.5, B: 0.5}, level=bad)
