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
import errno
import inspect
import json
import math
import os
import re
import stat
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


class UnreadableFile(ValueError):
    """An input path that cannot be read as a file; the message says why, the caller says where."""


# What a YAML document may expand to, counting every alias as a copy of what it names: far more
# than any config, far less than an alias bomb ("billion laughs") would build in memory.
MAX_YAML_NODES = 100_000

_FILE_KINDS = {
    stat.S_IFIFO: "a named pipe (FIFO)",
    stat.S_IFSOCK: "a socket",
    stat.S_IFCHR: "a character device",
    stat.S_IFBLK: "a block device",
    stat.S_IFDIR: "a directory",
}


def _refuse_kind(mode: int) -> None:
    kind = stat.S_IFMT(mode)
    if kind != stat.S_IFREG:
        raise UnreadableFile(f"is not a regular file: {_FILE_KINDS.get(kind, 'special')}")


def _refuse_open_error(error: OSError) -> typing.NoReturn:
    if isinstance(error, FileNotFoundError):
        raise UnreadableFile("does not exist") from None
    if error.errno == errno.ELOOP:
        raise UnreadableFile("is a symlink loop") from None
    raise UnreadableFile(f"cannot be read: {error.strerror}") from None


def check_input_file(path: str | os.PathLike) -> None:
    """Raises UnreadableFile unless `path` (links followed) is a regular file."""
    try:
        mode = os.stat(path).st_mode
    except OSError as error:
        _refuse_open_error(error)
    _refuse_kind(mode)


def read_input_file(path: str | os.PathLike) -> bytes:
    """The bytes of a regular file given as input, refusing at once what would block or loop.

    The file is opened without blocking and checked on the open descriptor, so a named pipe,
    a device or a socket is refused instead of read forever, whatever the path pointed to when
    it was checked.

    Raises:
        UnreadableFile: missing, a symlink loop, not a regular file, or unreadable.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as error:
        _refuse_open_error(error)
    try:
        _refuse_kind(os.fstat(fd).st_mode)
    except UnreadableFile:
        os.close(fd)
        raise
    with os.fdopen(fd, "rb") as handle:
        try:
            return handle.read()
        except OSError as error:
            raise UnreadableFile(f"cannot be read: {error.strerror}") from None


def decode_text(data: bytes) -> str:
    """UTF-8 text (a leading byte-order mark dropped); UnreadableFile names the first bad byte."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise UnreadableFile(f"is not UTF-8 text ({error.reason} at byte {error.start})") from None


class _ConfigLoader(yaml.SafeLoader):
    """Safe YAML that refuses a key given twice in one mapping (the first value would be dropped
    silently) and documents that expand past MAX_YAML_NODES through aliases."""

    def get_single_node(self):
        node = super().get_single_node()
        if node is not None:
            _check_expansion(node)
        return node

    def construct_mapping(self, node, deep=False):
        if isinstance(node, yaml.MappingNode):
            seen = set()
            for key_node, _ in node.value:
                if not isinstance(key_node, yaml.ScalarNode) or key_node.tag.endswith(":merge"):
                    continue
                key = (key_node.tag, key_node.value)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"key {key_node.value!r} appears twice", key_node.start_mark
                    )
                seen.add(key)
        return super().construct_mapping(node, deep=deep)


def _check_expansion(root: yaml.Node) -> None:
    """Raises a YAML error if the document, with every alias expanded, has more than
    MAX_YAML_NODES nodes, or if an alias names a collection that holds it."""
    sizes: dict[int, int] = {}
    open_nodes: set[int] = set()

    def size(node: yaml.Node) -> int:
        if id(node) in sizes:
            return sizes[id(node)]
        if id(node) in open_nodes:
            raise yaml.composer.ComposerError(
                None, None, "an alias refers to a collection that contains it", node.start_mark
            )
        open_nodes.add(id(node))
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(key) + size(value) for key, value in node.value)
        open_nodes.discard(id(node))
        sizes[id(node)] = total
        if total > MAX_YAML_NODES:
            raise yaml.composer.ComposerError(
                None,
                None,
                f"the document expands to more than {MAX_YAML_NODES} values through aliases",
                node.start_mark,
            )
        return total

    size(root)


def parse_yaml(text: str):
    """Parses one YAML document with the config loader's limits (see _ConfigLoader)."""
    return yaml.load(text, Loader=_ConfigLoader)  # noqa: S506 (a SafeLoader subclass)


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


