"""Small helpers shared by the CLI subcommands."""

from __future__ import annotations


def parse_weights(text: str) -> dict[str, float]:
    """Parse ``"name=0.3,other=0.7"`` into ``{"name": 0.3, "other": 0.7}``.

    Raises:
        ValueError: naming the malformed item and the expected form.
    """
    out: dict[str, float] = {}
    if not text or not text.strip():
        raise ValueError("--weights is empty; expected NAME=W[,NAME=W...], e.g. compressibility=0.3,legibility=0.7")
    for item in text.split(","):
        name, sep, value = item.partition("=")
        name = name.strip()
        if not sep or not name:
            raise ValueError(f"--weights item {item!r} is malformed; expected NAME=W, e.g. legibility=0.7")
        if name in out:
            raise ValueError(f"--weights names {name!r} twice")
        try:
            out[name] = float(value)
        except ValueError:
            raise ValueError(f"--weights item {item!r}: {value!r} is not a number") from None
    return out
