"""Command-line options built from a config dataclass: each field's name, type, default, help and
choices are declared once, on the field (``diffblend._fields.setting``), and become one option.

Field type -> option (``X | None`` fields also take the word ``none``):

    int, float, str      ``--name VALUE`` (a string field with choices: one of them)
    bool                 ``--name`` (a flag; ``--name / --no-name`` when the default is True)
    tuple[T, ...]        ``--name A,B,C`` (comma-separated; empty text: none)
    tuple[T1, T2]        ``--name A,B`` (exactly two)
    dict                 ``--name KEY=VALUE`` (repeat; string values)

Numbers are checked by argparse (usage error); lists, pairs and ``KEY=VALUE`` items are converted by
:meth:`ConfigOptions.values`, whose ``ValueError`` names the option. The dataclass checks ranges.
"""

from __future__ import annotations

import argparse
import dataclasses
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

__all__ = ["Opt", "ConfigOptions", "add_config_options"]

NONE = "none"  # the command-line spelling of None for an optional field


@dataclass(frozen=True)
class Opt:
    """How one field shows on the command line; every part is optional.

    flag: the long option (default ``--`` + prefix + the field name with dashes); short: e.g. ``-o``;
    help: replaces the field's help; metavar; required: the option has no default and must be given.
    """

    flag: str | None = None
    short: str | None = None
    help: str | None = None
    metavar: str | None = None
    required: bool = False


@dataclass(frozen=True)
class _Field:
    name: str  # the dataclass field
    dest: str  # the argparse destination
    flag: str
    kind: str  # "scalar", "list", "pair", "dict", "flag"
    item: Any  # the scalar type (of the items for lists and pairs)
    optional: bool  # X | None
    choices: tuple[str, ...] | None
    default: Any  # the field's default


def _unwrap(tp: Any) -> tuple[Any, bool]:
    """(the type without None, whether None was allowed)."""
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1 and len(typing.get_args(tp)) == 2:
            return args[0], True
        raise TypeError(f"unsupported union type {tp!r} for a command-line option")
    return tp, False


def _kind(tp: Any, name: str) -> tuple[str, Any]:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if tp is bool:
        return "flag", bool
    if tp in (int, float, str):
        return "scalar", tp
    if origin is tuple and len(args) == 2 and args[1] is Ellipsis and args[0] in (int, float, str):
        return "list", args[0]
    if origin is tuple and len(args) == 2 and args[0] == args[1] and args[0] in (int, float, str):
        return "pair", args[0]
    if tp is dict or origin is dict:
        return "dict", str
    raise TypeError(f"field {name!r}: no command-line form for type {tp!r}; skip it or give it a simpler type")


def _optional_scalar(item: type):
    def convert(text: str):
        return None if text.strip().lower() == NONE else item(text)

    convert.__name__ = item.__name__  # argparse names the type in its error: "invalid float value"
    return convert


def _shown(value: Any) -> str:
    if value is None:
        return NONE
    if isinstance(value, (tuple, dict)) and not value:
        return NONE
    if isinstance(value, tuple):
        return ",".join(map(str, value))
    return str(value)


class ConfigOptions:
    """The options added for one dataclass; :meth:`values` reads them back as field values."""

    def __init__(self, cls: type, fields: Sequence[_Field]) -> None:
        self.cls = cls
        self.fields = list(fields)

    @property
    def dests(self) -> dict[str, str]:
        """{field name: argparse destination}."""
        return {f.name: f.dest for f in self.fields}

    def values(self, args: argparse.Namespace) -> dict[str, Any]:
        """{field name: value} from the parsed ``args`` (lists, pairs and KEY=VALUE items converted)."""
        return {f.name: _convert(f, getattr(args, f.dest)) for f in self.fields}


def _convert(f: _Field, value: Any) -> Any:
    if f.kind == "dict":
        return dict(f.default or {}) if value is None else _key_values(f, value)
    if not isinstance(value, str):
        return value  # a default, or converted by argparse
    if f.optional and value.strip().lower() == NONE:
        return None
    if f.kind in ("list", "pair"):
        return _items(f, value)
    return value


def _items(f: _Field, text: str) -> tuple:
    parts = [p.strip() for p in text.split(",")] if text.strip() else []
    if any(not p for p in parts):
        raise ValueError(f"{f.flag} {text!r} has an empty item; expected comma-separated values")
    expected = f"{f.flag} {text!r}: expected {'two ' if f.kind == 'pair' else ''}comma-separated " \
               f"{f.item.__name__} values"
    try:
        out = tuple(f.item(p) for p in parts)
    except ValueError:
        raise ValueError(expected) from None
    if f.kind == "pair" and len(out) != 2:
        raise ValueError(expected)
    return out


def _key_values(f: _Field, items: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"{f.flag} {item!r} is malformed; expected KEY=VALUE")
        out[key.strip()] = value.strip()
    return out


def add_config_options(parser: argparse.ArgumentParser | Any, cls: type, *, prefix: str = "",
                       skip: Sequence[str] = (), opts: Mapping[str, Opt] | None = None) -> ConfigOptions:
    """Add one option per field of the dataclass ``cls`` (but ``skip``) to ``parser`` (or an
    argument group); ``opts`` adjusts a field's flag, help, metavar or requiredness."""
    opts = dict(opts or {})
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted((set(opts) | set(skip)) - names)
    if unknown:
        raise ValueError(f"{cls.__name__} has no field(s) {unknown}")
    out = []
    for fld in dataclasses.fields(cls):
        if fld.name not in skip:
            out.append(_add_one(parser, fld, hints[fld.name], prefix, opts.get(fld.name, Opt())))
    return ConfigOptions(cls, out)


def _default(fld: dataclasses.Field) -> Any:
    if fld.default is not dataclasses.MISSING:
        return fld.default
    if fld.default_factory is not dataclasses.MISSING:
        return fld.default_factory()
    return None


def _add_one(parser, fld: dataclasses.Field, tp: Any, prefix: str, opt: Opt) -> _Field:
    base, optional = _unwrap(tp)
    kind, item = _kind(base, fld.name)
    flag = opt.flag or "--" + (prefix + fld.name).replace("_", "-")
    choices = fld.metadata.get("choices")
    default = _default(fld)
    spec = _Field(fld.name, flag.lstrip("-").replace("-", "_"), flag, kind, item, optional,
                  None if choices is None else tuple(choices) + ((NONE,) if optional else ()), default)
    text = opt.help or fld.metadata.get("help", "")
    kw: dict[str, Any] = {"dest": spec.dest, "choices": spec.choices}
    if opt.required:
        kw["required"] = True
    elif kind != "flag" or default:
        text = f"{text} (default: {_shown(default)})"
    if kind == "flag":
        kw.pop("choices")
        kw["action"] = argparse.BooleanOptionalAction if default else "store_true"
    elif kind == "dict":
        kw.update(action="append", metavar="KEY=VALUE")
        text += "; repeat for more"
    elif kind == "scalar" and item is not str:
        kw["type"] = _optional_scalar(item) if optional else item
    elif kind in ("list", "pair"):
        kw["metavar"] = "A,B" if kind == "pair" else "A,B,..."
    if opt.metavar:
        kw["metavar"] = opt.metavar
    if not opt.required and kind != "dict":
        kw["default"] = default
    names = [opt.short, flag] if opt.short else [flag]
    parser.add_argument(*names, help=text.replace("%", "%%"), **kw)
    return spec
