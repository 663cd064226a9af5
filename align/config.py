"""Typed configuration: configs are dataclasses, YAML is only their serialised form.

`load_config(Config, "file.yaml", ["train.lr=0.1"])` reads the file, applies `dotted.key=value`
overrides and builds the dataclass with type checking. Every error is a `ConfigError` naming the
offending key as a dotted path (`stages[0].name` inside lists) and where the value came from.
A config class may define `validate(self)`, which signals impossible values with `check()`.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import os
import re
import tempfile
import types
import typing
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal, TypeVar

import yaml

T = TypeVar("T")
COMMAND_LINE = "<command line>"
# Floats PyYAML leaves as strings because they have no dot, such as `lr: 1e-5`.
_EXPONENT_FLOAT = re.compile(r"[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+")


class ConfigError(ValueError):
    """Bad user configuration; the message names the key (dotted path) and the source."""


class _InvalidValue(ConfigError):
    """Raised by `check`; carries the key relative to the dataclass whose validate() failed."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"invalid value for '{key}': {reason}")
        self.key, self.reason = key, reason


def check(condition: bool, key: str, message: str) -> None:
    """Raises ConfigError for `key` (relative to the config being validated) unless `condition`.

    Args:
        condition: what must hold.
        key: the field, relative to the dataclass whose `validate()` calls this.
        message: why the value is impossible, e.g. "must be >= 2 (got 1)".
    """
    if not condition:
        raise _InvalidValue(key, message)


def _join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) else str(tp).replace("typing.", "")


def _describe(value: Any) -> str:
    if value is None:
        return "null"
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 60 else text[:57] + '...'}"


