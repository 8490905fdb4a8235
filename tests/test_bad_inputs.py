"""Bad input gets one clear error naming the argument (CLI: one line naming the flag; API: ValueError /
TypeError naming the keyword), never a traceback and never a silently different result (issue 8, item 4)."""

import json
import warnings

import pytest
import torch

from diffblend.cli import main
from diffblend.core.blend import Blend
from diffblend.evaluate.records import read_records

from helpers_pipelines import save_random_lora, tiny_sd


def _err(capsys, argv):
    """Run the CLI; return (exit code, stderr), asserting the error is one line without a traceback."""
    rc = main(argv)
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return rc, err


# -- the API ----------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def bp(tmp_path_factory):
    from diffblend.pipeline import BlendPipeline

    d = tmp_path_factory.mktemp("sd")
    pipe = tiny_sd(d)
    files = {n: save_random_lora(pipe, d / n, seed=i + 1) for i, n in enumerate(("a", "b"))}
    return BlendPipeline(pipe, files)


def _kw(**extra):
    return dict(prompt="a cat", num_inference_steps=2, height=16, width=16, output_type="latent",
                generator=torch.Generator().manual_seed(0), **extra)


def test_a_misspelled_pipeline_keyword_is_a_type_error_naming_it(bp):
    with pytest.raises(TypeError, match=r"'num_inference_step'.*did you mean 'num_inference_steps'"):
        bp(weights={"a": 1.0}, **_kw(num_inference_step=2))
    with pytest.raises(TypeError, match="'colour'"):
        bp(weights=None, **_kw(colour="red"))


@pytest.mark.parametrize("n", [0, -1, 1.5])
def test_num_images_per_prompt_must_be_a_positive_int(bp, n):
    with pytest.raises(ValueError, match="num_images_per_prompt must be an integer >= 1"):
        bp(weights={"a": 1.0}, **_kw(num_images_per_prompt=n))


@pytest.mark.parametrize("scale", [float("nan"), -2.0, float("inf")])
def test_guidance_scale_must_be_finite_and_non_negative(bp, scale):
    with pytest.raises(ValueError, match="guidance_scale must be a finite number >= 0"):
        bp(weights={"a": 1.0}, **_kw(guidance_scale=scale))


@pytest.mark.parametrize("weights", [0.5, "a=1", b"a"])
def test_weights_of_the_wrong_type_are_a_type_error_naming_weights(bp, weights):
    with pytest.raises(TypeError, match="weights must be a dict"):
        bp(weights=weights, **_kw())
    with pytest.raises(TypeError, match="weights must be a dict"):
        Blend.create(weights, ["a", "b"])


def test_blend_create_with_none_weights_says_what_is_allowed():
    with pytest.raises(TypeError, match="weights must be a dict .* got NoneType"):
        Blend.create(None, ["a"])


def test_kl_strength_above_the_papers_range_warns_and_within_it_does_not():
    with pytest.warns(UserWarning, match=r"kl_strength \(lambda\) = 1e\+06 is above 2"):
        Blend.create({"a": 1.0}, kl_strength=1e6)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        Blend.create({"a": 1.0}, kl_strength=2.0)


# -- the CLI ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,message", [
    ("--guidance-scale", "nan", "--guidance-scale must be a finite number >= 0"),
    ("--guidance-scale", "-3", "--guidance-scale must be a finite number >= 0"),
    ("--seed", "99999999999999999999", "--seed must be in [0, "),
    ("--seed", "-1", "--seed must be in [0, "),
    ("--num-images", "0", "--num-images must be an integer >= 1"),
])
def test_generate_refuses_bad_numbers_in_one_line(tmp_path, capsys, flag, value, message):
    rc, err = _err(capsys, ["generate", flag, value, "--steps", "2", "-o", str(tmp_path / "x.png")])
    assert rc == 1 and message in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "x.png").exists()


def test_generate_warns_in_one_line_about_a_huge_kl_strength(tmp_path, capsys):
    rc = main(["generate", "--weights", "legibility=1", "--kl-strength", "1e6", "--num-images", "1", "--steps", "1",
               "--no-scores", "-o", str(tmp_path / "x.png")])
    err = capsys.readouterr().err
    assert rc == 0
    assert "diffblend generate: warning: kl_strength (lambda) = 1e+06 is above 2" in err


def test_an_output_path_that_is_a_folder_is_named_not_a_temp_file(tmp_path, capsys):
    folder = tmp_path / "out.png"
    folder.mkdir()
    rc, err = _err(capsys, ["generate", "--num-images", "1", "--steps", "1", "--no-scores", "-o", str(folder)])
    assert rc == 1 and f"-o '{folder}' is a folder" in err and ".tmp" not in err
    from diffblend._io import atomic_write_text

    with pytest.raises(IsADirectoryError, match="is a folder"):  # the library's writes say so too
        atomic_write_text(folder, "x")


