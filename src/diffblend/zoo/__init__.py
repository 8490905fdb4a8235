"""The embedded default model: a tiny text-to-image diffusion model of handwritten digits.

``load_default_pipeline()`` returns a ``DigitsPipeline`` (a diffusers ``DiffusionPipeline`` with
SD's code path, pixel space, 16x16x1) loaded from the safetensors shipped in ``zoo/weights/base``;
prompts are ``"7"``, ``"a digit 7"``, ``"seven"``... (see ``zoo.data``). The digit classifier of the
``legibility`` reward ships in ``zoo/weights/classifier``. Heavy imports happen inside functions.
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ..generation import quiet_loading
from .data import parse_digit, prompt_for

__all__ = ["load_default_pipeline", "weights_dir", "parse_digit", "prompt_for", "quiet_loading"]


def weights_dir(name: str = "base") -> Path:
    """The shipped weights folder ``zoo/weights/<name>`` (``"base"`` or ``"classifier"``)."""
    path = Path(str(resources.files(__package__).joinpath("weights", name)))
    if not path.is_dir():
        raise FileNotFoundError(f"the shipped weights {name!r} are missing (expected the package folder {path})")
    return path


def load_default_pipeline(device: str | Any = "cpu", progress_bar: bool = False) -> Any:
    """The shipped ``DigitsPipeline`` on ``device`` (float32), progress bar off unless asked."""
    from .pipeline import DigitsPipeline

    with quiet_loading():
        pipe = DigitsPipeline.from_pretrained(str(weights_dir("base")))
    pipe.set_progress_bar_config(disable=not progress_bar)
    return pipe.to(device)
