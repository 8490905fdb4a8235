"""The digits data set of the embedded default model, and its prompt convention.

Images: scikit-learn's ``load_digits`` (1797 grey-level 8x8 images, integer values 0..16, ink high,
background 0), upsampled bilinearly to 16x16 and scaled to [0, 1]: a pixel is ink intensity, so a
digit is light strokes on a black background. The model works in [-1, 1] (``2 v - 1``).

Prompts: a digit is named by its numeral or its English word, alone or in a short phrase:
``"7"``, ``"a digit 7"``, ``"seven"``, ``"the number seven"``, ``"a handwritten 7"``. The empty
prompt ``""`` is the unconditional prompt of classifier-free guidance. :func:`parse_digit` reads
the digit back from any of these (it is what the legibility reward uses).

Split: a fixed stratified split (``random_state=0``, 25 % held out, 450 images); the base model
and the classifier train on the training split only, so held-out accuracies are honest.
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import torch

IMAGE_SIZE = 16  # pixels per side after upsampling the 8x8 originals
WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
TEMPLATES = ("{d}", "a digit {d}", "{w}", "the number {w}", "a handwritten {d}")
TEST_FRACTION = 0.25
SPLIT_SEED = 0

__all__ = ["IMAGE_SIZE", "WORDS", "TEMPLATES", "load_split", "parse_digit", "prompt_for", "vocabulary_words"]


def load_split(split: str = "train", size: int = IMAGE_SIZE) -> tuple[torch.Tensor, torch.Tensor]:
    """The digits as float images in [0, 1] and their labels.

    Args:
        split: ``"train"`` (1347 images), ``"test"`` (450) or ``"all"`` (1797).
        size: output side in pixels (8 keeps the originals; larger is bilinear upsampling).

    Returns:
        images (N, 1, size, size) float32 in [0, 1]; labels (N,) int64 in 0..9.
    """
    if split not in ("train", "test", "all"):
        raise ValueError(f"split must be 'train', 'test' or 'all', got {split!r}")
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (N, 1, 8, 8)
    y = torch.tensor(data.target, dtype=torch.long)
    if split != "all":
        idx_train, idx_test = train_test_split(
            torch.arange(len(y)).numpy(), test_size=TEST_FRACTION, random_state=SPLIT_SEED, stratify=y.numpy())
        idx = torch.as_tensor(idx_train if split == "train" else idx_test)
        x, y = x[idx], y[idx]
    if size != 8:
        x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return x.clamp(0.0, 1.0), y


_DIGIT_RE = re.compile(r"(?<![0-9])([0-9])(?![0-9])")
_WORD_RE = re.compile(r"\b(" + "|".join(WORDS) + r")\b")


def parse_digit(prompt: str) -> int:
    """The digit a prompt names (``"7"``, ``"a digit 7"``, ``"seven"`` -> 7).

    Raises:
        ValueError: if the prompt names no digit, or more than one.
    """
    text = str(prompt).lower()
    found = {int(m) for m in _DIGIT_RE.findall(text)} | {WORDS.index(m) for m in _WORD_RE.findall(text)}
    if len(found) != 1:
        what = "no digit" if not found else f"several digits {sorted(found)}"
        raise ValueError(
            f"prompt {prompt!r} names {what}; name one digit 0-9 as a numeral or word, e.g. '7' or 'a digit seven'")
    return found.pop()


def prompt_for(digit: int, template: int = 0) -> str:
    """The prompt for ``digit`` with template ``template`` (an index into :data:`TEMPLATES`)."""
    if not 0 <= int(digit) <= 9:
        raise ValueError(f"digit must be in 0..9, got {digit}")
    return TEMPLATES[template % len(TEMPLATES)].format(d=int(digit), w=WORDS[int(digit)])


def vocabulary_words() -> list[str]:
    """Every word the prompt templates use (the tokenizer's whole-word vocabulary)."""
    words = set(WORDS) | {str(d) for d in range(10)}
    for t in TEMPLATES:
        words |= {p for p in t.split() if "{" not in p}
    return sorted(words)


def labels_from_prompts(prompts: Sequence[str]) -> torch.Tensor:
    """(B,) int64 digits named by the prompts (see :func:`parse_digit`)."""
    return torch.tensor([parse_digit(p) for p in prompts], dtype=torch.long)