def name_problem(name: str) -> str | None:
    """Why `name` cannot be one directory name under the runs directory (None if it can): it
    must be a single path component, so that no name writes outside its parent."""
    if not name.strip():
        return "must not be empty"
    if name in (".", "..") or any(c in name for c in "/\\"):
        return "must be a single directory name (no '/', '\\', '.' or '..')"
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        return "must not hold control characters"
    if len(name.encode("utf-8", "surrogatepass")) > 255:
        return "must be at most 255 bytes"
    return None


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
                value = float(value)
            if not isinstance(value, int | float) or isinstance(value, bool):
                raise self.wrong_type(path, tp, value)
            try:
                number = float(value)
            except OverflowError:
                number = math.inf
            if not math.isfinite(number):
                raise ConfigError(
                    f"invalid value for '{path}' in {self.where(path)}: must be finite "
                    f"(got {_describe(value)})"
                )
            return number
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
                value = data[f.name]
                if isinstance(value, dict) and f.default_factory is not dataclasses.MISSING:
                    # A partial section starts from the field's own default, not the section
                    # class's: DPO's `train: {epochs: 1}` keeps DPO's learning rate.
                    default = f.default_factory()
                    if dataclasses.is_dataclass(default):
                        value = deep_merge(dataclasses.asdict(default), value)
                values[f.name] = self.convert(hints[f.name], value, _join(path, f.name))
            elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                full = _join(path, f.name)
                raise ConfigError(f"missing required key '{full}' in {self.where(full)}")
        instance = cls(**values)
        seed = values.get("seed")
        if isinstance(seed, int) and not 0 <= seed < 2**32:
            key = _join(path, "seed")
            raise ConfigError(
                f"invalid value for '{key}' in {self.where(key)}: a seed must be in "
                f"[0, 2**32) (got {seed})"
            )
        if {"name", "runs_dir"} <= set(names):
            self._check_run_location(instance, path)
        if callable(getattr(instance, "validate", None)):
            try:
                instance.validate()
            except _InvalidValue as error:
                full = _join(path, error.key)
                raise ConfigError(
                    f"invalid value for '{full}' in {self.where(full)}: {error.reason}"
                ) from None
        return instance

    def _check_run_location(self, config: Any, path: str) -> None:
        """A config with `runs_dir` and `name` writes to `<runs_dir>/<name>/`."""
        problem = name_problem(config.name)
        if problem is not None:
            key = _join(path, "name")
            raise ConfigError(
                f"invalid value for '{key}' in {self.where(key)}: {problem} (got {config.name!r})"
            )
        runs_dir = Path(config.runs_dir)
        if not config.runs_dir.strip() or (runs_dir.exists() and not runs_dir.is_dir()):
            key = _join(path, "runs_dir")
            raise ConfigError(
                f"invalid value for '{key}' in {self.where(key)}: must be a directory "
                f"(got {config.runs_dir!r})"
            )


def deep_merge(base: dict, override: dict) -> dict:
    """`base` with `override`'s keys replacing its own, nested mappings merged key by key.

    >>> deep_merge({"a": {"b": 1, "c": 2}, "d": 3}, {"a": {"b": 5}})
    {'a': {'b': 5, 'c': 2}, 'd': 3}
    """
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            value = deep_merge(merged[key], value)
        merged[key] = value
    return merged


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
        value = parse_yaml(raw) if raw.strip() else raw
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
            text = decode_text(read_input_file(path))
        except UnreadableFile as error:
            raise ConfigError(f"config file {source} {error}") from None
        try:
            data = parse_yaml(text)
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


def changed_keys(before: Any, now: Any, prefix: str = "") -> list[str]:
    """The dotted keys whose values differ between two plain config dicts, sorted."""
    if isinstance(before, dict) and isinstance(now, dict):
        keys = set(before) | set(now)
        return sorted(
            d for k in keys for d in changed_keys(before.get(k), now.get(k), f"{prefix}{k}.")
        )
    return [] if before == now else [prefix.rstrip(".")]


def changed_settings(before: Any, config: Any) -> list[str]:
    """The dotted keys where `config` differs from `before`, its plain form as saved earlier
    (a YAML or JSON round trip: tuples are lists). A setting `before` lacks because the version
    that saved it did not have it yet is no change while `config` holds its default: a new
    setting defaults to what the toolkit did before it existed."""
    now = json.loads(json.dumps(to_dict(config)))
    return changed_keys(_with_new_defaults(before, config, now), now)


def _with_new_defaults(before: Any, config: Any, now: Any) -> Any:
    """`before` plus each field of dataclass `config` it lacks whose value is the default
    (`now`: `config` in plain form)."""
    if not (isinstance(before, dict) and dataclasses.is_dataclass(config)):
        return before
    filled = dict(before)
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if f.name in before:
            filled[f.name] = _with_new_defaults(before[f.name], value, now[f.name])
        elif f.default is not dataclasses.MISSING and value == f.default:
            filled[f.name] = now[f.name]
        elif f.default_factory is not dataclasses.MISSING and value == f.default_factory():
            filled[f.name] = now[f.name]
    return filled


