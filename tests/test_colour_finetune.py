"""Reward-filtered fine-tuning of the colour model (zoo/colour/finetune.py): the candidates, the best-of-n choice,
the adapter file, resume, bad settings."""

import json
import math

import pytest
import torch

from diffblend.zoo.colour.data import COLOURS, parse_prompt
from diffblend.zoo.colour.finetune import FilteredConfig, draw_candidates, finetune_filtered, keep_best


def test_candidates_share_their_prompt_and_vary_in_what_it_leaves_open():
    images, prompts = draw_candidates(6, 4, torch.Generator().manual_seed(0), size_prob=0.5)
    assert images.shape == (24, 3, 32, 32) and len(prompts) == 24
    assert 0.0 <= float(images.min()) and float(images.max()) <= 1.0
    for i in range(6):
        group = prompts[4 * i:4 * i + 4]
        assert len(set(group)) == 1  # one prompt per group of candidates
        named = parse_prompt(group[0])
        assert {"shape", "colour"} <= set(named) <= {"shape", "colour", "size"}
        imgs = images[4 * i:4 * i + 4]
        assert float((imgs[0] - imgs[1:]).abs().amax()) > 0.05  # the background (or saturation) differs
    for prob, named in ((0.0, False), (1.0, True)):
        _, ps = draw_candidates(8, 2, torch.Generator().manual_seed(1), size_prob=prob)
        assert all(("size" in parse_prompt(p)) == named for p in ps)


def test_candidates_keep_the_named_colour_off_the_background():
    """The renderer's rule (the shape's colour != the background's) holds after the prompt's colour is set."""
    g = torch.Generator().manual_seed(3)
    images, prompts = draw_candidates(40, 4, g, size_prob=0.0)
    corner = images[:, :, 0, 0]  # a background pixel (the shape sits near the centre)
    for p, c in zip(prompts, corner):
        name = COLOURS[parse_prompt(p)["colour"]]
        if name in ("red", "green", "blue"):  # saturated primaries: a background of that hue would show it
            k = ("red", "green", "blue").index(name)
            others = [j for j in range(3) if j != k]
            assert not (c[k] > 0.6 and all(c[j] < 0.25 for j in others)), (p, c.tolist())


def test_keep_best_picks_each_groups_maximum_and_skips_nan():
    s = torch.tensor([0.1, 0.5, 0.2, float("nan"), -1.0, -2.0, 3.0, 3.5, 1.0])
    assert keep_best(s, 3).tolist() == [1, 4, 7]
    with pytest.raises(ValueError, match="scores must be"):
        keep_best(s[:8], 3)


@pytest.mark.parametrize("kw, match", [
    (dict(reward="colourfulness=0.5,jpeg_compressibility=0.5"), "--calibration"),
    (dict(reward="colourfulness", steps=0), "steps must be"),
    (dict(reward="colourfulness", candidates=1.5), "candidates must be"),
    (dict(reward="colourfulness", lr=float("nan")), "lr must be"),
    (dict(reward="colourfulness", prompt_dropout=2.0), "prompt_dropout must be"),
])
def test_bad_settings_are_named(kw, match, tmp_path):
    with pytest.raises(ValueError, match=match):
        finetune_filtered(FilteredConfig(**kw), tmp_path / "run", tmp_path / "a.safetensors")


def _tiny_cfg(**kw):
    return FilteredConfig(reward="colourfulness", steps=4, batch_size=2, candidates=2, checkpoint_every=1, log_every=1,
                          **kw)


