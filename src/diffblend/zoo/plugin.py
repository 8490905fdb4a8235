"""The zoo as a plug-in of :mod:`diffblend.registry`: its pipeline class, the default model and the
``legibility`` reward. The library never imports the zoo; the registry runs :func:`register`."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

__all__ = ["register", "adapters_dir", "colour_adapters_dir"]

LEGIBILITY = "log-probability of the prompted digit under the shipped digit classifier: <= 0, higher = more legible"


def adapters_dir() -> Path:
    """The folder of the shipped adapters and their manifest.json."""
    return Path(str(resources.files("diffblend.zoo").joinpath("adapters")))


def colour_adapters_dir() -> Path:
    """The folder of the colour model's shipped adapters and their manifest.json."""
    return Path(str(resources.files("diffblend.zoo").joinpath("colour_adapters")))


def _adapters(include_oracles: bool = False) -> dict[str, Path]:
    from ..generation import adapters_in

    return adapters_in(adapters_dir(), include_oracles)


def _colour_adapters(include_oracles: bool = False) -> dict[str, Path]:
    from ..generation import adapters_in

    folder = colour_adapters_dir()
    return adapters_in(folder, include_oracles) if folder.is_dir() else {}


def _load(device="cpu"):  # noqa: ANN001, ANN202
    from . import load_default_pipeline

    return load_default_pipeline(device=device)


def _load_colour(device="cpu"):  # noqa: ANN001, ANN202
    from .colour.model import load_colour_pipeline

    return load_colour_pipeline(device=device)


def _colour_filtered_finetune(cfg, run_dir, out, **kw):  # noqa: ANN001, ANN003, ANN202
    from .colour.finetune import finetune_from_config

    return finetune_from_config(cfg, run_dir, out, **kw)


def _legibility_factory(device="cpu", path=None):  # noqa: ANN001, ANN202
    from .legibility import legibility

    return legibility(device=device, path=path)


def _prompt_alignment_factory(device="cpu", path=None):  # noqa: ANN001, ANN202
    from .colour.alignment import prompt_alignment

    return prompt_alignment(device=device, path=path)


def _digits_pipeline() -> type:
    from .pipeline import DigitsPipeline

    return DigitsPipeline


def register() -> None:
    """Register DigitsPipeline, the embedded digits model as the default, the legibility reward and the colour
    model's prompt_alignment reward."""
    from ..registry import DefaultModel, register_default_model, register_pipeline_class
    from ..rewards import register_reward
    from .colour.alignment import PROMPT_ALIGNMENT

    from .colour.data import DEFAULT_PROMPTS
    from .data import prompt_for

    register_pipeline_class("DigitsPipeline", _digits_pipeline)
    register_default_model(DefaultModel(
        load=_load, adapters=_adapters, adapters_dir=adapters_dir(), report_rewards=("legibility",), name="digits",
        prompts=tuple(prompt_for(d) for d in range(10)), demo_pair=("jpeg_compressibility", "legibility"),
        guidance_scale=2.0))
    if (Path(str(resources.files("diffblend.zoo").joinpath("weights"))) / "colour_base" / "model_index.json").is_file():
        register_default_model(DefaultModel(
            load=_load_colour, adapters=_colour_adapters, adapters_dir=colour_adapters_dir(),
            report_rewards=("prompt_alignment",), name="colour", prompts=DEFAULT_PROMPTS,
            demo_pair=("rms_contrast", "jpeg_compressibility"), guidance_scale=3.0,
            filtered_finetune=_colour_filtered_finetune))
    register_reward("legibility", LEGIBILITY)(_legibility_factory)
    register_reward("prompt_alignment", PROMPT_ALIGNMENT, listed=False)(_prompt_alignment_factory)
