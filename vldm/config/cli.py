"""Command lines built from a config dataclass (sharder, synthetic corpus, sampler): one option per field, its
help and default from the field.

Fields without a default are positional. `--flag/--no-flag` for booleans. Values go through
`vldm.config.from_dict`, so types and `validate()` are checked exactly as for YAML configs.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import typing
from typing import Any, Literal, TypeVar, get_args, get_origin

from vldm.config.core import ConfigError, from_dict

T = TypeVar("T")


def build_parser(cls: type, prog: str | None = None, description: str | None = None) -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(
        prog=prog, description=description or cls.__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp, text = hints[f.name], f.metadata.get("help", "")
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:  # type: ignore[misc]
            ap.add_argument(f.name, metavar=f.name.upper(), help=text)
            continue
        flag = "--" + f.name.replace("_", "-")
        if tp is bool:
            ap.add_argument(
                flag,
                dest=f.name,
                action=argparse.BooleanOptionalAction,
                default=f.default,
                help=f"{text} (default: {'on' if f.default else 'off'})",
            )
        elif get_origin(tp) is Literal:
            ap.add_argument(
                flag, dest=f.name, choices=list(get_args(tp)), default=f.default, help=f"{text} (default: {f.default})"
            )
        else:
            shown = repr(f.default) if f.default == "" else f.default
            ap.add_argument(
                flag, dest=f.name, default=f.default, metavar=f.name.upper(), help=f"{text} (default: {shown})"
            )
    return ap


def parse(cls: type[T], argv: list[str] | None = None, prog: str | None = None, description: str | None = None) -> T:
    """argv -> validated config; a bad value exits with status 2 and a message naming the option."""
    ap = build_parser(cls, prog, description)
    ns = ap.parse_args(argv)
    values: dict[str, Any] = vars(ns)
    try:
        return from_dict(cls, values)
    except ConfigError as e:
        ap.print_usage(sys.stderr)
        ap.exit(2, f"{ap.prog}: error: {e}\n")
        raise  # unreachable
