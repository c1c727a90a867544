"""Typed configuration: dataclasses hold every default; YAML and `key=value` only override them.

Rules (shared by every entry point):
- a field is declared once, in a dataclass, with `doc("...")` metadata saying what it does;
- YAML files and command-line overrides may only name existing fields: an unknown key or a value of
  the wrong type raises `ConfigError` naming the dotted key, before anything is launched;
- `to_dict(cfg)` is the resolved config; saved with a run, it is enough to rebuild the model.
"""

from __future__ import annotations

import dataclasses
import difflib
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, get_args, get_origin

import yaml

from vldm.io import atomic_write_text

T = TypeVar("T")


class ConfigError(ValueError):
    """A config value or key is wrong; the message names the dotted key."""


def doc(help: str, **kw: Any) -> dict:
    """Metadata for `dataclasses.field(metadata=doc(...))`: the field's one-line documentation."""
    return {"help": help, **kw}


def field_(default: Any = dataclasses.MISSING, help: str = "", default_factory: Any = dataclasses.MISSING) -> Any:
    """`dataclasses.field` with a one-line help text (the config reference is generated from these)."""
    if default_factory is not dataclasses.MISSING:
        return dataclasses.field(default_factory=default_factory, metadata=doc(help))
    return dataclasses.field(default=default, metadata=doc(help))


def _type_hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    if get_origin(tp) is Literal:
        return " / ".join(repr(c) for c in get_args(tp))
    if get_origin(tp) is not None:
        return str(tp).replace("typing.", "")
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, key: str) -> Any:
    """Check (and gently convert) `value` against annotation `tp`; raise ConfigError naming `key`."""
    origin = get_origin(tp)
    if tp is Any:
        return value
    if origin is typing.Union or origin is types.UnionType:
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, key)
            except ConfigError as e:
                errors.append(str(e))
        raise ConfigError(f"{key}: {value!r} is not a valid {_describe(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        if value not in choices:
            raise ConfigError(f"{key}: {value!r} is not one of {list(choices)}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping for section {tp.__name__}, got {value!r}")
        return from_dict(tp, value, prefix=key)
    if origin in (list, tuple):
        if isinstance(value, str):
            # `key=a,b,c` on the command line
            value = [v for v in value.split(",") if v != ""] if value else []
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        args = get_args(tp)
        if origin is tuple and args and args[-1] is not Ellipsis:
            if len(args) != len(value):
                raise ConfigError(f"{key}: expected {len(args)} items, got {len(value)}")
            out = [_coerce(v, a, f"{key}[{i}]") for i, (v, a) in enumerate(zip(value, args))]
        else:
            inner = args[0] if args else Any
            out = [_coerce(v, inner, f"{key}[{i}]") for i, v in enumerate(value)]
        return tuple(out) if origin is tuple else out
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = get_args(tp) or (Any, Any)
        return {_coerce(k, kt, f"{key}.<key>"): _coerce(v, vt, f"{key}.{k}") for k, v in value.items()}
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"{key}: expected a bool, got {value!r}")
    if tp is int:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected an int, got {value!r}")
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str):
            try:
                return int(float(value)) if float(value).is_integer() else _fail_int(key, value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected an int, got {value!r}")
    if tp is float:
        if isinstance(value, bool):
            raise ConfigError(f"{key}: expected a float, got {value!r}")
        if isinstance(value, (int, float)):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{key}: expected a float, got {value!r}")
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise ConfigError(f"{key}: expected a string, got {value!r}")
    if isinstance(tp, type) and not isinstance(value, tp):
        raise ConfigError(f"{key}: expected {tp.__name__}, got {value!r}")
    return value


def _fail_int(key: str, value: Any) -> int:
    raise ConfigError(f"{key}: expected an int, got {value!r}")


def _unknown(key: str, name: str, cls: type) -> ConfigError:
    names = [f.name for f in dataclasses.fields(cls)]
    close = difflib.get_close_matches(name, names, n=1)
    hint = f" (did you mean '{close[0]}'?)" if close else f" (valid: {', '.join(names)})"
    return ConfigError(f"unknown config key '{key}'{hint}")


def from_dict(cls: type[T], data: dict, prefix: str = "") -> T:
    """Build dataclass `cls` from a (partial) nested dict; missing fields keep their defaults."""
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or '<root>'}: expected a mapping, got {data!r}")
    hints = _type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    kwargs = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k not in names:
            raise _unknown(key, str(k), cls)
        kwargs[k] = _coerce(v, hints[k], key)
    try:
        obj = cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as e:
        raise ConfigError(f"{prefix or '<root>'}: {e}") from e
    validate = getattr(obj, "validate", None)
    if callable(validate):
        try:
            validate()
        except ConfigError:
            raise
        except (AssertionError, ValueError) as e:
            raise ConfigError(f"{prefix + ': ' if prefix else ''}{e}") from e
    return obj


