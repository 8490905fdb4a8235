"""The accelerate launch configs under configs/accelerate/ (DDP, DeepSpeed ZeRO-2), read by accelerate's own code.

deepspeed itself is not installed here, so these tests stop where ``accelerate launch`` would spawn the processes:
the YAML goes through accelerate's config loader and its launch-argument validation, the environment it would
hand to the processes is built by its own ``prepare_*_env``, and under that environment the ``DeepSpeedPlugin``
that ``Accelerator()`` would create is built and checked.
"""

from pathlib import Path

import pytest

from accelerate.commands.config.config_args import load_config_from_file
from accelerate.commands.launch import _validate_launch_command, launch_command_parser
from accelerate.utils import DeepSpeedPlugin, DistributedType
from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

ROOT = Path(__file__).resolve().parents[1]
CONFIGS = ROOT / "configs" / "accelerate"
FINETUNE = ["-m", "diffblend.cli", "finetune", "--reward", "jpeg_compressibility", "--kl", "0.1", "--run-dir", "run"]


def _launch_args(config: Path):
    """accelerate launch's parsed and validated arguments for ``--config_file config ... finetune``."""
    args = launch_command_parser().parse_args(["--config_file", str(config), *FINETUNE])
    return _validate_launch_command(args)


def _deepspeed_env(config: Path) -> dict[str, str]:
    """The ACCELERATE_* environment ``accelerate launch`` gives each process for a DeepSpeed config
    (the steps of accelerate's ``launch_command`` before ``deepspeed_launcher`` spawns them)."""
    args, defaults, mp_from_config = _launch_args(config)
    assert args.use_deepspeed
    fields = list(defaults.deepspeed_config) + (["mixed_precision"] if mp_from_config else [])
    args.deepspeed_fields_from_accelerate_config = ",".join(fields)
    _, env = prepare_deepspeed_cmd_env(args)
    return {k: v for k, v in env.items() if k.startswith("ACCELERATE_")}


@pytest.fixture
def deepspeed_plugin(monkeypatch):
    """A factory: the DeepSpeedPlugin that Accelerator() builds in a process launched with the ZeRO-2 config."""
    monkeypatch.chdir(ROOT)  # the YAML names the JSON relative to the repository root, where the docs launch from
    for k, v in _deepspeed_env(CONFIGS / "deepspeed_zero2.yaml").items():
        monkeypatch.setenv(k, v)
    return DeepSpeedPlugin


@pytest.mark.parametrize("name, kind", [("ddp.yaml", DistributedType.MULTI_GPU),
                                        ("deepspeed_zero2.yaml", DistributedType.DEEPSPEED)])
def test_configs_load_through_accelerates_loader(name, kind):
    cfg = load_config_from_file(str(CONFIGS / name))
    assert cfg.distributed_type == kind
    assert (cfg.num_processes, cfg.num_machines, cfg.gpu_ids, cfg.use_cpu) == (2, 1, "all", False)


def test_ddp_config_launches_two_bf16_processes():
    args, _, _ = _launch_args(CONFIGS / "ddp.yaml")
    assert args.multi_gpu and not args.use_deepspeed
    env = prepare_multi_gpu_env(args)
    assert args.nproc_per_node == "2" and env["ACCELERATE_MIXED_PRECISION"] == "bf16"


def test_deepspeed_zero2_config_as_the_launched_processes_see_it(deepspeed_plugin):
    cfg = load_config_from_file(str(CONFIGS / "deepspeed_zero2.yaml"))
    assert cfg.num_processes == 2
    plugin = deepspeed_plugin()
    assert plugin.zero_stage == 2 and plugin.offload_optimizer_device == "none"
    assert plugin.gradient_clipping == 1.0 and not plugin.zero3_init_flag
    # bf16 from the DeepSpeed file, whatever finetune's --mixed-precision passes to Accelerator ("no" by default)
    for mixed_precision in ("no", "bf16"):
        plugin = deepspeed_plugin()
        plugin.set_mixed_precision(mixed_precision)
        assert plugin.deepspeed_config["bf16"]["enabled"] is True
        assert plugin.deepspeed_config["fp16"]["enabled"] is False
    with pytest.raises(ValueError, match="cannot be set to `fp16`"):
        deepspeed_plugin().set_mixed_precision("fp16")
    # gradient accumulation: "auto", i.e. the Accelerator's value (the trainer insists on 1), filled in at prepare
    plugin = deepspeed_plugin()
    assert plugin.is_auto("gradient_accumulation_steps")
    plugin.fill_match("gradient_accumulation_steps", must_match=False, gradient_accumulation_steps=1)
    assert plugin.get_value("gradient_accumulation_steps") == 1
    # the trainer prepares (model, optimizer) without a DataLoader: accelerate then needs an integer micro batch
    assert not plugin.is_auto("train_micro_batch_size_per_gpu")
    assert isinstance(plugin.get_value("train_micro_batch_size_per_gpu"), int)


def test_deepspeed_settings_in_the_yaml_beside_the_json_are_refused(tmp_path, monkeypatch):
    """The check the previous test passes is live: accelerate refuses DeepSpeed settings in the YAML when a
    deepspeed_config_file holds them (so the ZeRO-2 YAML keeps mixed precision and the stage in the JSON)."""
    monkeypatch.chdir(ROOT)
    bad = tmp_path / "bad.yaml"
    bad.write_text((CONFIGS / "deepspeed_zero2.yaml").read_text() + "mixed_precision: bf16\n")
    for k, v in _deepspeed_env(bad).items():
        monkeypatch.setenv(k, v)
    with pytest.raises(ValueError, match="will be ignored"):
        DeepSpeedPlugin()
