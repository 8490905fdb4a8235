"""Calibration manifests (standardised rewards and weighted sums), the `diffblend rewards` command, missing extras."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from diffblend.rewards import get_reward
from diffblend.rewards.calibration import calibrate_images, calibration_stats, load_calibration, save_calibration


def _images(n=6, seed=0):
    return torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))


def test_stats_by_hand_and_roundtrip(tmp_path):
    s = torch.tensor([1.0, 2.0, 4.0, 5.0])
    st = calibration_stats({"boldness": s})["boldness"]
    assert st["mean"] == pytest.approx(3.0) and st["n"] == 4
    assert st["std"] == pytest.approx((10 / 3) ** 0.5)  # sum of squared deviations 4+1+1+4 over n - 1
    path = save_calibration(tmp_path / "calib.json", {"boldness": st}, model="tiny-base")
    assert json.loads(path.read_text())["model"] == "tiny-base" and load_calibration(path)["boldness"] == st


def test_calibrated_reward_and_weighted_sum(tmp_path):
    x = _images()
    stats = calibrate_images(x, ["a"] * 6, ["boldness", "jpeg_compressibility"], batch_size=4)
    path = save_calibration(tmp_path / "calib.json", stats)
    raw_b, _ = get_reward("boldness")(x, ["a"] * 6, None)
    z, info = get_reward("boldness", calibration=path)(x, ["a"] * 6, None)
    torch.testing.assert_close(z, (raw_b - stats["boldness"]["mean"]) / stats["boldness"]["std"])
    torch.testing.assert_close(info["raw"], raw_b)
    assert abs(z.mean().item()) < 1e-5 and z.std().item() == pytest.approx(1.0, abs=1e-5)  # standardised on its own data
    raw_j, _ = get_reward("compressibility")(x, ["a"] * 6, None)
    total, _ = get_reward("boldness=0.25,compressibility=0.75", calibration=str(path))(x, ["a"] * 6, None)
    zj = (raw_j - stats["jpeg_compressibility"]["mean"]) / stats["jpeg_compressibility"]["std"]
    torch.testing.assert_close(total, 0.25 * z + 0.75 * zj)


def test_calibration_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="calibration file"):
        get_reward("boldness", calibration=tmp_path / "none.json")
    (tmp_path / "bad.json").write_text(json.dumps({"rewards": {}}))
    with pytest.raises(ValueError, match="not a reward calibration manifest"):
        get_reward("boldness", calibration=tmp_path / "bad.json")
    path = save_calibration(tmp_path / "c.json", {"legibility": {"mean": 0.0, "std": 1.0, "n": 2}})
    with pytest.raises(ValueError, match="no statistics for reward 'boldness'"):
        get_reward("boldness", calibration=path)
    with pytest.raises(ValueError, match=">= 2 finite scores"):
        calibration_stats({"boldness": torch.tensor([1.0])})


def test_rewards_command_lists_everything(capsys):
    from diffblend.cli import main

    assert main(["rewards"]) == 0
    out = capsys.readouterr().out
    for name in ("clip_score", "pickscore", "aesthetic", "hpsv2", "imagereward", "ocr", "http", "legibility"):
        assert f"\n{name}: " in "\n" + out
    assert "needs rapidocr-onnxruntime" in out


def test_missing_extra_names_the_package(monkeypatch):
    from diffblend.rewards import _loading

    monkeypatch.setitem(sys.modules, "rapidocr_onnxruntime", None)  # import now fails as if not installed
    monkeypatch.setattr(_loading, "_CACHE", {})
    with pytest.raises(ImportError, match="pip install rapidocr-onnxruntime"):
        get_reward("ocr")