def to_dict(cfg: Any) -> dict:
    """Returns the config as plain nested dicts and lists."""
    if not dataclasses.is_dataclass(cfg) or isinstance(cfg, type):
        raise TypeError(f"expected a config dataclass instance, got {type(cfg).__name__}")
    return dataclasses.asdict(cfg)


def config_keys(cls: type, prefix: str = "") -> list[tuple[str, str, str]]:
    """Every key of config dataclass `cls`, nested ones dotted (`train.learning_rate`; a list of
    dataclasses as `rewards[].name`): (key, type and default, meaning), in declaration order.

    The meaning is the first sentence of the comment above the field in the source: the one
    place each setting is documented.
    """
    hints = _type_hints(cls)
    comments = _field_comments(cls)
    keys = []
    for field in dataclasses.fields(cls):
        key = _join(prefix, field.name)
        tp = hints.get(field.name, field.type)
        inner = _optional_inner(tp)
        nested = inner if dataclasses.is_dataclass(inner) else None
        if nested is None and typing.get_origin(tp) is list:
            (item,) = typing.get_args(tp) or (None,)
            if dataclasses.is_dataclass(item):
                keys.append((key, "list", _meaning(comments.get(field.name, ""))))
                keys += config_keys(item, key + "[]")
                continue
        if nested is not None and inner is tp:
            keys += config_keys(nested, key)
            continue
        if field.default is not dataclasses.MISSING:
            default = f" = {_show_default(field.default)}"
        elif field.default_factory is not dataclasses.MISSING:
            default = f" = {_show_default(field.default_factory())}"
        else:
            default = ", required"
        keys.append((key, _show_type(tp) + default, _meaning(comments.get(field.name, ""))))
    return keys


def keys_help(cls: type) -> str:
    """`config_keys` as the text `align COMMAND --help` ends with."""
    keys = config_keys(cls)
    width = min(max(len(key) for key, _, _ in keys), 36)
    lines = ["config keys (--config FILE.yaml or key.sub=value):"]
    for key, kind, meaning in keys:
        lines.append(f"  {key:<{width}}  {kind}")
        if meaning:
            lines.append(f"  {'':<{width}}    {meaning}")
    return "\n".join(lines)


def _type_hints(cls: type) -> dict:
    try:
        return typing.get_type_hints(cls)
    except (NameError, TypeError):  # an annotation naming a TYPE_CHECKING-only import
        return {}


def _field_comments(cls: type) -> dict[str, str]:
    """The comment block right above each field of `cls` and of the dataclasses it extends."""
    comments: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            lines, _ = inspect.getsourcelines(klass)
        except (OSError, TypeError):
            continue
        # The class body: after the decorators and the `class` line, at its first line's indent.
        body = next(i for i, line in enumerate(lines) if line.lstrip().startswith("class ")) + 1
        indent = len(lines[body]) - len(lines[body].lstrip())
        # A comment block documents the field below it, and the fields right after that one
        # (no blank line between): `worker_cpus` and `worker_gpus` under one comment.
        block: list[str] = []
        shared = ""
        for line in lines[body:]:
            text = line.strip()
            if text.startswith("#"):
                block.append(text.lstrip("#").strip())
                continue
            field = re.match(r"([A-Za-z_]\w*)\s*:", text)
            if field and len(line) - len(line.lstrip()) == indent:
                shared = " ".join(block) if block else shared
                if shared:
                    comments[field.group(1)] = shared
            else:
                shared = ""
            block = []
    return comments


def _meaning(comment: str) -> str:
    """A field's comment for one help line: whole when short, else its first sentence."""
    return comment if len(comment) <= 160 else _first_sentence(comment)


def _first_sentence(text: str) -> str:
    """Up to the first full stop outside parentheses (not the one of "e.g." or "i.e.")."""
    depth = 0
    for i, char in enumerate(text):
        depth += (char == "(") - (char == ")")
        ends = char == "." and (i + 1 == len(text) or text[i + 1] == " ")
        if ends and depth == 0 and not text[: i + 1].endswith(("e.g.", "i.e.")):
            return text[: i + 1]
    return text


def _optional_inner(tp: Any) -> Any:
    """X for `X | None`, else `tp`."""
    args = [a for a in typing.get_args(tp) if a is not type(None)]
    if typing.get_origin(tp) in (typing.Union, types.UnionType) and len(args) == 1:
        return args[0]
    return tp


def _show_type(tp: Any) -> str:
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return " | ".join(str(a) for a in args)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _show_type(a) for a in args)
    if origin in (list, tuple, dict):
        return f"{origin.__name__}[{', '.join(_show_type(a) for a in args)}]"
    return _type_name(tp)


def _show_default(value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    if dataclasses.is_dataclass(value):
        return "{...}"
    return json.dumps(value) if isinstance(value, (str, list, dict)) else repr(value)


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