def test_a_resumed_run_ends_where_an_uninterrupted_one_does_and_diffusers_reads_the_file(tmp_path):
    from diffblend.generation import load_pipeline
    from diffblend.train.lora import load_lora_file
    from diffblend.zoo import weights_dir

    torch.set_num_threads(1)
    base = str(weights_dir("colour_base"))
    whole = finetune_filtered(_tiny_cfg(), tmp_path / "a", tmp_path / "a.safetensors", pipe=load_pipeline(base),
                              progress=False)
    assert whole["steps"] == 4 and (tmp_path / "a.safetensors").is_file()
    part = finetune_filtered(_tiny_cfg(), tmp_path / "b", tmp_path / "b.safetensors", pipe=load_pipeline(base),
                             progress=False, stop_after=2)
    assert part["adapter"] is None and not (tmp_path / "b.safetensors").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        finetune_filtered(_tiny_cfg(), tmp_path / "b", tmp_path / "b.safetensors", pipe=load_pipeline(base))
    with pytest.raises(ValueError, match="settings differ"):
        finetune_filtered(_tiny_cfg(lr=1e-2), tmp_path / "b", tmp_path / "b.safetensors", pipe=load_pipeline(base),
                          resume=True)
    with open(tmp_path / "b" / "metrics.jsonl", "a") as f:  # a row the killed run logged after its checkpoint
        f.write(json.dumps({"step": 3, "loss": 0.0, "kept": 0.0, "all": 0.0, "seconds": 0.0}) + "\n")
    finetune_filtered(_tiny_cfg(), tmp_path / "b", tmp_path / "b.safetensors", pipe=load_pipeline(base),
                      resume=True, progress=False)
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    finetune_filtered(_tiny_cfg(), tmp_path / "b", tmp_path / "b.safetensors", pipe=load_pipeline(base),
                      resume=True, progress=False)  # a finished run: the file again, the summary kept
    assert json.loads((tmp_path / "b" / "summary.json").read_text()) == summary
    a, _ = load_lora_file(tmp_path / "a.safetensors")
    b, _ = load_lora_file(tmp_path / "b.safetensors")
    assert a.keys() == b.keys() and any(float(v.abs().max()) > 0 for k, v in a.items() if "lora_B" in k)
    for k in a:  # same steps, same draws: the same adapter (up to float summation order)
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    rows = [json.loads(line) for line in (tmp_path / "b" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]  # the stale row 3 was dropped, not kept beside the new one
    assert all(r["kept"] >= r["all"] - 1e-6 and r["loss"] > 0 and math.isfinite(r["loss"]) for r in rows)  # the best of each group

    pipe = load_pipeline(base)  # diffusers' own loader reads the file
    pipe.load_lora_weights(str(tmp_path / "a.safetensors"), adapter_name="a")
    assert any("lora" in n for n, _ in pipe.unet.named_parameters())


def test_the_finetune_command_runs_the_filtered_trainer_with_the_same_result(tmp_path, capsys):
    """``diffblend finetune --algorithm filtered`` maps its settings onto this trainer: the same adapter as a
    direct call with those settings (epochs = steps, prompts per epoch = prompts per step, samples = candidates)."""
    from diffblend.cli import main
    from diffblend.train.lora import load_lora_file

    torch.set_num_threads(1)
    args = ["finetune", "--algorithm", "filtered", "--model", "colour", "--reward", "colourfulness", "--kl", "0",
            "--epochs", "3", "--prompts-per-epoch", "2", "--samples-per-prompt", "3", "--weight-decay", "0",
            "--lr", "1e-2", "--seed", "4", "--run-dir", str(tmp_path / "cli"), "--no-progress"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert "reward of the kept scenes" in out and "(3 epochs" in out
    cfg = FilteredConfig(reward="colourfulness", steps=3, batch_size=2, candidates=3, lr=1e-2, seed=4,
                         checkpoint_every=5)
    finetune_filtered(cfg, tmp_path / "direct", tmp_path / "direct.safetensors", progress=False)
    assert json.loads((tmp_path / "cli" / "config.json").read_text()) == json.loads(
        (tmp_path / "direct" / "config.json").read_text())
    a, _ = load_lora_file(tmp_path / "cli" / "adapter.safetensors")
    b, _ = load_lora_file(tmp_path / "direct.safetensors")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


@pytest.mark.parametrize("extra, match", [
    (["--kl", "1"], "kl must be 0"),
    (["--kl", "0", "--eta", "0.5"], "eta must be left at its default"),
    (["--kl", "0", "--prompts", "a red circle"], "prompts must be left at its default"),
    (["--kl", "0", "--model", "digits"], "model must be an embedded model with a scene renderer"),
])
def test_the_finetune_command_names_what_filtered_does_not_take(extra, match, tmp_path, capsys):
    from diffblend.cli import main

    code = main(["finetune", "--algorithm", "filtered", "--reward", "colourfulness", "--run-dir",
                 str(tmp_path / "r"), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert code == 1 and match in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "r").exists()
