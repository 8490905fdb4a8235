"""Sweep records: one JSON object per generated image, one line each, in a JSONL file.

A record::

    {"method": "mpa", "weights": {"r1": 0.5, "r2": 0.5}, "lambda": 1.0,
     "prompt": "7", "seed": 3, "rewards": {"r1": -0.41, "r2": 1.2},
     "seconds": 0.031, "nfe": 40, "image": "images/mpa_....png"}

``weights`` is None for settings that have none (the base model); ``lambda`` is None for
methods without a KL strength. ``seconds`` is the generation wall time per image (scoring
excluded), ``nfe`` the number of denoiser evaluations per image (reward gradients are not
model evaluations and show up only in ``seconds``).

Appending is kill-safe: each record goes out as one ``os.write`` of a complete line followed by
fsync, so a kill can leave at most one partial last line; :func:`read_records` skips it and
:class:`RecordWriter` cuts it off before appending (no half line ever merges with a new one). A
complete record on a last line without its newline (a file written by other code) is kept.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Iterable, Mapping
from pathlib import Path

from .._io import atomic_write

__all__ = ["REQUIRED", "setting_key", "record_key", "read_records", "RecordWriter", "write_records"]

REQUIRED = ("method", "weights", "lambda", "prompt", "seed", "rewards", "seconds")


def _fmt(x: float) -> str:
    return f"{float(x):.6g}"


def setting_key(method: str, weights: Mapping[str, float] | None, lam: float | None) -> str:
    """A canonical string for (method, w, lambda): weights sorted by name, numbers to 6 digits."""
    w = "-" if weights is None else ",".join(f"{k}={_fmt(v)}" for k, v in sorted(weights.items()))
    return f"{method}|{w}|{'-' if lam is None else _fmt(lam)}"


def record_key(rec: Mapping) -> tuple[str, str, int]:
    """(setting key, prompt, seed): two records with the same key are the same image."""
    return setting_key(rec["method"], rec["weights"], rec["lambda"]), str(rec["prompt"]), int(rec["seed"])


def _check(rec: Mapping, where: str) -> None:
    missing = [k for k in REQUIRED if k not in rec]
    if missing:
        raise ValueError(f"{where}: record lacks field(s) {missing}; required: {list(REQUIRED)}")


def read_records(path: str | os.PathLike, *, missing_ok: bool = False) -> list[dict]:
    """All complete records of a JSONL file, in file order.

    A last line without its newline is skipped if it is a cut write (not a whole record). A
    malformed line anywhere else is an error naming the line, since it cannot come from a kill.
    """
    path = Path(path)
    if not path.exists():
        if missing_ok:
            return []
        raise FileNotFoundError(f"records file {path} does not exist")
    data = path.read_bytes()
    lines = data.split(b"\n")
    complete, tail = lines[:-1], lines[-1]  # tail is b"" when the file ends with a newline
    out = []
    for i, line in enumerate(complete, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError as exc:
            raise ValueError(f"{path}:{i}: malformed record ({exc.msg})") from None
        _check(rec, f"{path}:{i}")
        out.append(rec)
    rec = _complete(tail)
    if rec is not None:  # a whole record that only lacks its newline (a file written by other code)
        out.append(rec)
    return out  # otherwise a partial last line: the write was cut; the record is simply not there


def _complete(tail: bytes) -> dict | None:
    """The record on a last line without its newline, or None if that line is a cut write.

    Our writes put a record and its newline in one ``os.write``, so a cut one is never valid JSON
    with every field; a line that is must have come whole from elsewhere.
    """
    if not tail.strip():
        return None
    try:
        rec = json.loads(tail)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return rec if isinstance(rec, dict) and all(k in rec for k in REQUIRED) else None


def _json_default(x):
    if hasattr(x, "item"):  # numpy / torch scalars
        return x.item()
    raise TypeError(f"cannot write {type(x).__name__} in a record")


def _encode(rec: Mapping) -> bytes:
    _check(rec, "record")
    for name, v in rec["rewards"].items():
        if not math.isfinite(float(v)):
            # NaN is not JSON, and one NaN would turn every mean and front of its setting into NaN:
            # refuse the record, naming the image, rather than write it.
            raise ValueError(f"reward {name!r} is not finite ({v}) for {record_key(rec)}")
    return (json.dumps(dict(rec), default=_json_default, separators=(",", ":")) + "\n").encode()


class RecordWriter:
    """Append records to a JSONL file, one complete line per ``os.write``, fsync'd.

    On opening, a partial last line (left by a kill) is truncated away. Use as a context manager.
    """

    def __init__(self, path: str | os.PathLike, *, fsync: bool = True) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.fsync = fsync
        self._repair()
        self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)

    def _repair(self) -> None:
        if not self.path.exists():
            return
        data = self.path.read_bytes()
        if data and not data.endswith(b"\n"):
            cut = data.rfind(b"\n") + 1
            if _complete(data[cut:]) is not None:  # a whole record: end its line instead
                with open(self.path, "ab") as f:
                    f.write(b"\n")
            else:
                os.truncate(self.path, cut)

    def write(self, rec: Mapping) -> None:
        line = _encode(rec)
        n = os.write(self._fd, line)
        if n != len(line):  # a short write on a regular file means the disk is full
            raise OSError(f"short write to {self.path} ({n} of {len(line)} bytes)")
        if self.fsync:
            os.fsync(self._fd)

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None

    def __enter__(self) -> RecordWriter:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def write_records(path: str | os.PathLike, records: Iterable[Mapping]) -> None:
    """Write a whole records file atomically (temp file in the same folder, then os.replace)."""
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            for rec in records:
                f.write(_encode(rec))
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
