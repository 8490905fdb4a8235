"""diffblend calibrate writes a manifest of the base model's reward statistics; generate --calibration uses it."""

import json

import pytest
import torch

from diffblend.cli import main


def test_calibrate_then_generate_prints_standardised_rewards(tmp_path, capsys):
    cal = tmp_path / "cal.json"
    assert main(["calibrate", "--rewards", "jpeg_compressibility,boldness", "--prompts", "3,7", "--num-images", "2",
                 "--steps", "2", "-o", str(cal)]) == 0
    stats = json.loads(cal.read_text())["rewards"]
    assert set(stats) == {"jpeg_compressibility", "boldness"} and all(s["n"] == 4 and s["std"] > 0
                                                                      for s in stats.values())
    # the same images scored by hand: the manifest holds their mean and (Bessel) std
    from diffblend.rewards import get_reward
    from diffblend.zoo.generate import generate, load_blend_pipeline

    images = generate(load_blend_pipeline(None, {}), ["3", "3", "7", "7"], None, seed=0, num_inference_steps=2)
    raw = get_reward("boldness")(images, ["3", "3", "7", "7"], None)[0]
    assert abs(stats["boldness"]["mean"] - float(raw.mean())) < 1e-6
    assert abs(stats["boldness"]["std"] - float(raw.std())) < 1e-6
    capsys.readouterr()
    assert main(["generate", "--prompt", "3", "--prompt", "7", "--num-images", "2", "--steps", "2",
                 "--calibration", str(cal), "-o", str(tmp_path / "g.png")]) == 0
    out = capsys.readouterr().out
    line = next(ln for ln in out.splitlines() if ln.startswith("mean calibrated rewards"))
    assert "legibility" not in line  # not in the manifest
    z = float(line.split("boldness ")[1].split(",")[0])
    assert abs(z) < 1e-3  # the base model's own images (same seeds) have mean z = 0
    assert torch.isfinite(torch.tensor(z))


def test_finetune_and_sweep_use_the_calibration(tmp_path):
    """finetune trains on, and sweep records, the standardised rewards of the manifest."""
    from diffblend.evaluate.records import read_records
    from diffblend.rewards.calibration import save_calibration
    from diffblend.train import resolve_reward

    cal = save_calibration(tmp_path / "cal.json", {"boldness": {"mean": 0.25, "std": 0.05, "n": 10}})
    images = torch.rand(3, 1, 16, 16, generator=torch.Generator().manual_seed(0))
    raw = resolve_reward("boldness")(images, ["1", "2", "3"], None)[0]
    z = resolve_reward("boldness", calibration=str(cal))(images, ["1", "2", "3"], None)[0]
    torch.testing.assert_close(z, (raw - 0.25) / 0.05)
    with pytest.raises(ValueError, match="legibility"):  # not in the manifest: named
        resolve_reward("boldness=0.5,legibility=0.5", calibration=str(cal))

    out = tmp_path / "rec.jsonl"
    assert main(["sweep", "--methods", "base", "--score", "boldness", "--prompts", "3", "--seeds", "2", "--steps",
                 "2", "--calibration", str(cal), "-o", str(out), "--no-progress"]) == 0
    plain = tmp_path / "plain.jsonl"
    assert main(["sweep", "--methods", "base", "--score", "boldness", "--prompts", "3", "--seeds", "2", "--steps",
                 "2", "-o", str(plain), "--no-progress"]) == 0
    for a, b in zip(read_records(out), read_records(plain)):
        assert abs(a["rewards"]["boldness"] - (b["rewards"]["boldness"] - 0.25) / 0.05) < 1e-4
        assert a["run"]["calibration"] == str(cal) and b["run"]["calibration"] is None


def test_a_weighted_reward_spec_takes_model_reward_folders(tmp_path):
    """finetune --reward DIR_A=0.25,DIR_B=0.75 (resolve_reward): folders with a reward.json (a model reward and its
    options) in a weighted spec score w_a r_a + w_b r_b."""
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).parent))
    from helpers_rewards import tiny_clip

    from diffblend.rewards import get_reward
    from diffblend.train import resolve_reward

    a, b = tiny_clip(tmp_path / "clip_a", seed=0), tiny_clip(tmp_path / "clip_b", seed=1)
    (a / "reward.json").write_text(json.dumps({"factory": "clip_score"}))
    (b / "reward.json").write_text(json.dumps({"factory": "pickscore", "options": {"offset": 0.0}}))
    x, prompts = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(0)), ["a cat", "a dog"]
    both = resolve_reward(f"{a}=0.25,{b}=0.75")(x, prompts, None)[0]
    ra = get_reward("clip_score", path=str(a))(x, prompts, None)[0]
    rb = get_reward("pickscore", path=str(b), offset=0.0)(x, prompts, None)[0]
    torch.testing.assert_close(both, 0.25 * ra + 0.75 * rb)
