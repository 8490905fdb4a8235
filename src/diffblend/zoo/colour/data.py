"""Procedural scenes for the colour default model: one shape on a (possibly patterned) background.

A scene has five attributes, each named by one word in the prompt:

    shape       circle, square, triangle, diamond
    colour      red, green, blue, yellow, purple, orange, white        (of the shape)
    size        small, large
    pattern     plain, striped, checkered                               (of the background)
    background  black, white, grey, red, green, blue, yellow, purple    (the background's colour)

Full prompt: ``"a small red triangle on a striped blue background"``. Partial prompts name a subset
(``"a red triangle"``, ``"a large circle on a black background"``); :func:`parse_prompt` reads the
attributes back from any of them. A patterned background alternates its colour with a darker tone of
it (black with a dark grey). The shape's colour always differs from the background's. The shape sits
near the centre (jittered by up to 3 px) and is rendered 2x supersampled, so its edges are anti-aliased.

What the prompt does not name varies from image to image, as in real data: the saturation of the shape's
and of the background's colour (each drawn in [SATURATION]), the pattern's contrast (its second tone
drawn in [DARK]) and its period and direction, the size within its class, the position. So a prompt has
many images, and rewards that read colour or detail (colourfulness, JPEG size) vary between them: what
a fine-tuned adapter can move.

Images: (N, 3, 32, 32) float32 RGB in [0, 1]. Everything is a function of a seed: training draws from
seeds >= 0 (:data:`TRAIN_SEED`), held-out evaluations from :data:`HELDOUT_SEED`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence

import torch

IMAGE_SIZE = 32
SHAPES = ("circle", "square", "triangle", "diamond")
COLOURS = ("red", "green", "blue", "yellow", "purple", "orange", "white")
SIZES = ("small", "large")
PATTERNS = ("plain", "striped", "checkered")
BACKGROUNDS = ("black", "white", "grey", "red", "green", "blue", "yellow", "purple")
ATTRIBUTES: dict[str, tuple[str, ...]] = {
    "shape": SHAPES, "colour": COLOURS, "size": SIZES, "pattern": PATTERNS, "background": BACKGROUNDS}
RGB = {
    "red": (0.9, 0.1, 0.1), "green": (0.1, 0.75, 0.2), "blue": (0.15, 0.3, 0.95), "yellow": (0.95, 0.9, 0.1),
    "purple": (0.6, 0.15, 0.8), "orange": (1.0, 0.55, 0.05), "white": (0.95, 0.95, 0.95),
    "black": (0.02, 0.02, 0.02), "grey": (0.5, 0.5, 0.5),
}
RADIUS = {"small": (4.5, 6.0), "large": (9.0, 11.5)}  # half-size range in pixels
JITTER = 3  # max centre offset in pixels
SATURATION = (0.4, 1.0)  # a colour's saturation: grey + s * (colour - grey), s uniform in this range
DARK = (0.2, 0.8)  # a patterned background's second tone: this factor times its colour (black: this times 0.6)
SUPERSAMPLE = 2
TRAIN_SEED = 0
# The colour model's default prompts (demo, calibration, adapters, sweeps): every shape and colour, both sizes,
# the background left to the model. What a prompt leaves open is what a reward can choose: on the base's
# images at CFG 3 the sd of colourfulness within one of these prompts is 0.50 of its sd over all of them (0.18
# for full prompts, where the prompt fixes both colours), of JPEG size 0.81 (0.27):
# benchmarks/colour_prompt_freedom.py, docs/colour_default.md.
DEFAULT_PROMPTS = (
    "a red circle", "a blue square", "a yellow triangle", "a green diamond", "a white circle", "a purple square",
    "an orange triangle", "a small red diamond", "a large blue circle", "a small white triangle",
)
HELDOUT_SEED = 10_000_019

__all__ = ["IMAGE_SIZE", "DEFAULT_PROMPTS", "ATTRIBUTES", "SHAPES", "COLOURS", "SIZES", "PATTERNS", "BACKGROUNDS", "sample_attributes",
           "redraw_clashing_backgrounds",
           "render", "make_batch", "prompt_for", "parse_prompt", "vocabulary_words", "attribute_targets"]


def sample_attributes(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    """``{attribute: (n,) int64 index}``, uniform, with the shape's colour != the background's."""
    if int(n) < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    out = {k: torch.randint(0, len(v), (n,), generator=g) for k, v in ATTRIBUTES.items()}
    return redraw_clashing_backgrounds(out, g)


def redraw_clashing_backgrounds(attrs: dict[str, torch.Tensor], g: torch.Generator) -> dict[str, torch.Tensor]:
    """Redraw (in place, uniformly) each background whose colour equals the shape's, until none does."""
    def clashes() -> torch.Tensor:
        return torch.tensor([COLOURS[c] == BACKGROUNDS[b] for c, b in zip(attrs["colour"], attrs["background"])],
                            dtype=torch.bool)

    same = clashes()
    while same.any():
        attrs["background"][same] = torch.randint(0, len(BACKGROUNDS), (int(same.sum()),), generator=g)
        same = clashes()
    return attrs


