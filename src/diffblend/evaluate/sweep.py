"""Sweeps: methods x weight grid (x lambda grid for KLA) over prompts and paired seeds -> records.

Every image is one JSONL record (see ``evaluate.records``) written as soon as its batch is scored,
so a sweep killed at any moment loses at most the batch in flight; running it again skips every
(setting, prompt, seed) already recorded (no duplicates, no lost records). With several processes
(``accelerate launch``) each process takes every n-th setting, writes its own shard file next to
the records file, and the main process merges the shards at the end (deduplicated, atomically).
"""

from __future__ import annotations

import hashlib
import os
import re
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..core.blend import Blend
from .methods import Backend, GenResult, MethodOptions, Setting, generate
from .records import RecordWriter, read_records, record_key, setting_key, write_records
from .._io import atomic_write

__all__ = ["build_settings", "pair_grid", "shard_path", "done_keys", "merge_shards", "run_sweep", "SweepStats",
           "check_run_settings"]

BLEND_METHODS = ("mpa", "ls", "soup", "ls_stratified", "ls_golden")  # recorded with lambda = 1
WEIGHTED_METHODS = ("mpa", "ls", "soup", "ls_stratified", "ls_golden", "rgg", "code", "morl")


def pair_grid(names: Sequence[str], ws: Iterable[float]) -> list[dict[str, float]]:
    """Weights over a pair of rewards: w -> {names[0]: 1 - w, names[1]: w}."""
    if len(names) != 2:
        raise ValueError(f"pair_grid needs exactly two reward names, got {list(names)}")
    out = []
    for w in ws:
        w = float(w)
        if not 0.0 <= w <= 1.0:
            raise ValueError(f"weights of a pair must be in [0, 1], got {w}")
        out.append({names[0]: round(1.0 - w, 12), names[1]: w})
    return out


def build_settings(methods: Sequence[str], weight_grid: Sequence[Mapping[str, float]],
                   lambda_grid: Sequence[float] = (), kla_weights: Sequence[Mapping[str, float]] | None = None
                   ) -> list[Setting]:
    """The settings of a sweep, in method order.

    base: one setting; mpa/ls/soup: each w at lambda = 1; rgg/code/morl: each w; kla: each w of
    ``kla_weights`` (default: the weight grid) times each lambda of ``lambda_grid``.
    """
    out: list[Setting] = []
    for m in methods:
        if m == "base":
            out.append(Setting.make("base"))
        elif m == "kla":
            if not lambda_grid:
                raise ValueError("method 'kla' needs a lambda grid (--lambdas)")
            for w in (kla_weights if kla_weights is not None else weight_grid):
                out.extend(Setting.make("kla", w, lam) for lam in lambda_grid)
        elif m in WEIGHTED_METHODS:
            out.extend(Setting.make(m, w, 1.0 if m in BLEND_METHODS else None) for w in weight_grid)
        else:
            Setting.make(m)  # raises the registry's error for unknown names
            out.extend(Setting.make(m, w) for w in weight_grid)
    keys = [setting_key(s.method, s.weights_dict, s.lam) for s in out]
    if len(set(keys)) != len(keys):
        raise ValueError("the sweep lists a setting twice (check the weight and lambda grids)")
    for s, key in zip(out, keys):  # validate every blend now, not when the sweep reaches it
        if s.method in BLEND_METHODS or s.method == "kla":
            try:
                Blend.create(s.weights_dict, kl_strength=s.lam,
                             method="mpa" if s.method == "kla" else s.method.split("_")[0])
            except ValueError as exc:
                raise ValueError(f"setting {key}: {exc}") from None
    return out


def shard_path(records_path: str | os.PathLike, rank: int) -> Path:
    p = Path(records_path)
    return p.with_name(f"{p.stem}.rank{rank}{p.suffix}")


def _shards(records_path: Path) -> list[Path]:
    # A regex, not a glob: a records file named with glob metacharacters ("run[1].jsonl") must
    # still find its shards, and only shard_path's own names count.
    pattern = re.compile(re.escape(records_path.stem) + r"\.rank\d+" + re.escape(records_path.suffix))
    folder = records_path.parent
    return sorted(p for p in folder.iterdir() if pattern.fullmatch(p.name)) if folder.is_dir() else []


def _recorded(records_path: Path) -> list[tuple[Path, dict]]:
    """(file, record) for every record in the records file and its shard files, read once."""
    return [(src, r) for src in [records_path, *_shards(records_path)] for r in read_records(src, missing_ok=True)]


def done_keys(records_path: str | os.PathLike) -> set:
    """Keys of every record already in the records file or any shard file."""
    return {record_key(r) for _, r in _recorded(Path(records_path))}