class _Builder:
    """Converts plain data to typed values; knows which keys came from command-line overrides."""

    def __init__(self, source: str, override_keys: Sequence[str] = ()) -> None:
        self.source, self.override_keys = source, tuple(override_keys)

    def where(self, path: str) -> str:
        for key in self.override_keys:
            if path == key or path.startswith((key + ".", key + "[")):
                return COMMAND_LINE
        return self.source

    def wrong_type(self, path: str, tp: Any, value: Any) -> ConfigError:
        key = f"key '{path}'" if path else "the top level"
        return ConfigError(
            f"{key} in {self.where(path)} expects {_type_name(tp)}, got {_describe(value)}"
        )

    def convert(self, tp: Any, value: Any, path: str) -> Any:
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if tp is Any:
            return value
        if dataclasses.is_dataclass(tp):
            if not isinstance(value, dict):
                raise self.wrong_type(path, f"a mapping ({tp.__name__})", value)
            return self.build(tp, value, path)
        if origin in (typing.Union, types.UnionType):
            if value is None and type(None) in args:
                return None
            options = [a for a in args if a is not type(None)]
            if len(options) == 1:
                return self.convert(options[0], value, path)
            for option in options:
                try:
                    return self.convert(option, value, path)
                except ConfigError:
                    pass
            raise self.wrong_type(path, tp, value)
        if origin is Literal:
            if any(value == a and type(value) is type(a) for a in args):
                return value
            allowed = ", ".join(repr(a) for a in args)
            raise ConfigError(
                f"key '{path}' in {self.where(path)} must be one of {allowed}; got {value!r}"
            )
        if origin is list:
            if not isinstance(value, list | tuple):
                raise self.wrong_type(path, tp, value)
            item = args[0] if args else Any
            return [self.convert(item, v, f"{path}[{i}]") for i, v in enumerate(value)]
        if origin is dict:
            if not isinstance(value, dict):
                raise self.wrong_type(path, tp, value)
            key_type, item = args if args else (Any, Any)
            for k in value:
                if key_type is str and not isinstance(k, str):
                    raise ConfigError(
                        f"key '{path}' in {self.where(path)} has a non-string key {k!r}"
                    )
            return {k: self.convert(item, v, _join(path, str(k))) for k, v in value.items()}
        if tp is float:
            if isinstance(value, str) and _EXPONENT_FLOAT.fullmatch(value.strip()):
                return float(value)
            if isinstance(value, int | float) and not isinstance(value, bool):
                return float(value)
            raise self.wrong_type(path, tp, value)
        if tp is int and isinstance(value, bool):
            raise self.wrong_type(path, tp, value)
        if isinstance(tp, type):
            if isinstance(value, tp):
                return value
            raise self.wrong_type(path, tp, value)
        raise TypeError(f"unsupported config annotation {tp!r} for key '{path}'")

    def build(self, cls: type[T], data: dict, path: str = "") -> T:
        fields = [f for f in dataclasses.fields(cls) if f.init]
        names = [f.name for f in fields]
        for key in data:
            if key not in names:
                full = _join(path, str(key))
                close = difflib.get_close_matches(str(key), names, n=1)
                hint = (
                    f"did you mean '{_join(path, close[0])}'?"
                    if close
                    else f"valid keys: {', '.join(names)}"
                )
                raise ConfigError(f"unknown key '{full}' in {self.where(full)}; {hint}")
        hints = typing.get_type_hints(cls)
        values = {}
        for f in fields:
            if f.name in data:
                values[f.name] = self.convert(hints[f.name], data[f.name], _join(path, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                full = _join(path, f.name)
                raise ConfigError(f"missing required key '{full}' in {self.where(full)}")
        instance = cls(**values)
        if callable(getattr(instance, "validate", None)):
            try:
                instance.validate()
            except _InvalidValue as error:
                full = _join(path, error.key)
                raise ConfigError(
                    f"invalid value for '{full}' in {self.where(full)}: {error.reason}"
                ) from None
        return instance


def from_dict(cls: type[T], data: dict, source: str = "<config>") -> T:
    """Builds dataclass `cls` from plain data, recursively, checking types and running validate().

    Args:
        cls: the config dataclass.
        data: plain nested dicts/lists/scalars, e.g. from YAML.
        source: where `data` came from, named in error messages.

    Returns:
        The config instance.

    Raises:
        ConfigError: unknown, missing, mistyped or invalid keys.
    """
    builder = _Builder(source)
    if not isinstance(data, dict):
        raise builder.wrong_type("", f"a mapping ({cls.__name__})", data)
    return builder.build(cls, data)


def _parse_override(item: str, source: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    parts = key.strip().split(".")
    if not sep or not all(p.strip() for p in parts):
        raise ConfigError(f"malformed override {item!r} in {source}: expected dotted.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else raw
    except yaml.YAMLError as error:
        raise ConfigError(
            f"override {item!r} in {source}: value is not valid YAML ({getattr(error, 'problem', None) or error})"
        ) from None
    return [p.strip() for p in parts], value


def apply_overrides(data: dict, overrides: Sequence[str], source: str = COMMAND_LINE) -> dict:
    """Returns a copy of `data` with `dotted.key=value` overrides applied.

    Values are parsed as YAML (`3`, `0.1`, `true`, `[1, 2]`, `null`); intermediate mappings are
    created as needed. A numeric part indexes a list: `filters.1.keep.max=0.5`.

    Raises:
        ConfigError: an override without `=` or key, or one that descends into a non-mapping.
    """
    result = copy.deepcopy(data)
    for item in overrides:
        parts, value = _parse_override(item, source)
        node = result
        for i, part in enumerate(parts):
            prefix = ".".join(parts[:i])
            if isinstance(node, list):
                if not (part.isdigit() and int(part) < len(node)):
                    raise ConfigError(
                        f"override {item!r} in {source}: '{prefix}' is a list of {len(node)}; "
                        f"'{part}' is not an index of it"
                    )
                part = int(part)
            elif not isinstance(node, dict):
                raise ConfigError(f"override {item!r} in {source}: '{prefix}' is not a mapping")
            if i == len(parts) - 1:
                node[part] = value
            else:
                if isinstance(node, dict) and node.get(part) is None:
                    node[part] = {}
                node = node[part]
    return result


def load_config(cls: type[T], path: str | os.PathLike | None, overrides: Sequence[str] = ()) -> T:
    """Reads a YAML config file, applies command-line overrides and builds `cls`.

    Args:
        cls: the config dataclass.
        path: the YAML file, or None to start from the dataclass defaults.
        overrides: `dotted.key=value` strings; errors in their keys name "<command line>".

    Raises:
        ConfigError: unreadable file, bad YAML, or any error of `from_dict`.
    """
    data: Any = {}
    source = COMMAND_LINE if path is None else os.fspath(path)
    if path is not None:
        try:
            text = Path(path).read_text(encoding="utf-8")
        except FileNotFoundError:
            raise ConfigError(f"config file {source} does not exist") from None
        except OSError as error:
            raise ConfigError(f"cannot read config file {source}: {error.strerror}") from None
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            line = f", line {mark.line + 1}" if mark else ""
            reason = getattr(error, "problem", None) or error
            raise ConfigError(f"invalid YAML in {source}{line}: {reason}") from None
        data = {} if data is None else data
        if not isinstance(data, dict):
            raise ConfigError(
                f"{source} must hold a mapping of keys at the top level, got {_describe(data)}"
            )
    data = apply_overrides(data, overrides)
    override_keys = [".".join(_parse_override(item, COMMAND_LINE)[0]) for item in overrides]
    return _Builder(source, override_keys).build(cls, data)


def to_dict(cfg: Any) -> dict:
    """Returns the config as plain nested dicts and lists."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Any) -> str:
    """Returns the config as YAML text, fields in declaration order."""
    return yaml.safe_dump(
        to_dict(cfg), sort_keys=False, allow_unicode=True, default_flow_style=False
    )


def save_config(cfg: Any, path: str | os.PathLike) -> None:
    """Writes the config as YAML atomically: a reader sees the old file or the whole new one."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(dump_yaml(cfg))
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; a config is not a secret
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
