"""The shipped colour model as an embedded model: registered by name, with its adapters, through the CLI."""

import json

import pytest
import torch

from diffblend.cli import main
from diffblend.registry import default_model, embedded_models

pytestmark = pytest.mark.skipif("colour" not in embedded_models(), reason="the colour model's weights are not shipped")


def test_colour_is_registered_with_its_prompts_pair_and_adapters():
    m = default_model("colour")
    assert m.demo_pair is not None and len(m.prompts) >= 4 and m.guidance_scale == 3.0
    files = m.adapters(True)
    assert set(m.demo_pair) <= set(files)
    manifest = json.loads((m.adapters_dir / "manifest.json").read_text())["adapters"]
    assert set(manifest) == set(files)  # every shipped file is described, nothing else
    assert (m.adapters_dir / "calibration.json").is_file()


def test_generate_and_demo_run_on_the_colour_model(tmp_path, capsys):
    out = tmp_path / "g.png"
    pair = ",".join(default_model("colour").demo_pair)
    assert main(["generate", "--model", "colour", "--num-images", "2", "--steps", "2", "--weights",
                 pair.replace(",", "=0.5,") + "=0.5", "-o", str(out)]) == 0
    text = capsys.readouterr().out
    assert out.is_file() and "mean rewards" in text and "prompt_alignment" in text
    demo = tmp_path / "d.png"
    assert main(["demo", "--model", "colour", "--num-images", "2", "--columns", "2", "--steps", "2",
                 "--methods", "mpa", "--no-progress", "-o", str(demo)]) == 0
    assert demo.is_file()


def test_colour_pipeline_is_rgb_and_predicts_v():
    from diffblend.generation import load_pipeline

    pipe = load_pipeline("colour")
    assert pipe.unet.config.in_channels == 3 and pipe.scheduler.config.prediction_type == "v_prediction"
    with torch.no_grad():
        img = pipe(["a red circle"], num_inference_steps=2, output_type="pt",
                   generator=[torch.Generator().manual_seed(0)]).images
    assert img.shape == (1, 3, 32, 32) and torch.isfinite(img).all()


def test_embedded_models_by_name_and_the_default_switch():
    from diffblend.generation import embedded_model, embedded_name
    from diffblend.registry import use_default_model

    assert embedded_models()[0] == default_model().name  # the default first
    assert embedded_name("colour") == "colour" and embedded_name("no-such") is None
    assert embedded_model("digits").name == "digits" and embedded_model("/a/folder") is None
    with pytest.raises(LookupError, match="no embedded model 'nope'; embedded models: "):
        default_model("nope")
    previous = use_default_model("colour")
    try:
        assert default_model().name == "colour" and embedded_model(None).name == "colour"
    finally:
        use_default_model(previous)
    assert default_model().name == previous


def test_evaluate_runs_on_the_colour_model_with_its_defaults(tmp_path, capsys):
    """python -m diffblend.train.evaluate on the colour model (its conditioning is a dict, its defaults the
    model's prompts, demo pair and reported reward): one image per prompt, 2 steps, a shipped adapter."""
    import json

    from diffblend.registry import default_model
    from diffblend.train.evaluate import main as evaluate_main

    d = default_model("colour").adapters_dir
    out = tmp_path / "e.json"
    assert evaluate_main(["--model", "colour", "--adapter", f"c={d / 'colourfulness.safetensors'}", "--per-prompt",
                          "1", "--steps", "2", "--calibration", str(d / "calibration.json"), "-o", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["settings"]["rewards"] == [*default_model("colour").demo_pair, "prompt_alignment"]
    assert res["settings"]["guidance_scale"] == 3.0 and len(res["settings"]["prompts"]) == 10
    assert set(res["results"]) == {"base", "c"} and res["results"]["c"]["kl_path"] > 0
    assert "base sd units" in capsys.readouterr().out
