"""The ``diffblend`` command: a thin dispatcher over the library.

Each subcommand lives in ``diffblend.commands.<name>`` and defines ``add_parser(subparsers)``
(light: no heavy imports at module level) and ``run(args) -> int``. Errors a user can fix
(``ValueError``, ``OSError`` such as a missing file or an output path that is a folder, ``KeyError``
from a registry) print as one line, not a
traceback; ``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import sys


# In the order shown by --help. A module that is not there (yet) simply gives no command.
COMMANDS = ("demo", "generate", "app", "toy", "train_base", "finetune", "sweep", "report", "rewards", "calibrate")


class UserError(Exception):
    """An error caused by the user's input; printed as one line."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="diffblend",
        description="Diffusion Blend: inference-time multi-preference alignment for diffusion models.",
    )
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        modname = f"diffblend.commands.{name}"
        if importlib.util.find_spec(modname) is None:
            continue
        importlib.import_module(modname).add_parser(sub)
    return parser


def _one_line_warnings(command: str) -> None:
    """Show the library's warnings as one line each (``diffblend CMD: warning: ...``), not as source excerpts."""
    import warnings

    def show(message, category, filename, lineno, file=None, line=None):  # noqa: ARG001
        print(f"diffblend {command}: warning: {message}", file=file or sys.stderr)

    warnings.showwarning = show


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    if not args.debug:
        _one_line_warnings(args.command)
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("diffblend: interrupted", file=sys.stderr)
        return 130
    except (UserError, ValueError, OSError, KeyError, TypeError, ImportError) as exc:  # OSError: a file / folder
        if args.debug:
            raise
        msg = exc.args[0] if isinstance(exc, KeyError) and exc.args else exc
        print(f"diffblend {args.command}: error: {msg}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