def merge_shards(records_path: str | os.PathLike) -> int:
    """Fold the shard files into the records file (first copy of a key wins), atomically, then
    delete the shards. A kill in between leaves both: the next read deduplicates. Returns the count."""
    records_path = Path(records_path)
    shards = _shards(records_path)
    if not shards:
        return len(read_records(records_path, missing_ok=True))
    seen, merged = set(), []
    for src in [records_path, *shards]:
        for r in read_records(src, missing_ok=True):
            k = record_key(r)
            if k not in seen:
                seen.add(k)
                merged.append(r)
    write_records(records_path, merged)
    for s in shards:
        s.unlink()
    return len(merged)


def _canonical(settings: Mapping | None) -> dict | None:
    """``settings`` as it reads back from JSON (tuples -> lists, keys -> str), for comparisons."""
    import json

    return None if settings is None else json.loads(json.dumps(dict(settings), default=str))


def check_run_settings(records_path: str | os.PathLike, settings: Mapping | None) -> None:
    """Refuse to add records made under ``settings`` to a file whose records were made under others.

    Every record carries the settings of the run that made it (``"run"``: model, steps, guidance...;
    not the grid, prompts or seeds, which a resumed sweep may extend). Records written before settings
    were recorded cannot be checked: a warning says so.

    Raises:
        ValueError: naming the settings that differ, their recorded and new values, and the way out.
    """
    _check_settings(_recorded(Path(records_path)), settings, Path(records_path))


def _check_settings(recorded: list[tuple[Path, dict]], settings: Mapping | None, records_path: Path) -> None:
    """:func:`check_run_settings` over records already read."""
    import warnings

    if settings is None:
        return
    new = _canonical(settings)
    legacy = 0
    for src, rec in recorded:
        old = rec.get("run")
        if old is None:
            legacy += 1
            continue
        if old != new:
            diff = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
            shown = ", ".join(f"{k}: {old.get(k)!r} recorded, {new.get(k)!r} now" for k in diff)
            raise ValueError(f"{src} holds records made with other settings ({shown}); rerun with the same "
                             f"settings to resume, or write to another records file (-o) - nothing is overwritten")
    if legacy:
        warnings.warn(f"{records_path}: {legacy} record(s) predate recorded settings; cannot check that they were "
                      f"made with the same settings as this run", stacklevel=3)


@dataclass
class SweepStats:
    """What one process did: images generated now, skipped as already recorded, settings seen."""

    generated: int = 0
    skipped: int = 0
    settings: int = 0


def _image_name(key: tuple) -> str:
    return hashlib.sha1(repr(key).encode()).hexdigest()[:16] + ".png"


def _save_png(images: torch.Tensor, path: Path) -> None:
    """Save one (C, H, W) image in [0, 1] as PNG, atomically."""
    import numpy as np
    from PIL import Image

    arr = (images.detach().float().clamp(0, 1).cpu().numpy() * 255).round().astype(np.uint8)
    img = Image.fromarray(arr[0], mode="L") if arr.shape[0] == 1 else Image.fromarray(arr.transpose(1, 2, 0))
    atomic_write(path, lambda tmp: img.save(tmp, format="PNG"))


def _todo(settings: Sequence[Setting], pairs: list[tuple[str, int]], done: set, batch_size: int,
          stats: SweepStats) -> list[tuple[Setting, list[tuple[str, int]]]]:
    """(setting, batch of (prompt, seed)) still to generate, in order; counts the skipped images."""
    work = []
    for st in settings:
        skey = setting_key(st.method, st.weights_dict, st.lam)
        todo = [(p, s) for p, s in pairs if (skey, p, s) not in done]
        stats.skipped += len(pairs) - len(todo)
        work.extend((st, todo[i:i + batch_size]) for i in range(0, len(todo), batch_size))
    return work


def _records_done(records_path: Path, num_processes: int, run_settings: Mapping | None) -> set:
    """The keys already recorded, after folding in a killed parallel run's shards (one process) and
    checking that the recorded settings are this run's."""
    if num_processes == 1 and _shards(records_path):
        # Shards of a parallel run killed before its merge: their records count as done below, so
        # fold them into the records file now (no other process writes them), or they would be lost.
        merge_shards(records_path)
    recorded = _recorded(records_path)  # read once: checked against this run's settings, then skipped
    _check_settings(recorded, run_settings, records_path)
    return {record_key(r) for _, r in recorded}


@dataclass
class _Sink:
    """Where a sweep's records go: the file this process writes, the records file (image paths are
    relative to its folder), the images folder (None: no PNGs) and the run settings stored in each."""

    out_path: Path
    records_path: Path
    images_dir: Path | None
    run_settings: dict | None

    @classmethod
    def make(cls, records_path: Path, process_index: int, num_processes: int, images_dir, run_settings) -> _Sink:
        """This process's sink (its shard file under several processes); creates the images folder."""
        out_path = records_path if num_processes == 1 else shard_path(records_path, process_index)
        if images_dir is not None:
            images_dir = Path(images_dir)
            images_dir.mkdir(parents=True, exist_ok=True)
        return cls(out_path, records_path, images_dir, _canonical(run_settings))