def _rgb(names: Sequence[str], idx: torch.Tensor) -> torch.Tensor:
    table = torch.tensor([RGB[n] for n in names])
    return table[idx][:, :, None, None]  # (n, 3, 1, 1)


def _uniform(n: int, bounds: tuple[float, float], g: torch.Generator) -> torch.Tensor:
    lo, hi = bounds
    return (lo + (hi - lo) * torch.rand(n, generator=g))[:, None, None, None]  # (n, 1, 1, 1)


def _desaturate(rgb: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """grey + s * (rgb - grey), grey the colour's mean: s = 1 keeps it, s = 0 gives its grey (white, black and
    grey are unchanged)."""
    grey = rgb.mean(1, keepdim=True)
    return grey + s * (rgb - grey)


def _shape_mask(shape: torch.Tensor, dx: torch.Tensor, dy: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """(n, H, W) bool: inside the shape, from offsets to its centre (pixels) and half-sizes r (n, 1, 1)."""
    circle = dx ** 2 + dy ** 2 <= r ** 2
    square = torch.maximum(dx.abs(), dy.abs()) <= 0.85 * r
    triangle = (dy >= -r) & (dy <= 0.8 * r) & (dx.abs() <= 0.6 * (dy + r))
    diamond = dx.abs() + dy.abs() <= 1.15 * r
    masks = torch.stack([circle, square, triangle, diamond])  # (4, n, H, W), order of SHAPES
    return masks.gather(0, shape[None, :, None, None].expand(1, *dx.shape))[0]


def _background(attrs: Mapping[str, torch.Tensor], size: int, g: torch.Generator) -> torch.Tensor:
    n = len(attrs["pattern"])
    base = _desaturate(_rgb(BACKGROUNDS, attrs["background"]), _uniform(n, SATURATION, g))
    k = _uniform(n, DARK, g)
    dark = torch.where(base.mean(1, keepdim=True) < 0.1, 0.6 * k.expand_as(base), k * base)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    period = torch.randint(2, 6, (n, 1, 1), generator=g)  # stripe / check width in pixels: 2 to 5
    vertical = torch.rand(n, 1, 1, generator=g) < 0.5
    stripes = torch.where(vertical, (xx // period) % 2, (yy // period) % 2).bool()
    checks = ((xx // period + yy // period) % 2).bool()
    pat = attrs["pattern"][:, None, None]
    alt = torch.where(pat == 1, stripes, torch.where(pat == 2, checks, torch.zeros_like(checks)))  # (n, H, W)
    return torch.where(alt[:, None], dark, base)


def render(attrs: Mapping[str, torch.Tensor], g: torch.Generator, size: int = IMAGE_SIZE) -> torch.Tensor:
    """(n, 3, size, size) RGB in [0, 1] for the attributes (indices as :func:`sample_attributes`)."""
    n = len(attrs["shape"])
    lo = torch.tensor([RADIUS[s][0] for s in SIZES])[attrs["size"]]
    hi = torch.tensor([RADIUS[s][1] for s in SIZES])[attrs["size"]]
    r = (lo + (hi - lo) * torch.rand(n, generator=g)) * size / IMAGE_SIZE
    centre = size / 2 + torch.randint(-JITTER, JITTER + 1, (n, 2), generator=g).float() * size / IMAGE_SIZE
    s = SUPERSAMPLE
    coords = (torch.arange(size * s).float() + 0.5) / s  # sub-pixel centres, in pixels
    dx = coords[None, None, :] - centre[:, 0, None, None]
    dy = coords[None, :, None] - centre[:, 1, None, None]
    dx, dy = torch.broadcast_tensors(dx, dy)  # (n, H*s, W*s)
    mask = _shape_mask(attrs["shape"], dx, dy, r[:, None, None]).float()
    cover = torch.nn.functional.avg_pool2d(mask[:, None], s)  # (n, 1, size, size) anti-aliased coverage
    colour = _desaturate(_rgb(COLOURS, attrs["colour"]), _uniform(n, SATURATION, g))
    img = cover * colour + (1 - cover) * _background(attrs, size, g)
    return img.clamp(0, 1)


def prompt_for(attrs: Mapping[str, int], named: Sequence[str] | None = None) -> str:
    """The prompt for one scene's attribute indices, naming ``named`` (default: every attribute given)."""
    named = {k for k in ATTRIBUTES if k in attrs} if named is None else set(named)
    if "shape" not in named:
        raise ValueError("a prompt must name the shape")
    word = {k: ATTRIBUTES[k][int(attrs[k])] for k in named}
    head = " ".join(word[k] for k in ("size", "colour", "shape") if k in word)
    text = f"{'an' if head[0] in 'aeiou' else 'a'} {head}"
    if "pattern" in word or "background" in word:
        tail = " ".join(word[k] for k in ("pattern", "background") if k in word)
        text += f" on a {tail} background"
    return text


_PROMPT_RE = re.compile(
    r"^\s*(?:an? )?(?:(?P<size>{}) )?(?:(?P<colour>{}) )?(?P<shape>{})"
    r"(?: on an? (?:(?P<pattern>{}) )?(?:(?P<background>{}) )?background)?\s*$".format(
        *("|".join(ATTRIBUTES[k]) for k in ("size", "colour", "shape", "pattern", "background"))))


def parse_prompt(prompt: str) -> dict[str, int]:
    """``{attribute: index}`` for the attributes a prompt names (see the module docstring for the grammar).

    Raises:
        ValueError: if the prompt does not follow the grammar (it names the words it allows).
    """
    m = _PROMPT_RE.match(str(prompt).lower())
    if m is None:
        raise ValueError(
            f"prompt {prompt!r} is not a colour-scene prompt; write 'a [size] [colour] SHAPE [on a [pattern] "
            f"[colour] background]', e.g. 'a small red triangle on a striped blue background', with "
            + "; ".join(f"{k}: {'/'.join(v)}" for k, v in ATTRIBUTES.items()))
    return {k: ATTRIBUTES[k].index(v) for k, v in m.groupdict().items() if v is not None}


def attribute_targets(prompts: Sequence[str]) -> dict[str, torch.Tensor]:
    """``{attribute: (B,) int64}`` parsed from the prompts, -1 where a prompt does not name it."""
    parsed = [parse_prompt(p) for p in prompts]
    return {k: torch.tensor([p.get(k, -1) for p in parsed], dtype=torch.long) for k in ATTRIBUTES}


def vocabulary_words() -> list[str]:
    """Every word the prompts use (the tokenizer's whole-word vocabulary)."""
    words = {"a", "an", "on", "background"}
    for values in ATTRIBUTES.values():
        words |= set(values)
    return sorted(words)


def make_batch(n: int, g: torch.Generator, full_prompt_prob: float = 1.0) -> tuple[torch.Tensor, list[str], dict]:
    """n scenes: images (n, 3, 32, 32), prompts, attribute indices. With probability ``1 - full_prompt_prob``
    a prompt names a random subset of the attributes (always the shape), so the model learns partial prompts."""
    attrs = sample_attributes(n, g)
    images = render(attrs, g)
    optional = [k for k in ATTRIBUTES if k != "shape"]
    prompts = []
    for i in range(n):
        named = list(ATTRIBUTES)
        if float(torch.rand((), generator=g)) >= full_prompt_prob:
            keep = torch.rand(len(optional), generator=g) < 0.5
            named = ["shape"] + [k for k, m in zip(optional, keep) if m]
        prompts.append(prompt_for({k: attrs[k][i] for k in ATTRIBUTES}, named))
    return images, prompts, attrs
