"""The CLI end to end on the shipped weights (fast settings): train-base, generate, demo, errors."""

import json

import pytest
import torch

from diffblend.cli import main


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two small LoRA adapters for the shipped base (random B, so they differ), saved by diffusers."""
    from peft import LoraConfig
    from peft.utils import get_peft_model_state_dict

    from diffblend.zoo import load_default_pipeline
    from diffblend.zoo.pipeline import DigitsPipeline

    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for k, name in enumerate(("ta", "tb")):
        pipe = load_default_pipeline()
        pipe.unet.add_adapter(LoraConfig(r=2, lora_alpha=2, target_modules=["to_q", "to_k", "to_v", "to_out.0"]))
        g = torch.Generator().manual_seed(k)
        with torch.no_grad():
            for n, p in pipe.unet.named_parameters():
                if "lora_" in n:
                    p.copy_(0.2 * torch.randn(p.shape, generator=g))
        DigitsPipeline.save_lora_weights(folder / name, unet_lora_layers=get_peft_model_state_dict(pipe.unet))
        paths[name] = folder / name / "pytorch_lora_weights.safetensors"
    return paths


def _png(path):
    from PIL import Image

    with Image.open(path) as im:
        return im.size, im.mode


def test_generate_base_and_blend(tmp_path, adapters, capsys):
    out = tmp_path / "base.png"
    assert main(["generate", "--prompt", "7", "--num-images", "2", "--steps", "3", "-o", str(out)]) == 0
    assert _png(out)[1] == "L" and _png(out)[0] == (2 * 64 + 3, 64 + 2)  # 2 images of 16x16 at scale 4, 1 px borders
    assert "mean rewards" in capsys.readouterr().out
    ad = [f"--adapter=ta={adapters['ta']}", f"--adapter=tb={adapters['tb']}"]
    for method in ("mpa", "ls", "soup"):
        out = tmp_path / f"{method}.png"
        rc = main(["generate", "--prompt", "3", "--prompt", "seven", "--num-images", "2", "--steps", "3",
                   "--weights", "ta=0.3,tb=0.7", "--method", method, "--seed", "1", *ad, "-o", str(out)])
        assert rc == 0 and out.is_file()
        assert _png(out)[0] == (2 * 64 + 3, 2 * 64 + 3)


def test_generate_is_reproducible_and_weights_matter(tmp_path, adapters):
    import numpy as np
    from PIL import Image

    ad = [f"--adapter=ta={adapters['ta']}", f"--adapter=tb={adapters['tb']}"]
    common = ["generate", "--num-images", "2", "--steps", "4", "--seed", "3", "--no-scores", *ad]
    paths = [tmp_path / n for n in ("a.png", "b.png", "c.png")]
    main([*common, "--weights", "ta=1,tb=0", "-o", str(paths[0])])
    main([*common, "--weights", "ta=1,tb=0", "-o", str(paths[1])])
    main([*common, "--weights", "ta=0,tb=1", "-o", str(paths[2])])
    a, b, c = (np.asarray(Image.open(p), dtype=np.float32) for p in paths)
    assert np.array_equal(a, b)
    assert np.abs(a - c).mean() > 1.0  # the two adapters give visibly different images (0..255 scale)


@pytest.mark.parametrize("argv, needle", [
    (["--weights", "ta=0.5,nope=0.5"], "not a loaded adapter"),
    (["--weights", "ta=0.5,tb"], "malformed"),
    (["--weights", "ta=0.5,tb=x"], "not a number"),
    (["--weights", "ta=0.7,tb=0.7"], "sum to 1"),
    (["--weights", "ta=0.5,tb=0.5", "--method", "ls", "--kl-strength", "1.5"], "ls"),
    (["--adapter", "broken"], "NAME=PATH"),
    (["--adapter", "x=does/not/exist.safetensors"], "does not exist"),
    (["--eta", "2"], "--eta"),  # eta > 1 made NaN images without a word
    (["--eta", "-0.5"], "--eta"),
    (["--scale", "0"], "--scale"),
    (["--kl-strength", "0.5"], "--weights"),  # without weights it drew the base model, ignoring lambda
    (["--method", "ls"], "--weights"),
    (["--device", "cuda:99"], "--device"),  # an unusable device was an AssertionError traceback
    (["--device", "nonsense"], "not a torch device"),
    (["--prompt", "a cat", "--weights", "ta=1"], None),  # any prompt is accepted by generate
])
def test_generate_errors_are_one_line(tmp_path, adapters, capsys, argv, needle):
    ad = [f"--adapter=ta={adapters['ta']}", f"--adapter=tb={adapters['tb']}"]
    rc = main(["generate", "--num-images", "1", "--steps", "2", "--no-scores", *ad, *argv,
               "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    if needle is None:
        assert rc == 0
        return
    assert rc == 1
    lines = [line for line in err.splitlines() if line.strip() and "%" not in line]  # drop progress bars
    assert len(lines) == 1 and lines[0].startswith("diffblend generate: error:") and needle in lines[0], err


def test_demo_writes_grid_and_table(tmp_path, adapters, capsys):
    out = tmp_path / "demo.png"
    rc = main(["demo", "--adapter", f"ta={adapters['ta']}", "--adapter", f"tb={adapters['tb']}", "--pair", "ta,tb",
               "--columns", "3", "--num-images", "2", "--steps", "3", "--no-progress", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    rows = [line for line in text.splitlines() if line.startswith(("mpa", "ls"))]
    assert len(rows) == 6  # 2 methods x 3 columns
    assert "legibility" in text.splitlines()[0]
    # pure ta (w = 0) gives the same images for MPA and LS (one-hot: LS always draws ta), so the
    # same mean legibility
    mpa0 = float(rows[0].split()[-1])
    ls0 = float(rows[3].split()[-1])
    assert abs(mpa0 - ls0) < 1e-4


def test_demo_refuses_bad_pair(tmp_path, adapters):
    rc = main(["demo", "--adapter", f"ta={adapters['ta']}", "--pair", "ta,zz", "--no-progress",
               "-o", str(tmp_path / "d.png")])
    assert rc == 1


def test_train_base_cli_tiny(tmp_path, capsys):
    run = tmp_path / "run"
    rc = main(["train-base", str(run), "--steps", "2", "--batch-size", "4", "--eval-per-digit", "1", "--no-progress"])
    assert rc == 0
    out = capsys.readouterr().out
    assert "trained 2 steps" in out and "classifier accuracy" in out
    assert json.loads((run / "config.json").read_text())["steps"] == 2
    assert (run / "pipeline" / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # logged at the last step
    ev = json.loads((run / "eval.json").read_text())
    assert ev["images"] == 10 and len(ev["per_digit"]) == 10
    assert main(["train-base", str(run), "--steps", "2", "--no-progress"]) == 1  # run dir in use
    # --resume of the finished run: nothing to train, no error (it failed formatting a None loss)
    capsys.readouterr()
    assert main(["train-base", str(run), "--steps", "2", "--batch-size", "4", "--eval-per-digit", "0",
                 "--no-progress", "--resume"]) == 0, capsys.readouterr().err


def test_generate_on_a_model_folder(tmp_path, adapters, capsys):
    from diffblend.zoo import weights_dir

    out = tmp_path / "m.png"
    rc = main(["generate", "--model", str(weights_dir("base")), "--adapter", f"ta={adapters['ta']}",
               "--weights", "ta=1", "--num-images", "1", "--steps", "2", "-o", str(out)])
    assert rc == 0 and out.is_file()
    assert main(["generate", "--model", str(tmp_path / "missing"), "-o", str(out)]) == 1
    assert "not a diffusers pipeline folder" in capsys.readouterr().err


def test_weight_names_accept_reward_aliases():
    from diffblend.zoo.generate import resolve_weight_names

    names = ["jpeg_compressibility", "legibility"]
    assert resolve_weight_names({"compressibility": 0.3, "legibility": 0.7}, names) == {
        "jpeg_compressibility": 0.3, "legibility": 0.7}
    with pytest.raises(ValueError, match="twice"):
        resolve_weight_names({"compressibility": 0.5, "jpeg_compressibility": 0.5}, names)
    with pytest.raises(ValueError, match="not a loaded adapter"):
        resolve_weight_names({"boldness": 1.0}, names)


def test_shipped_adapters_leave_out_the_morl_oracles_unless_asked():
    from diffblend.zoo.generate import shipped_adapters

    single, every = shipped_adapters(), shipped_adapters(include_oracles=True)
    if not every:
        pytest.skip("no shipped adapters in this checkout yet")
    assert set(single) <= set(every) and all(p.is_file() for p in every.values())
    assert not any(name.startswith("morl") for name in single)


@pytest.mark.parametrize("argv", [
    ["train-base", "RUN", "--device", "nonsense", "--steps", "1", "--eval-per-digit", "0", "--no-progress"],
    ["demo", "--device", "cuda:99", "--no-progress"],
    ["sweep", "--device", "nonsense", "--no-progress", "-o", "OUT/records.jsonl"],
])
def test_bad_device_is_one_line(tmp_path, capsys, argv):
    argv = [a.replace("RUN", str(tmp_path / "run")).replace("OUT", str(tmp_path)) for a in argv]
    rc = main([*argv, "-o", str(tmp_path / "out.png")] if argv[0] == "demo" else argv)
    err = capsys.readouterr().err
    assert rc == 1 and len(err.strip().splitlines()) == 1 and "--device" in err, err


def test_sweep_threads_option_is_applied(tmp_path, monkeypatch, capsys):
    import torch

    seen = []
    monkeypatch.setattr(torch, "set_num_threads", seen.append)
    out = str(tmp_path / "records.jsonl")
    # a bad --methods stops the sweep right after the options are applied
    assert main(["sweep", "--threads", "3", "--methods", "nope", "--no-progress", "-o", out]) == 1
    assert seen == [3]
    assert main(["sweep", "--methods", "nope", "--no-progress", "-o", out]) == 1
    assert seen == [3]  # 0 (the default): torch's own choice, untouched
    assert main(["sweep", "--threads", "-1", "--no-progress", "-o", out]) == 1
    assert "--threads must be >= 1" in capsys.readouterr().err


def test_demo_refuses_zero_steps_in_one_line(tmp_path, adapters, capsys):
    rc = main(["demo", "--adapter", f"ta={adapters['ta']}", "--adapter", f"tb={adapters['tb']}", "--pair", "ta,tb",
               "--steps", "0", "--no-progress", "-o", str(tmp_path / "d.png")])
    err = capsys.readouterr().err
    assert rc == 1 and "--steps must be an integer >= 1" in err and len(err.strip().splitlines()) == 1, err


def test_an_output_path_that_is_a_folder_is_one_line(tmp_path, capsys):
    rc = main(["generate", "--num-images", "1", "--steps", "1", "--no-scores", "-o", str(tmp_path)])
    err = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip() and "%" not in ln]
    assert rc == 1 and len(err) == 1 and err[0].startswith("diffblend generate: error:"), err


def test_sweep_on_the_toy_defaults_to_its_pair_of_rewards(tmp_path, capsys):
    # the help says --rewards defaults to the model's pair; the toy has one (it asked for jpeg_compressibility)
    rc = main(["sweep", "--model", "toy", "--methods", "nope", "--no-progress", "-o", str(tmp_path / "r.jsonl")])
    err = capsys.readouterr().err
    assert rc == 1 and "method must be one of" in err, err


def test_generate_with_a_prompt_legibility_cannot_score(tmp_path, capsys):
    """The image is written and the rewards that apply are printed; legibility (which needs a digit in
    the prompt) is reported as not applicable instead of failing the command after the image was made."""
    out = tmp_path / "cat.png"
    rc = main(["generate", "--prompt", "a cat", "--num-images", "1", "--steps", "2", "-o", str(out)])
    text = capsys.readouterr().out
    assert rc == 0 and out.is_file()
    assert "jpeg_compressibility" in text and "legibility n/a" in text, text