def _batch_records(backend: Backend, st: Setting, batch: list[tuple[str, int]], options: MethodOptions,
                   sink: _Sink, writer: RecordWriter) -> list[dict]:
    """Generate, score and write one batch of one setting (images saved when asked); its records."""
    ps, ss = [p for p, _ in batch], [s for _, s in batch]
    t0 = time.perf_counter()
    res: GenResult = generate(backend, st, ps, ss, options)
    seconds = (time.perf_counter() - t0) / len(batch)
    images = backend.to_images(res.x0)
    with torch.no_grad():
        scores = backend.score(images if images is not None else res.x0, ps)
    recs = []
    for j, (p, s) in enumerate(batch):
        rec = {"method": st.method, "weights": st.weights_dict, "lambda": st.lam, "prompt": p, "seed": s,
               "rewards": {k: float(v[j]) for k, v in scores.items()},
               "seconds": seconds, "nfe": float(res.nfe)}
        if sink.run_settings is not None:
            rec["run"] = sink.run_settings
        if sink.images_dir is not None and images is not None:
            name = _image_name(record_key(rec))
            _save_png(images[j], sink.images_dir / name)
            rec["image"] = os.path.relpath(sink.images_dir / name, sink.records_path.parent)
        writer.write(rec)
        recs.append(rec)
    return recs


def _write_work(backend: Backend, work: list, options: MethodOptions, sink: _Sink, bar, stats: SweepStats,
                on_batch: Callable[[Setting, list[dict]], None] | None) -> None:
    """Every batch of ``work``, its records appended to ``sink.out_path`` as soon as it is scored."""
    with RecordWriter(sink.out_path) as writer:
        for st, batch in work:
            bar.set_postfix_str(setting_key(st.method, st.weights_dict, st.lam)[:40])
            recs = _batch_records(backend, st, batch, options, sink, writer)
            stats.generated += len(batch)
            bar.update(len(batch))
            if on_batch is not None:
                on_batch(st, recs)


def run_sweep(
    backend: Backend,
    settings: Sequence[Setting],
    prompts: Sequence[str],
    seeds: Sequence[int],
    records_path: str | os.PathLike,
    *,
    options: MethodOptions = MethodOptions(),
    batch_size: int = 8,
    images_dir: str | os.PathLike | None = None,
    process_index: int = 0,
    num_processes: int = 1,
    progress: bool = True,
    warmup: bool = True,
    on_batch: Callable[[Setting, list[dict]], None] | None = None,
    run_settings: Mapping | None = None,
) -> SweepStats:
    """Run (this process's share of) a sweep, appending one record per image.

    Args:
        backend: the model family (``ToyBackend``, ``DiffusersBackend``...).
        settings: from :func:`build_settings`.
        prompts, seeds: every setting generates every (prompt, seed) pair; image (p, s) gets the
            same noise in every setting (``methods.sample_seed``).
        records_path: the JSONL file; with ``num_processes > 1`` this process writes its shard; a
            single process first merges any shards a killed parallel run left.
        batch_size: images per generation call (the same for every method, so seconds compare).
        images_dir: if given, save each image as PNG there and record its path relative to the
            records file's folder.
        process_index, num_processes: this process takes settings[process_index::num_processes].
        warmup: run one untimed, unrecorded image first so one-off costs do not land on a method.
        on_batch: called after each batch's records are written (tests use it to simulate a kill).
        run_settings: the settings that make an image what it is besides its setting, prompt and seed
            (model, adapters, steps, guidance, eta, method options, scored rewards; JSON-able). Stored in
            every record as ``"run"``; a file with records made under other settings is refused
            (:func:`check_run_settings`).
    """
    from tqdm.auto import tqdm

    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if not prompts or not seeds:
        raise ValueError("a sweep needs at least one prompt and one seed")
    records_path = Path(records_path)
    done = _records_done(records_path, num_processes, run_settings)
    mine = list(settings)[process_index::num_processes]
    # dict.fromkeys: a prompt or seed listed twice is one image (one record), not a duplicate.
    pairs = list(dict.fromkeys((str(p), int(s)) for p in prompts for s in seeds))
    stats = SweepStats(settings=len(mine))
    work = _todo(mine, pairs, done, batch_size, stats)
    sink = _Sink.make(records_path, process_index, num_processes, images_dir, run_settings)
    if warmup and work:
        generate(backend, Setting.make("base"), [pairs[0][0]], [pairs[0][1]], options)
    bar = tqdm(total=sum(len(b) for _, b in work), disable=not progress, desc=f"sweep[{process_index}]",
               unit="img", dynamic_ncols=True)
    _write_work(backend, work, options, sink, bar, stats, on_batch)
    bar.close()
    return stats
