"""CLI flags derived from the config dataclasses (fields with ``metadata['cli']``)."""

from __future__ import annotations

import argparse
import dataclasses
import typing
from typing import Any, TypeVar

T = TypeVar("T")


def _flag(f: dataclasses.Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def _base_type(tp: Any) -> type:
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) is tuple:
        return args[0]
    return args[0] if args else tp


def add_dataclass_args(parser: argparse.ArgumentParser, cls: type, exclude: tuple[str, ...] = (),
                       include: tuple[str, ...] | None = None) -> None:
    """A flag per CLI field of ``cls`` (nested dataclasses too), but those in ``exclude`` or,
    with ``include``, those not in it."""
    hints = typing.get_type_hints(cls)
    group = parser.add_argument_group(cls.__name__)
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            add_dataclass_args(parser, hints[f.name], exclude, include)
            continue
        if not f.metadata.get("cli") or f.name in exclude or (include is not None and f.name not in include):
            continue
        tp = hints[f.name]
        names = [_flag(f)] + ([f.metadata["short"]] if f.metadata.get("short") else [])
        kw: dict[str, Any] = {"dest": f.name, "help": f.metadata["help"], "default": argparse.SUPPRESS}
        if tp is bool:                 # a flag on by default is turned off by --no-NAME
            kw["action"] = argparse.BooleanOptionalAction if f.default is True else "store_true"
        elif typing.get_origin(tp) is tuple:
            kw.update(action="append", type=_base_type(tp))
        else:
            # a field with its own parser takes the text; the dataclass parses it (one-line errors)
            kw["type"] = str if f.metadata.get("parse") else _base_type(tp)
            if f.metadata.get("choices"):
                kw["choices"] = f.metadata["choices"]
            if "default" not in kw["help"]:
                kw["help"] += f" (default: {f.default})"
        group.add_argument(*names, **kw)


def dataclass_from_args(cls: type[T], ns: argparse.Namespace, **extra: Any) -> T:
    hints = typing.get_type_hints(cls)
    values = {f.name: getattr(ns, f.name) for f in dataclasses.fields(cls) if hasattr(ns, f.name)}
    for f in dataclasses.fields(cls):
        if f.metadata.get("nested"):
            values[f.name] = dataclass_from_args(hints[f.name], ns)
    for f in dataclasses.fields(cls):
        if f.name in values and isinstance(values[f.name], list):
            values[f.name] = tuple(values[f.name])
    values.update(extra)
    return cls(**values)
