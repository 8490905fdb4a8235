"""Command-line options built from config dataclasses (commands/_options.py), and the options of
``diffblend finetune`` / ``diffblend sweep`` that come from FinetuneConfig, MethodOptions, CoDeConfig and
RGGConfig: one declaration of each default, every field settable."""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass

import pytest

from diffblend._fields import setting
from diffblend.cli import build_parser, main
from diffblend.commands._options import Opt, add_config_options


@dataclass
class Demo:
    name: str = setting("a", "a name")
    count: int = setting(3, "how many")
    scale: float | None = setting(None, "a scale; none: off")
    mode: str | None = setting("x", "the mode", choices=("x", "y"))
    tags: tuple[str, ...] = setting((), "tags")
    pair: tuple[float, float] = setting((0.5, 1.5), "two numbers")
    on: bool = setting(False, "switch on")
    keep: bool = setting(True, "keep it")
    notes: dict = setting(default_factory=dict, help="notes")


def _parse(argv, **kw):
    p = argparse.ArgumentParser(exit_on_error=False)
    opts = add_config_options(p, Demo, **kw)
    args = p.parse_args(argv)
    return opts.values(args), p


def test_defaults_come_from_the_fields():
    values, p = _parse([])
    assert Demo(**values) == Demo()
    text = p.format_help()
    assert "how many (default: 3)" in text and "--no-keep" in text and "(default: 0.5,1.5)" in text


def test_every_type_parses_into_its_field():
    values, _ = _parse(["--name", "b", "--count", "4", "--scale", "0.25", "--mode", "none", "--tags", "p, q",
                        "--pair", "1,2", "--on", "--no-keep", "--notes", "k=v", "--notes", "w=a=b"])
    assert Demo(**values) == Demo("b", 4, 0.25, None, ("p", "q"), (1.0, 2.0), True, False, {"k": "v", "w": "a=b"})
    assert _parse(["--scale", "None"])[0]["scale"] is None


@pytest.mark.parametrize("argv, message", [
    (["--tags", "a,,b"], "--tags 'a,,b' has an empty item"),
    (["--pair", "1"], "--pair '1': expected two"),
    (["--pair", "1,x"], "expected two comma-separated float"),
    (["--notes", "novalue"], "--notes 'novalue' is malformed; expected KEY=VALUE"),
])
def test_bad_values_name_the_option(argv, message):
    with pytest.raises(ValueError, match=message):
        _parse(argv)


def test_flags_renames_skips_and_required():
    values, _ = _parse(["--n", "z", "--demo-count", "7"], prefix="demo_", skip=("notes",),
                       opts={"name": Opt(flag="--n", required=True)})
    assert values["name"] == "z" and values["count"] == 7 and "notes" not in values
    with pytest.raises(ValueError, match="no field"):
        _parse([], skip=("nope",))


def test_argparse_checks_numbers_and_choices():
    p = argparse.ArgumentParser()
    add_config_options(p, Demo)
    for argv in (["--count", "x"], ["--mode", "z"], ["--scale", "big"]):
        with pytest.raises(SystemExit):
            p.parse_args(argv)


# -- diffblend finetune -------------------------------------------------------------------------------

def _finetune_cfg(argv):
    from diffblend.train.config import FinetuneConfig

    args = build_parser().parse_args(["finetune", "--reward", "boldness", "--kl", "0.5", "--run-dir", "r", *argv])
    return FinetuneConfig(**args.config_options.values(args))


def test_every_finetune_config_field_is_an_option_with_the_configs_default():
    from diffblend.train.config import FinetuneConfig

    args = build_parser().parse_args(["finetune", "--reward", "boldness", "--kl", "0.5", "--run-dir", "r"])
    assert set(args.config_options.dests) == {f.name for f in dataclasses.fields(FinetuneConfig)}
    assert _finetune_cfg([]) == FinetuneConfig(reward="boldness", kl=0.5)


def test_finetune_fields_the_cli_could_not_set_before():
    cfg = _finetune_cfg(["--lora-alpha", "8", "--eta", "0.5", "--inner-epochs", "2", "--adv-clip-max", "3",
                         "--weight-decay", "0", "--adam-betas", "0.8,0.99", "--keep-checkpoints", "4",
                         "--extra", "note=first try", "--steps", "7", "--monitor", "legibility,boldness"])
    assert (cfg.lora_alpha, cfg.eta, cfg.inner_epochs, cfg.adv_clip_max, cfg.weight_decay) == (8.0, 0.5, 2, 3.0, 0.0)
    assert cfg.adam_betas == (0.8, 0.99) and cfg.keep_checkpoints == 4 and cfg.extra == {"note": "first try"}
    assert cfg.num_steps == 7 and cfg.monitor == ("legibility", "boldness")


def test_finetune_refuses_a_bad_list_in_one_line_before_any_model(tmp_path, capsys):
    rc = main(["finetune", "--reward", "boldness", "--kl", "1", "--run-dir", str(tmp_path / "r"), "--prompts", "a,,b"])
    err = capsys.readouterr().err
    assert rc == 1 and "--prompts 'a,,b' has an empty item" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "r").exists()


# -- diffblend sweep ----------------------------------------------------------------------------------

def test_sweep_method_options_come_from_the_dataclasses():
    from diffblend.baselines.code import CoDeConfig
    from diffblend.baselines.rgg import RGGConfig
    from diffblend.commands.sweep import method_options
    from diffblend.evaluate.methods import MethodOptions

    parse = build_parser().parse_args
    assert method_options(parse(["sweep"])) == MethodOptions()
    opts = method_options(parse(["sweep", "--eta", "0.5", "--blend-seed", "3", "--code-candidates", "4",
                                 "--code-block", "2", "--rgg-kl", "0.2", "--rgg-norm", "none", "--rgg-gamma", "0"]))
    assert opts == MethodOptions(eta=0.5, blend_seed=3, code=CoDeConfig(num_candidates=4, block_size=2),
                                 rgg=RGGConfig(kl_coeff=0.2, grad_norm=None, tempering_gamma=None))


def test_sweep_records_a_blend_seed_only_when_set(tmp_path):
    from diffblend.commands.sweep import RUN_SETTINGS, run_settings

    parse = build_parser().parse_args
    assert tuple(run_settings(parse(["sweep"]))) == RUN_SETTINGS  # records of older runs stay resumable
    assert run_settings(parse(["sweep", "--blend-seed", "2"]))["blend_seed"] == 2


def test_sweep_blend_seed_changes_ls_only(tmp_path):
    from diffblend.evaluate.records import read_records

    def rewards(seed):
        out = tmp_path / f"r{seed}.jsonl"
        assert main(["sweep", "--model", "toy", "--weights", "0.5", "--methods", "mpa,ls", "--prompts", "a",
                     "--seeds", "2", "--steps", "6", "--blend-seed", str(seed), "--no-progress", "-o", str(out)]) == 0
        return {(r["method"], r["seed"]): r["rewards"] for r in read_records(out)}

    a, b = rewards(0), rewards(5)
    assert all(a[k] == b[k] for k in a if k[0] == "mpa")
    assert any(a[k] != b[k] for k in a if k[0] == "ls")
