"""The demo sweep: images and mean rewards from pure r1 to pure r2, for DB-MPA and DB-MPA-LS.

Column k uses w = (1 - w2_k, w2_k) over the two adapters; every column reuses the same per-image
noise (paired comparison), so differences between columns are due to the blend alone.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .generate import generate, image_grid, score_images

__all__ = ["DemoResult", "blend_sweep", "reward_names_for", "format_table", "demo_figure"]


@dataclass
class DemoResult:
    """Images and rewards of a sweep.

    images[method]: (K, N, C, H, W) for the K weights and N prompts. rewards[method][name]: (K,)
    mean over the N images. ws: (K,) the weight of the second adapter.
    """

    pair: tuple[str, str]
    ws: list[float]
    prompts: list[str]
    images: dict[str, torch.Tensor] = field(default_factory=dict)
    rewards: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    seconds: float = 0.0


def reward_names_for(adapters: Sequence[str], always: Sequence[str] = ("legibility",)) -> list[str]:
    """Registered rewards to report: the ones the adapters are named after, then ``always``."""
    from ..generation import reward_names_for as names_for

    return names_for(adapters, always)


def blend_sweep(bp: Any, pair: tuple[str, str], prompts: Sequence[str], ws: Sequence[float],
                methods: Sequence[str] = ("mpa", "ls"), rewards: Sequence[str] = (), seed: int = 0,
                num_inference_steps: int = 20, guidance_scale: float = 2.0, kl_strength: float = 1.0,
                progress: bool = True) -> DemoResult:
    """Generate ``prompts`` at each w2 in ``ws`` for each method; score them with ``rewards``."""
    from tqdm.auto import tqdm

    a, b = pair
    for n in pair:
        if n not in bp.adapter_names:
            raise ValueError(f"adapter {n!r} is not loaded; adapters: {', '.join(bp.adapter_names) or 'none'}")
    if a == b:
        raise ValueError(f"the pair must name two different adapters, got {a!r} twice")
    res = DemoResult(pair=(a, b), ws=[float(w) for w in ws], prompts=list(prompts))
    t0 = time.time()
    bar = tqdm(total=len(methods) * len(ws), desc="demo", disable=not progress)
    for m in methods:
        imgs, sums = [], {r: [] for r in rewards}
        for w in ws:
            x = generate(bp, prompts, {a: 1.0 - w, b: w}, kl_strength=kl_strength, method=m, seed=seed,
                         num_inference_steps=num_inference_steps, guidance_scale=guidance_scale, eta=1.0)
            imgs.append(x)
            for r, s in score_images(x, prompts, rewards).items():
                sums[r].append(float(s.mean()))
            bar.update()
        res.images[m] = torch.stack(imgs)
        res.rewards[m] = sums
    bar.close()
    res.seconds = time.time() - t0
    return res


def format_table(res: DemoResult) -> str:
    """A plain-text table: one row per (method, w2), the mean of each reward."""
    names = sorted({r for m in res.rewards for r in res.rewards[m]}, key=lambda r: list(res.rewards[next(iter(res.rewards))]).index(r))
    a, b = res.pair
    head = f"{'method':<7}{'w(' + a + ')':>{len(a) + 5}} {'w(' + b + ')':>{len(b) + 5}}" + "".join(f"{n:>22}" for n in names)
    lines = [head, "-" * len(head)]
    for m, table in res.rewards.items():
        for k, w in enumerate(res.ws):
            lines.append(f"{m:<7}{1 - w:>{len(a) + 5}.2f} {w:>{len(b) + 5}.2f}" + "".join(f"{table[n][k]:>22.4f}" for n in names))
    return "\n".join(lines)


FIGURE_FORMATS = ("png", "jpg", "jpeg", "webp", "pdf", "svg")


def figure_format(path: str | Path, arg: str = "-o") -> str:
    """The matplotlib format that ``path``'s extension names, else a ValueError naming ``arg``."""
    fmt = Path(path).suffix.lower().lstrip(".")
    if fmt not in FIGURE_FORMATS:
        raise ValueError(f"{arg} {str(path)!r}: the extension must name a figure format, one of "
                         f"{', '.join('.' + f for f in FIGURE_FORMATS)}")
    return fmt


def demo_figure(res: DemoResult, path: str | Path, scale: int = 4) -> Path:
    """The figure (PNG, or the format the extension names): one panel per method, columns from pure r1
    to pure r2, titles with the mean rewards."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .._io import atomic_write

    methods = list(res.images)
    K, N = len(res.ws), len(res.prompts)
    cell = 0.75  # inches per image: room for two or three lines of labels above each column
    short = {"jpeg_compressibility": "compr", "legibility": "legib", "boldness": "bold", "colourfulness": "colour",
             "rms_contrast": "contrast", "prompt_alignment": "align"}
    n_rewards = len(res.rewards[methods[0]])
    width = len(methods) * (cell * K + 0.4)
    legend = _legend(list(res.rewards[methods[0]]), short)
    legend_lines = sum(math.ceil(len(line) / (17 * width)) for line in legend.splitlines())  # ~17 chars / inch
    top, bottom = 0.14 * (1 + n_rewards) + 0.1, 0.13 * legend_lines + 0.6  # inches: column labels; titles, legend
    height = cell * N + top + bottom
    fig, axes = plt.subplots(1, len(methods), figsize=(width, height),
                             squeeze=False)
    for ax, m in zip(axes[0], methods):
        x = res.images[m].transpose(0, 1).reshape(N * K, *res.images[m].shape[2:])  # row = prompt, col = w
        grid = image_grid(x, ncols=K, scale=scale)
        ax.imshow(grid.permute(1, 2, 0).squeeze(-1).numpy(), cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        fmt = "{:.1f}" if any(abs(v) >= 100 for vals in res.rewards[m].values() for v in vals) else "{:.3f}"
        col = grid.shape[2] / K
        labels = []
        for k, w in enumerate(res.ws):
            lines = [f"w={w:.2f}"] + [f"{short.get(r, r)} {fmt.format(v[k])}" for r, v in res.rewards[m].items()]
            labels.append("\n".join(lines))
        ax.set_xticks([col * (k + 0.5) for k in range(K)], labels, fontsize=7)
        ax.xaxis.tick_top()
        ax.set_yticks([])
        title = {"mpa": "DB-MPA", "ls": "DB-MPA-LS", "soup": "Rewarded Soup"}.get(m, m)
        a, b = (short.get(r, r) for r in res.pair)
        ax.set_xlabel(f"{title}\n{a} (w=0) -> {b} (w=1)", fontsize=9)
    fig.text(0.01, 0.005, legend, fontsize=6, va="bottom", ha="left",
             wrap=True)
    fig.tight_layout(rect=(0, (0.13 * legend_lines + 0.1) / height, 1, 1 - top / height))
    path = Path(path)
    fmt = figure_format(path)
    atomic_write(path, lambda tmp: fig.savefig(tmp, format=fmt, dpi=100))
    plt.close(fig)
    return path


def _legend(rewards: list[str], short: dict[str, str]) -> str:
    """One line per reward: its short label, then what it measures, its unit and which way is better."""
    from ..rewards import reward_info

    info = reward_info()
    return "\n".join(f"{short.get(r, r)} = {r}: {info.get(r, '').split(' (alias')[0]}" for r in rewards)

