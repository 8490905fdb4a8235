"""``diffblend finetune`` end to end on a tiny digits pipeline saved to a folder (fast settings)."""

from __future__ import annotations

import json

import pytest

from diffblend.cli import main


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    zoo_model = pytest.importorskip("diffblend.zoo.model")
    folder = tmp_path_factory.mktemp("tiny_digits")
    zoo_model.build_pipeline(seed=0, channels=(8, 16, 16)).save_pretrained(folder)
    return folder


def test_finetune_command_trains_saves_and_resumes(tiny_model, tmp_path, capsys):
    from diffblend.zoo.generate import load_pipeline

    run = tmp_path / "run"
    args = ["finetune", "--model", str(tiny_model), "--reward", "boldness", "--kl", "0.1", "--run-dir", str(run),
            "--epochs", "2", "--prompts-per-epoch", "1", "--samples-per-prompt", "2", "--steps", "3",
            "--minibatch-size", "2", "--checkpoint-every", "1", "--prompts", "3,7", "--no-progress"]
    assert main(["finetune", *args[1:-3], "--no-progress"]) == 1  # a folder has no default prompts
    assert "--prompts" in capsys.readouterr().err
    assert main(args) == 0
    assert "adapter:" in capsys.readouterr().out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["reward"] == "boldness" and cfg["kl"] == 0.1 and cfg["model"] == str(tiny_model)
    rows = [json.loads(ln) for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    # the adapter loads with the pipeline's own LoRA loader
    pipe = load_pipeline(str(tiny_model))
    pipe.load_lora_weights(str(run / "adapter.safetensors"), adapter_name="boldness")
    assert "boldness" in pipe.unet.peft_config
    # --resume of a finished run with more epochs continues from epoch 2
    assert main([*args[:args.index("--epochs") + 1], "3", *args[args.index("--epochs") + 2:], "--resume"]) == 0
    rows = [json.loads(ln)["epoch"] for ln in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows == [0, 1, 2]


@pytest.mark.parametrize("reward, message", [
    ("no_such_reward", "unknown reward 'no_such_reward'"),
    ("legibility=0.5,boldness", "malformed"),
    ("legibility=0.5,boldness=0.2", "sum to 1"),
])
def test_finetune_command_refuses_bad_rewards_in_one_line(tmp_path, capsys, reward, message):
    code = main(["finetune", "--reward", reward, "--kl", "1", "--run-dir", str(tmp_path / "r"), "--no-progress"])
    err = capsys.readouterr().err
    assert code == 1 and message in err and len(err.strip().splitlines()) == 1
