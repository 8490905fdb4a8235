"""``diffblend rewards``: list the registered rewards, what each measures and what it needs installed."""

from __future__ import annotations

import argparse

# reward -> (importable module, pip package) it needs beyond diffblend's core dependencies
NEEDS = {"ocr": ("rapidocr_onnxruntime", "rapidocr-onnxruntime")}


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "rewards", help="list the registered rewards and what each needs",
        description="List every registered reward: its range and direction, the options it needs (a model "
                    "folder, a head file, a url) and whether the packages it needs are installed here.")
    p.set_defaults(func=run)
    return p


def _installed(module: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(module) is not None


def run(args: argparse.Namespace) -> int:
    from ..rewards import reward_info

    for name, text in reward_info().items():
        module, package = NEEDS.get(name, (None, None))
        status = "" if module is None else f"  [needs {package}: {'installed' if _installed(module) else 'MISSING'}]"
        print(f"{name}: {text}{status}")
    return 0
