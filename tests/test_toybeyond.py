"""The beyond-the-paper measurements on the toy (diffblend.toybeyond) and ``diffblend toy --beyond``."""

import json

import pytest

from diffblend.cli import main
from diffblend.toybeyond import BeyondConfig, format_beyond, run_beyond, write_beyond

TINY = dict(num_samples=200, ls_repeats=1, ls_steps=(5,), steps=10, alphas=(1.0,), ws=(0.5,), langevin_steps=(1,),
            particles=(2,), exact_particles=2, ramp_deltas=(0.25,))


def test_run_beyond_tables_and_outputs(tmp_path):
    result = run_beyond(BeyondConfig(**TINY))
    assert [r["draws"] for r in result["ls"]] == ["iid", "stratified", "golden"]
    strat = result["ls"][1]
    assert strat["share_std"] <= 0.1 + 1e-12 < result["ls"][0]["iid_share_std"]  # 5 steps: share within 1/5
    methods = [(r["method"], r["knob"]) for r in result["corrector"]]
    assert methods == [("mpa", 0), ("langevin", 1), ("smc", 2), ("smc_exact", 2)]
    nfe = {m: r["nfe"] for m, r in zip(methods, result["corrector"])}
    assert nfe[("mpa", 0)] == 20 and nfe[("langevin", 1)] == 20 + 2 * 9 and nfe[("smc", 2)] == 40
    assert all(r["ratio"] > 0 for r in result["corrector"] + result["schedule"])
    assert {r["schedule"] for r in result["schedule"]} == {"constant", "ramp corner 0.25", "ramp right 0.25",
                                                           "oracle (toy only)"}
    table = format_beyond(result)
    assert "LS draws" in table and "SMC P=2" in table and "oracle (toy only)" in table
    paths = write_beyond(result, str(tmp_path / "out"))
    with open(paths["json"]) as f:
        assert json.load(f)["corrector"] == result["corrector"]
    with open(paths["png"], "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["beyond.json", "beyond.png"]


def test_cli_toy_beyond(tmp_path, capsys):
    out = tmp_path / "cli"
    assert main(["toy", "--quick", "--beyond", "--num-samples", "100", "--steps", "5", "--output-dir", str(out),
                 "--no-progress"]) == 0
    assert (out / "beyond.json").exists() and (out / "beyond.png").exists() and (out / "toy.json").exists()
    assert "Jensen-gap correctors" in capsys.readouterr().out


def test_config_validation():
    with pytest.raises(ValueError, match="particles must be >= 1"):
        BeyondConfig(particles=(0,))
    with pytest.raises(ValueError, match="steps and ls_steps"):
        BeyondConfig(ls_steps=(0,))