def to_dict(cfg: Any) -> Any:
    """Plain nested dict/list/scalars (tuples become lists) for YAML/JSON."""
    if dataclasses.is_dataclass(cfg):
        return {f.name: to_dict(getattr(cfg, f.name)) for f in dataclasses.fields(cfg)}
    if isinstance(cfg, (list, tuple)):
        return [to_dict(v) for v in cfg]
    if isinstance(cfg, dict):
        return {k: to_dict(v) for k, v in cfg.items()}
    return cfg


def _set_dotted(tree: dict, dotted: str, value: Any) -> None:
    parts = dotted.split(".")
    node = tree
    for p in parts[:-1]:
        nxt = node.setdefault(p, {})
        if not isinstance(nxt, dict):
            raise ConfigError(f"{dotted}: '{p}' is not a section")
        node = nxt
    node[parts[-1]] = value


def parse_override(text: str) -> tuple[str, Any]:
    """`optim.lr=1e-4` -> ("optim.lr", 1e-4). The value is parsed as YAML (so 1e-4, true, [1,2] work)."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' is not of the form key=value")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() != "" else ""
    except yaml.YAMLError:
        value = raw
    # YAML reads 1e-4 as a string (no dot): let the field's type decide by passing the raw text on.
    if isinstance(value, str):
        value = raw
    return key, value


def merge_tree(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge_tree(out[k], v)
        else:
            out[k] = v
    return out


def load_yaml(path: str | os.PathLike) -> dict:
    p = Path(path)
    if not p.exists():
        raise ConfigError(f"config file not found: {p}")
    with open(p) as f:
        data = yaml.safe_load(f) or {}
    if not isinstance(data, dict):
        raise ConfigError(f"{p}: top level must be a mapping")
    base = data.pop("base", None)
    if base:
        # `base: other.yaml` (relative to this file) lets an override file extend another one.
        data = merge_tree(load_yaml(p.parent / base), data)
    return data


def build_config(
    cls: type[T], yaml_paths: list[str] | tuple[str, ...] = (), overrides: list[str] | tuple[str, ...] = ()
) -> T:
    """Defaults <- each YAML file in order <- `key=value` overrides; validated against `cls`."""
    tree: dict = {}
    for y in yaml_paths:
        tree = merge_tree(tree, load_yaml(y))
    for o in overrides:
        k, v = parse_override(o)
        _set_dotted(tree, k, v)
    return from_dict(cls, tree)


def replace(cfg: T, **changes: Any) -> T:
    return dataclasses.replace(cfg, **changes)


def dump_yaml(cfg: Any, path: str | os.PathLike | None = None) -> str:
    text = yaml.safe_dump(to_dict(cfg), sort_keys=False)
    if path is not None:
        atomic_write_text(path, text)
    return text


def reference(cls: type, prefix: str = "") -> list[tuple[str, str, str, str]]:
    """(dotted key, type, default, help) rows for every field: the config reference (docs/configuration.md)."""
    rows = []
    hints = _type_hints(cls)
    for f in dataclasses.fields(cls):
        key = f"{prefix}.{f.name}" if prefix else f.name
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            rows.extend(reference(tp, key))
            continue
        if f.default is not dataclasses.MISSING:
            default = f.default
        elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
            default = to_dict(f.default_factory())  # type: ignore[misc]
        else:
            default = "(required)"
        rows.append((key, _describe(tp), repr(default), f.metadata.get("help", "")))
    return rows
