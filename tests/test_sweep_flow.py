"""``diffblend sweep --noise-level`` on a tiny SD3 pipeline folder (flow matching): the option reaches the
flow SDE (the sampler runs at noise level * eta), is recorded with the records, and is refused for DDIM
models."""

from __future__ import annotations

import warnings

import pytest
from helpers_pipelines import save_random_lora, tiny_sd, tiny_sd3

from diffblend.cli import main
from diffblend.evaluate.records import read_records


@pytest.fixture(scope="module")
def sd3(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny_sd3")
    pipe = tiny_sd3()
    pipe.save_pretrained(folder)  # without its T5
    a = save_random_lora(pipe, folder.parent / "lora_a", seed=1)
    b = save_random_lora(pipe, folder.parent / "lora_b", seed=2)
    return folder, a, b


def _sweep(sd3, out, *extra):
    folder, a, b = sd3
    return main(["sweep", "--model", str(folder), "--adapter", f"boldness={a}", "--adapter", f"jpeg_compressibility={b}",
                 "--score", "boldness", "--rewards", "boldness,jpeg_compressibility", "--methods", "base,mpa",
                 "--weights", "0.5", "--prompts", "a", "--seeds", "2", "--steps", "3", "--guidance-scale", "1",
                 "--no-progress", "-o", str(out), *extra])


def _rewards(out):
    return {(r["method"], r["seed"]): r["rewards"]["boldness"] for r in read_records(out)}


def test_noise_level_reaches_the_flow_sde(sd3, tmp_path):
    """The sampler's noise is noise_level * eta: (a = 0.35, eta = 1) and (a = 0.7, eta = 0.5) draw the same
    images, to float32 round-off (1e-6: 0.35 and 0.7 * 0.5 differ in the last bit at most); a = 0.7 at eta 1
    (the default) draws other images, and a = 0 at eta 1 is the ODE, as eta = 0 is."""
    runs = {}
    for name, extra in {"a035": ["--noise-level", "0.35"], "a07_eta05": ["--noise-level", "0.7", "--eta", "0.5"],
                        "default": [], "ode": ["--noise-level", "0"], "eta0": ["--eta", "0"]}.items():
        assert _sweep(sd3, tmp_path / f"{name}.jsonl", *extra) == 0
        runs[name] = _rewards(tmp_path / f"{name}.jsonl")
    assert set(runs["default"]) == {("base", 0), ("base", 1), ("mpa", 0), ("mpa", 1)}
    for key in runs["default"]:
        assert runs["a035"][key] == pytest.approx(runs["a07_eta05"][key], abs=1e-6)
        assert runs["ode"][key] == pytest.approx(runs["eta0"][key], abs=1e-6)
    assert any(runs["a035"][k] != runs["default"][k] for k in runs["default"])
    assert any(runs["ode"][k] != runs["default"][k] for k in runs["default"])
    assert all(r["run"]["noise_level"] == 0.35 for r in read_records(tmp_path / "a035.jsonl"))
    assert all("noise_level" not in r["run"] for r in read_records(tmp_path / "default.jsonl"))


def test_a_rerun_with_another_noise_level_is_refused(sd3, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert _sweep(sd3, out, "--noise-level", "0.5") == 0
    before = out.read_bytes()
    capsys.readouterr()
    assert _sweep(sd3, out, "--noise-level", "0.6") == 1
    assert "noise_level: 0.5 recorded, 0.6 now" in capsys.readouterr().err and out.read_bytes() == before


def test_ls_without_the_sdes_noise_says_it_is_a_heuristic(sd3):
    from diffblend.evaluate.methods import Setting, generate
    from diffblend.evaluate.pipelines import DiffusersBackend
    from diffblend.generation import load_pipeline

    folder, a, b = sd3
    pipe = load_pipeline(str(folder))
    backend = DiffusersBackend(pipe, {"boldness": a, "jpeg_compressibility": b}, ["boldness"], num_steps=2,
                               guidance_scale=1.0, noise_level=0.0)
    st = Setting.make("ls", {"boldness": 0.5, "jpeg_compressibility": 0.5}, 1.0)
    with pytest.warns(UserWarning, match="stochastic sampler"):
        generate(backend, st, ["a"], [0])
    backend.noise_level = 0.7
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        generate(backend, st, ["a"], [0])
    with pytest.raises(ValueError, match="noise_level"):
        DiffusersBackend(pipe, {}, ["boldness"], noise_level=-0.1)


def test_noise_level_is_refused_for_ddim_models(tmp_path, capsys):
    folder = tmp_path / "sd"
    pipe = tiny_sd(tmp_path)
    pipe.save_pretrained(folder)
    a = save_random_lora(pipe, tmp_path / "a", seed=1)
    for model, extra in (("toy", []), ("default", []), (str(folder), ["--adapter", f"boldness={a}"])):
        rc = main(["sweep", "--model", model, *extra, "--noise-level", "0.5", "--methods", "base", "--weights", "0.5",
                   "--rewards", "boldness,jpeg_compressibility", "--score", "boldness", "--prompts", "a", "--seeds",
                   "1", "--steps", "1", "--no-progress", "-o", str(tmp_path / f"{len(extra)}.jsonl")])
        err = capsys.readouterr().err
        assert rc == 1 and "--noise-level is the flow SDE's" in err and "--eta" in err, err
