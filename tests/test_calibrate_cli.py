"""diffblend calibrate writes a manifest of the base model's reward statistics; generate --calibration uses it."""

import json

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