def test_output_format_follows_the_extension_or_is_refused(tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "grid.jpg"
    assert main(["generate", "--num-images", "1", "--steps", "1", "--no-scores", "-o", str(out)]) == 0
    with Image.open(out) as im:
        assert im.format == "JPEG"
    rc, err = _err(capsys, ["generate", "--num-images", "1", "--steps", "1", "-o", str(tmp_path / "grid.xyz")])
    assert rc == 1 and "-o" in err and "extension must name an image format" in err
    rc, err = _err(capsys, ["demo", "--columns", "2", "--num-images", "1", "--steps", "1", "-o",
                            str(tmp_path / "demo.txt")])
    assert rc == 1 and "extension must name a figure format" in err


def test_an_adapter_named_like_a_shipped_one_needs_the_override_flag(tmp_path, capsys):
    from diffblend.zoo.generate import shipped_adapters

    shipped = shipped_adapters()
    other = shipped["jpeg_compressibility"]
    rc, err = _err(capsys, ["generate", "--adapter", f"legibility={other}", "--weights", "legibility=1",
                            "--num-images", "1", "--steps", "1", "-o", str(tmp_path / "x.png")])
    assert rc == 1 and "would replace the shipped adapter 'legibility'" in err and "--replace-shipped" in err
    assert main(["generate", "--adapter", f"legibility={other}", "--replace-shipped", "--weights", "legibility=1",
                 "--num-images", "1", "--steps", "1", "--no-scores", "-o", str(tmp_path / "x.png")]) == 0


def test_the_pickle_opt_in_exists_on_the_cli(tmp_path, capsys):
    from safetensors.torch import load_file

    from diffblend.zoo.generate import shipped_adapters

    pt = tmp_path / "leg.pt"
    torch.save(load_file(str(shipped_adapters()["legibility"])), pt)
    rc, err = _err(capsys, ["generate", "--adapter", f"mine={pt}", "--weights", "mine=1", "--num-images", "1",
                            "--steps", "1", "-o", str(tmp_path / "x.png")])
    assert rc == 1 and "pickle" in err and "--allow-pickle" in err
    assert main(["generate", "--adapter", f"mine={pt}", "--allow-pickle", "--weights", "mine=1", "--num-images",
                 "1", "--steps", "1", "--no-scores", "-o", str(tmp_path / "x.png")]) == 0


def test_finetune_run_dir_that_is_a_file_and_resume_without_checkpoint(tmp_path, capsys):
    f = tmp_path / "run"
    f.write_text("not a folder")
    base = ["finetune", "--reward", "boldness", "--kl", "0.05", "--epochs", "1", "--steps", "2", "--no-progress"]
    rc, err = _err(capsys, [*base, "--run-dir", str(f)])
    assert rc == 1 and "is a file, not a folder" in err
    rc, err = _err(capsys, [*base, "--run-dir", str(tmp_path / "new"), "--resume"])
    assert rc == 1 and "has no checkpoint to continue from" in err and "drop --resume" in err
    assert not (tmp_path / "new" / "adapter.safetensors").exists()


def test_sweep_records_carry_their_settings_and_a_rerun_with_others_is_refused(tmp_path, capsys):
    out = tmp_path / "rec.jsonl"

    def sweep(steps=4, seeds=2):
        return ["sweep", "--model", "toy", "--weights", "0,1", "--methods", "base,mpa", "--prompts", "a", "--seeds",
                str(seeds), "--steps", str(steps), "-o", str(out), "--no-progress"]

    assert main(sweep()) == 0
    before = out.read_bytes()
    recs = read_records(out)
    assert len(recs) == 6 and all(r["run"]["steps"] == 4 and r["run"]["model"] == "toy" for r in recs)
    capsys.readouterr()
    rc, err = _err(capsys, sweep(steps=5))
    assert rc == 1 and "steps: 4 recorded, 5 now" in err and "another records file" in err
    assert out.read_bytes() == before  # nothing lost, nothing added
    assert main(sweep(seeds=3)) == 0  # more seeds under the same settings: resumed
    assert len(read_records(out)) == 9


def test_records_without_settings_resume_with_a_warning(tmp_path):
    from diffblend.evaluate.sweep import check_run_settings

    out = tmp_path / "old.jsonl"
    out.write_text(json.dumps({"method": "base", "weights": None, "lambda": None, "prompt": "a", "seed": 0,
                               "rewards": {"r": 1.0}, "seconds": 0.1}) + "\n")
    with pytest.warns(UserWarning, match="predate recorded settings"):
        check_run_settings(out, {"steps": 4})


def test_an_incompatible_transformers_peft_pair_is_one_message_naming_both(monkeypatch, tmp_path, capsys):
    import transformers.integrations.peft as tpeft

    from diffblend import versions

    real = versions.installed
    monkeypatch.setattr(versions, "installed", lambda name: "0.21.2" if name == "peft" else real(name))
    monkeypatch.setattr(tpeft, "MIN_PEFT_VERSION", "0.22.0")
    with pytest.raises(versions.IncompatibleStack, match=r"transformers .* needs peft >= 0\.22\.0, but peft 0\.21\.2"):
        versions.check_stack()
    rc, err = _err(capsys, ["generate", "--weights", "legibility=1", "--num-images", "1", "--steps", "1",
                            "-o", str(tmp_path / "x.png")])
    assert rc == 1 and "needs peft >= 0.22.0" in err and "requirements/lock.txt" in err
    monkeypatch.setattr(tpeft, "MIN_PEFT_VERSION", "0.13.0")
    versions.check_stack()  # a compatible pair passes
