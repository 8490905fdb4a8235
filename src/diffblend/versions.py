"""The installed stack: the one known incompatible pair, checked with one clear message.

transformers' PEFT integration refuses a peft older than its ``MIN_PEFT_VERSION`` (transformers 5.24
needs peft >= 0.22) with a ValueError from deep inside a model's ``add_adapter``. An install made
without the project's lock (``requirements/lock.txt``) can land on such a pair; :func:`check_stack`
names both packages and the fix before anything is loaded.
"""

from __future__ import annotations

from importlib import metadata

__all__ = ["IncompatibleStack", "installed", "check_stack"]


class IncompatibleStack(ImportError):
    """Two installed packages that do not work together; the message names both and the fix."""


def installed(name: str) -> str | None:
    """The installed version of distribution ``name``, or None."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def check_stack() -> None:
    """Raise :class:`IncompatibleStack` if the installed transformers needs a newer peft than the one installed."""
    from packaging.version import Version

    t, p = installed("transformers"), installed("peft")
    if t is None or p is None:
        return
    try:
        from transformers.integrations.peft import MIN_PEFT_VERSION
    except ImportError:  # an older transformers without the constant
        return
    if Version(p) < Version(MIN_PEFT_VERSION):
        raise IncompatibleStack(
            f"transformers {t} needs peft >= {MIN_PEFT_VERSION}, but peft {p} is installed; upgrade peft "
            f"(pip install 'peft>={MIN_PEFT_VERSION}') or, if no such peft is released yet, install a transformers "
            f"that accepts peft {p} (pip install 'transformers<{t}'); the project's tested set: "
            f"pip install -c requirements/lock.txt -e .")
