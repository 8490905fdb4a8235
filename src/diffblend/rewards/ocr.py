"""``ocr``: Flow-GRPO's text-rendering reward, 1 - normalised edit distance to the prompt's quoted text.

Flow-GRPO (Liu et al. 2025) reads the image with PaddleOCR; here the same ONNX models run through
``rapidocr-onnxruntime`` (its wheel ships them, so no download). Not differentiable: the scores are
detached (no gradient flows, as for ``jpeg_compressibility``; reward-gradient guidance then gets a
zero gradient from this term).
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from ._loading import cached, require
from ._preprocess import check_images, to_pil
from .registry import register_reward

__all__ = ["ocr", "edit_distance", "ocr_similarity", "target_texts"]


def edit_distance(a: str, b: str) -> int:
    """Levenshtein distance (insertions, deletions, substitutions, each cost 1)."""
    prev = list(range(len(b) + 1))
    for i, ca in enumerate(a, 1):
        cur = [i]
        for j, cb in enumerate(b, 1):
            cur.append(min(prev[j] + 1, cur[j - 1] + 1, prev[j - 1] + (ca != cb)))
        prev = cur
    return prev[-1]


def ocr_similarity(read: str, target: str) -> float:
    """Flow-GRPO's score in [0, 1]: spaces dropped and lower-cased; 1 if the target occurs in what was
    read, else ``1 - min(d, len(target)) / len(target)`` with d the edit distance."""
    read, target = read.replace(" ", "").lower(), target.replace(" ", "").lower()
    if not target:
        raise ValueError("the text to render is empty")
    d = 0 if target in read else min(edit_distance(read, target), len(target))
    return 1.0 - d / len(target)


def target_texts(prompts: Sequence[str] | None, metadata: Any, batch: int) -> list[str]:
    """The text each image should show: ``metadata[i]["text"]``, else the prompt's first "quoted" span."""
    if isinstance(metadata, dict):
        metadata = [metadata] * batch
    out = []
    for i in range(batch):
        meta = metadata[i] if metadata is not None and i < len(metadata) and metadata[i] else {}
        prompt = prompts[i] if prompts is not None and i < len(prompts) else ""
        quoted = re.search(r'"([^"]+)"', prompt)
        if "text" in meta:
            out.append(str(meta["text"]))
        elif quoted:
            out.append(quoted.group(1))
        else:
            raise ValueError(f'ocr needs the text to render in double quotes in the prompt (a sign saying "OPEN") '
                             f'or metadata["text"]; image {i} has prompt {prompt!r}')
    return out


def _engine() -> Any:
    mod = require("rapidocr_onnxruntime", "rapidocr-onnxruntime", "ocr")
    return mod.RapidOCR()


def _read(engine: Any, image: Any, min_confidence: float) -> str:
    import numpy as np

    result, _ = engine(np.asarray(image))
    return "".join(text for _, text, conf in (result or []) if float(conf) > min_confidence)


@register_reward("ocr", 'Flow-GRPO OCR reward 1 - edit distance / length between the text read in the image and '
                        'the prompt\'s "quoted" text: in [0, 1], higher = rendered right; not differentiable '
                        '(needs rapidocr-onnxruntime)', needs_model=True)
def ocr(device: str | torch.device = "cpu", min_confidence: float = 0.0) -> Any:
    """OCR reward in [0, 1], higher = the image shows the prompt's quoted text (1 = found verbatim).

    Each image is rounded to uint8 and read by RapidOCR on the CPU (``device`` is not used); pieces
    read with confidence <= ``min_confidence`` are dropped (Flow-GRPO: 0), the rest joined. The text
    to render is ``metadata[i]["text"]`` or the first double-quoted span of the prompt. The scores
    are detached: not differentiable. ``info["text"]``: what was read, per image (a list of strings).
    """
    engine = cached(("ocr", "rapidocr"), _engine)

    def fn(images: torch.Tensor, prompts: Sequence[str], metadata: Any = None) -> tuple[torch.Tensor, dict]:
        targets = target_texts(prompts, metadata, check_images(images).shape[0])
        read = [_read(engine, im, min_confidence) for im in to_pil(images)]
        scores = torch.tensor([ocr_similarity(r, t) for r, t in zip(read, targets)], dtype=torch.float32)
        return scores.to(images.device), {"text": read}

    return fn
