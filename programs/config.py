"""Program configs: TOML files parsed into frozen attrs classes, with ``key=value`` overrides.

A program declares its config as nested ``@attrs.frozen`` classes with defaults; this module reads
TOML (stdlib ``tomllib``; ``tomli_w`` writes it), merges built-in configs (``extends = "name"``) and
command-line overrides, and validates everything against the annotations: an unknown key, a wrong
type or a value outside a ``Literal`` is a :class:`ConfigError` that names the dotted key and where it came
from, with a did-you-mean suggestion. Nothing in a config is ever imported or executed: components
are chosen by registered names, validated as ``Literal`` strings.

Supported field types: ``bool``, ``int`` (bool refused), ``float`` (int accepted), ``str``,
``pathlib.Path``, ``X | None``, unions, ``Literal[...]``, ``list[X]``, ``tuple[X, ...]``, fixed
tuples, ``dict[str, X]``, nested attrs classes and ``Any``. TOML has no null, so ``None`` values are
left out of written TOML (the field then takes its default when read back).
"""

from __future__ import annotations

import datetime
import difflib
import math
import os
import pathlib
import re
import tomllib
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, Union

import attrs
import tomli_w

from ..core import ConfigError

__all__ = [
    "BuiltinConfig", "ConfigError", "TOML_KEY", "builtin_configs", "deep_merge", "from_dict", "in_range",
    "load_config", "parse_overrides", "to_dict", "to_toml", "toml_key",
]

EXTENDS_KEY = "extends"


def in_range(low: float | None = None, high: float | None = None, *, low_open: bool = False,
             high_open: bool = False) -> Callable[[Any, Any, Any], None]:
    """An attrs validator for numeric keys: the value (each item of a list) is finite and within the bounds.

    ``low_open`` / ``high_open`` exclude that bound; None passes (an unset optional key). The message states
    the allowed range (``must be >= 1, got 0``); :func:`from_dict` / :func:`load_config` prefix the key and
    where it came from, so ``ft-prog validate`` reports it before anything runs.
    """
    if low is not None and high is not None:
        allowed = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
    elif low is not None:
        allowed = f"{'>' if low_open else '>='} {low}"
    else:
        allowed = f"{'<' if high_open else '<='} {high}"

    def check(instance: Any, attribute: Any, value: Any) -> None:
        for item in value if isinstance(value, (list, tuple)) else [value]:
            if item is None:
                continue
            if not math.isfinite(item):
                raise ValueError(f"must be a finite number {allowed}, got {item}")
            if (low is not None and (item <= low if low_open else item < low)) or \
                    (high is not None and (item >= high if high_open else item > high)):
                raise ValueError(f"must be {allowed}, got {item}")

    return check


TOML_KEY = "toml_key"
"""``attrs.field(metadata={TOML_KEY: "lambda"})``: the TOML key of a field whose name cannot be it (a Python
keyword such as ``lambda``)."""


def toml_key(field: Any) -> str:
    """The key of an attrs field in TOML and overrides: its ``TOML_KEY`` metadata, else its name."""
    return field.metadata.get(TOML_KEY, field.name)


# --------------------------------------------------------------------------------------------------
# dict -> attrs


def from_dict(cls: type, data: Mapping[str, Any], *, source: str) -> Any:
    """Build the attrs class ``cls`` from nested ``data``, validating every key against the annotations.

    ``source`` (a file name, "overrides", ...) is named in every error message.
    """
    return _Parser(lambda key: source).convert_class(cls, data, "")


class _Parser:
    def __init__(self, source_of: Callable[[str], str]):
        self.source_of = source_of

    def fail(self, key: str, message: str) -> ConfigError:
        source = self.source_of(key)
        return ConfigError(message.replace("{where}", f"in {source}"), key=key, source=source)

    def convert_class(self, cls: type, data: Any, prefix: str) -> Any:
        if isinstance(data, cls):
            return data
        if not isinstance(data, Mapping):
            label = f"'{prefix}'" if prefix else f"the {cls.__name__} config"
            raise self.fail(prefix, f"invalid value for {label} {{where}}: expected a table of "
                                    f"{cls.__name__} keys, got {_show(data)}")
        hints = _type_hints(cls)
        fields = {toml_key(f): f for f in attrs.fields(cls) if f.init}
        kwargs = {}
        for name, value in data.items():
            key = _join(prefix, str(name))
            if name not in fields:
                raise self.unknown_key(key, prefix, str(name), fields)
            field = fields[name]
            kwargs[field.alias or field.name] = self.convert(hints.get(field.name, field.type), value, key)
        for name, field in fields.items():
            if field.default is attrs.NOTHING and (field.alias or field.name) not in kwargs:
                raise self.fail(_join(prefix, name), f"missing required key '{_join(prefix, name)}' {{where}}")
        try:
            return cls(**kwargs)
        except Exception as error:  # an attrs validator, converter or __attrs_post_init__ refused it
            key = self.find_invalid_field(cls, kwargs, fields, prefix) or prefix
            label = f"'{key}'" if key else f"the {cls.__name__} config"
            raise self.fail(key, f"invalid value for {label} {{where}}: {error}") from error

    def unknown_key(self, key: str, prefix: str, name: str, fields: Mapping[str, Any]) -> ConfigError:
        message = f"unknown key '{key}' {{where}}"
        close = difflib.get_close_matches(name, list(fields), n=3)
        if close:
            message += "; did you mean " + " or ".join(f"'{_join(prefix, c)}'" for c in close) + "?"
        else:
            message += f"; valid keys{' in ' + repr(prefix) if prefix else ''}: {', '.join(sorted(fields)) or '(none)'}"
        return self.fail(key, message)

    @staticmethod
    def find_invalid_field(cls: type, kwargs: dict, fields: Mapping[str, Any], prefix: str) -> str | None:
        """Which field's validator fails, found by building without validators and running them one by one."""
        try:
            with attrs.validators.disabled():
                instance = cls(**kwargs)
        except Exception:
            return None
        for name, field in fields.items():
            if field.validator is None:
                continue
            try:
                field.validator(instance, field, getattr(instance, field.name))
            except Exception:
                return _join(prefix, name)
        return None

    def convert(self, tp: Any, value: Any, key: str) -> Any:
        if tp is Any or tp is object:
            return value
        if attrs.has(tp):
            return self.convert_class(tp, value, key)
        origin, args = typing.get_origin(tp), typing.get_args(tp)
        if origin is Literal:
            if any(type(value) is type(a) and value == a for a in args):
                return value
            allowed = ", ".join(repr(a) for a in args)
            message = f"invalid value for '{key}' {{where}}: expected one of {allowed}, got {_show(value)}"
            close = difflib.get_close_matches(value, [a for a in args if isinstance(a, str)], n=1) \
                if isinstance(value, str) else []
            raise self.fail(key, message + (f"; did you mean {close[0]!r}?" if close else ""))
        if origin is Union or origin is types.UnionType:
            if value is None and type(None) in args:
                return None
            errors = []
            for arg in (a for a in args if a is not type(None)):
                try:
                    return self.convert(arg, value, key)
                except ConfigError as error:
                    errors.append(error)
            if len(errors) == 1 and not _is_scalar_type(next(a for a in args if a is not type(None))):
                raise errors[0]  # e.g. `Section | None` or `list[str] | None`: the inner error is the precise one
            raise self.type_error(key, tp, value)
        if origin in (list, tuple) or tp in (list, tuple):
            if not isinstance(value, (list, tuple)):
                raise self.type_error(key, tp, value)
            if origin is tuple and args and not (len(args) == 2 and args[1] is Ellipsis):
                if args == ((),):
                    args = ()
                if len(value) != len(args):
                    raise self.fail(key, f"invalid value for '{key}' {{where}}: expected {_type_name(tp)} "
                                         f"({len(args)} items), got {_show(value)} ({len(value)} items)")
                return tuple(self.convert(a, v, f"{key}[{i}]") for i, (a, v) in enumerate(zip(args, value)))
            item = args[0] if args else Any
            items = [self.convert(item, v, f"{key}[{i}]") for i, v in enumerate(value)]
            return tuple(items) if (origin or tp) is tuple else items
        if origin is dict or tp is dict or origin is Mapping:
            if not isinstance(value, Mapping):
                raise self.type_error(key, tp, value)
            key_type, value_type = args if args else (Any, Any)
            if key_type not in (str, Any):
                raise TypeError(f"config field '{key}': only dict[str, ...] is supported, not {_type_name(tp)}")
            return {k: self.convert(value_type, v, _join(key, str(k))) for k, v in value.items()}
        if tp is bool:
            if isinstance(value, bool):
                return value
        elif tp is int:
            if isinstance(value, int) and not isinstance(value, bool):
                return value
        elif tp is float:
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                return float(value)
        elif tp is str:
            if isinstance(value, str):
                return value
        elif tp is pathlib.Path or tp is os.PathLike:
            if isinstance(value, (str, os.PathLike)):
                return pathlib.Path(value)
        elif tp is type(None):
            if value is None:
                return None
        else:
            raise TypeError(f"config field '{key}': unsupported annotation {tp!r}")
        raise self.type_error(key, tp, value)

    def type_error(self, key: str, tp: Any, value: Any) -> ConfigError:
        message = f"invalid value for '{key}' {{where}}: expected {_type_name(tp)}, got {_show(value)}"
        if _accepts_str(tp) and isinstance(value, (bool, int, float)):
            text = str(value).lower() if isinstance(value, bool) else str(value)
            message += f" (to give a string, quote it: {_toml_value(text)})"
        return self.fail(key, message)


def _is_scalar_type(tp: Any) -> bool:
    return tp in (bool, int, float, str, pathlib.Path) or typing.get_origin(tp) is Literal


def _accepts_str(tp: Any) -> bool:
    if tp in (str, pathlib.Path):
        return True
    if typing.get_origin(tp) in (Union, types.UnionType):
        return any(_accepts_str(a) for a in typing.get_args(tp))
    return False


_HINTS: dict[type, dict[str, Any]] = {}


def _type_hints(cls: type) -> dict[str, Any]:
    if cls not in _HINTS:
        try:
            hints = typing.get_type_hints(cls)
        except NameError as error:  # a class defined inside a function, with string annotations
            hints = {f.name: f.type for f in attrs.fields(cls) if not isinstance(f.type, str)}
            missing = [f.name for f in attrs.fields(cls) if f.init and f.name not in hints]
            if missing:
                raise TypeError(f"cannot resolve the annotations of {cls.__qualname__} ({error}); "
                                "define config classes at module level") from error
        _HINTS[cls] = hints
    return _HINTS[cls]


def _type_name(tp: Any) -> str:
    if tp is type(None):
        return "None"
    if attrs.has(tp):
        return f"a table of {tp.__name__} keys"
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in args)
    if origin is Union or origin is types.UnionType:
        return " | ".join(_type_name(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{getattr(origin, '__name__', str(origin))}[{inner}]"
    return getattr(tp, "__name__", str(tp))


def _show(value: Any) -> str:
    text = repr(value)
    if len(text) > 80:
        text = text[:77] + "..."
    return f"{text} ({type(value).__name__})"


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


# --------------------------------------------------------------------------------------------------
# attrs -> dict -> TOML


def to_dict(config: Any) -> Any:
    """The config as plain nested dicts/lists/scalars (tuples become lists, paths strings), keyed like the TOML."""
    if attrs.has(type(config)):
        return {toml_key(f): to_dict(getattr(config, f.name)) for f in attrs.fields(type(config)) if f.init}
    if isinstance(config, Mapping):
        return {str(k): to_dict(v) for k, v in config.items()}
    if isinstance(config, (list, tuple)):
        return [to_dict(v) for v in config]
    if isinstance(config, os.PathLike):
        return os.fspath(config)
    return config


def to_toml(config: Any, *, header: str | None = None) -> str:
    """TOML text (written by ``tomli_w``) for an attrs config or a nested dict; ``header`` becomes leading
    ``#`` comment lines.

    ``None`` values are left out (TOML has no null). ``tomllib.loads(to_toml(d))`` gives ``d`` back.
    """
    data = to_dict(config)
    if not isinstance(data, Mapping):
        raise TypeError(f"to_toml needs an attrs config or a dict, got {type(config).__name__}")
    comments = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) if header else ""
    try:
        return comments + tomli_w.dumps(_without_none(data))
    except TypeError as error:  # tomli_w names the type it cannot write
        raise TypeError(f"cannot write the config to TOML: {error}") from None


def _without_none(value: Any) -> Any:
    """``value`` with every ``None`` entry of its (nested) tables left out."""
    if isinstance(value, Mapping):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _toml_value(value: Any) -> str:
    """``value`` as TOML writes it, e.g. ``"3"`` for the string 3 (for messages)."""
    return tomli_w.dumps({"v": value}).removeprefix("v = ").rstrip("\n")


# --------------------------------------------------------------------------------------------------
# overrides and merging


_OVERRIDE_KEY = re.compile(r"^[A-Za-z0-9_-]+(\.[A-Za-z0-9_-]+)*$")


def parse_overrides(overrides: Iterable[str]) -> dict[str, Any]:
    """``["optimizer.lr=1e-4", "peft.targets=[q_proj,v_proj]", "model.path=/x"]`` -> a nested dict.

    A value is read as a TOML value when it is one (numbers, booleans, quoted strings, arrays, inline
    tables), else taken as a bare string; inside ``[...]`` the items follow the same rule.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    result: dict[str, Any] = {}
    for text in overrides:
        key, sep, raw = text.partition("=")
        key = key.strip()
        if not sep or not _OVERRIDE_KEY.match(key):
            raise ConfigError(f"malformed override {text!r}: expected key=value with a dotted key, "
                              "e.g. optimizer.lr=1e-4", source="overrides")
        parts = key.split(".")
        node = result
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                earlier = ".".join(parts[: i + 1])
                raise ConfigError(f"override {text!r} conflicts with the earlier override of '{earlier}'",
                                  key=key, source="overrides")
            node = child
        node[parts[-1]] = parse_value(raw.strip())
    return result


def parse_value(text: str) -> Any:
    """One override value: TOML when it parses (dates and times excepted), else the bare string."""
    try:
        value = tomllib.loads(f"v = {text}")["v"]
    except tomllib.TOMLDecodeError:
        pass
    else:
        if not _has_datetime(value):
            return value
    if len(text) >= 2 and text[0] == "[" and text[-1] == "]":
        inner = text[1:-1].strip()
        return [parse_value(item.strip()) for item in _split_top_level(inner)] if inner else []
    return text


def _has_datetime(value: Any) -> bool:
    if isinstance(value, (datetime.date, datetime.time)):
        return True
    if isinstance(value, list):
        return any(_has_datetime(v) for v in value)
    if isinstance(value, dict):
        return any(_has_datetime(v) for v in value.values())
    return False


def _split_top_level(text: str) -> list[str]:
    """Split on commas outside brackets, braces and quotes."""
    items, depth, quote, start = [], 0, "", 0
    for i, ch in enumerate(text):
        if quote:
            if ch == quote:
                quote = ""
        elif ch in "\"'":
            quote = ch
        elif ch in "[{":
            depth += 1
        elif ch in "]}":
            depth -= 1
        elif ch == "," and depth == 0:
            items.append(text[start:i])
            start = i + 1
    items.append(text[start:])
    if items and not items[-1].strip():  # a trailing comma, as TOML allows
        items.pop()
    return items


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """A new dict: ``override`` on top of ``base``, tables merged key by key, everything else replaced."""
    merged = dict(base)
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(merged.get(key), Mapping):
            merged[key] = deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


# --------------------------------------------------------------------------------------------------
# files: built-in configs and load_config


@attrs.frozen
class BuiltinConfig:
    """A built-in config file: its name (the file stem), path and one-line description (first comment line).

    Usable wherever a path is (``open(c)``, ``Path(c)``) through ``__fspath__``.
    """

    name: str
    path: Any  # pathlib.Path, or an importlib.resources Traversable
    description: str = ""

    def __fspath__(self) -> str:
        return os.fspath(self.path)


def builtin_configs(builtin_dir: Any) -> dict[str, BuiltinConfig]:
    """The ``*.toml`` files of ``builtin_dir`` (a folder path or importlib.resources Traversable), by name."""
    if builtin_dir is None:
        return {}
    folder = pathlib.Path(builtin_dir) if isinstance(builtin_dir, (str, os.PathLike)) else builtin_dir
    if not folder.is_dir():
        return {}
    found = {}
    for entry in sorted(folder.iterdir(), key=lambda e: e.name):
        if entry.name.endswith(".toml") and entry.is_file():
            name = entry.name[: -len(".toml")]
            found[name] = BuiltinConfig(name, entry, _description(entry))
    return found


def _description(entry: Any) -> str:
    try:
        text = entry.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError):
        return ""
    for line in text.splitlines():
        line = line.strip()
        if not line:
            continue
        return line.lstrip("#").strip() if line.startswith("#") else ""
    return ""


def load_config(cls: type, name_or_path: str | os.PathLike, overrides: Iterable[str] | Mapping[str, Any] = (), *,
                builtin_dir: Any) -> tuple[Any, dict[str, Any]]:
    """Read a config file or built-in config, apply ``extends`` and ``overrides``, validate into ``cls``.

    ``name_or_path``: a path to a ``.toml`` file, or the name of a file in ``builtin_dir`` (``"demo"``).
    ``overrides``: ``key=value`` strings (see :func:`parse_overrides`) or a nested dict.
    Returns ``(config, resolved)``, ``resolved`` being ``to_dict(config)``, every key included,
    ready for :func:`to_toml`.
    """
    origins: dict[str, str] = {}
    data = _load_layers(name_or_path, builtin_dir, origins, chain=())
    if isinstance(overrides, Mapping):
        _record_origins(overrides, "overrides", origins)
        data = deep_merge(data, overrides)
    else:
        overrides = [overrides] if isinstance(overrides, str) else list(overrides)
        parse_overrides(overrides)  # malformed or conflicting overrides fail as a whole
        for text in overrides:
            one = parse_overrides([text])
            _record_origins(one, f"override '{text}'", origins)
            data = deep_merge(data, one)
    top = origins.get("", str(name_or_path))

    def source_of(key: str) -> str:
        parts = re.sub(r"\[\d+\]", "", key).split(".") if key else []
        for n in range(len(parts), 0, -1):
            found = origins.get(".".join(parts[:n]))
            if found:
                return found
        return top

    config = _Parser(source_of).convert_class(cls, data, "")
    return config, to_dict(config)


def _load_layers(name_or_path: Any, builtin_dir: Any, origins: dict[str, str], chain: tuple[str, ...],
                 relative_to: pathlib.Path | None = None) -> dict[str, Any]:
    entry, source = _resolve(name_or_path, builtin_dir, relative_to)
    if source in chain:
        raise ConfigError(f"config inheritance loop: {' -> '.join([*chain, source])}", source=source)
    data = _read_toml(entry, source)
    if not chain:
        origins[""] = source
    parent = data.pop(EXTENDS_KEY, None)
    if parent is not None:
        if not isinstance(parent, str):
            raise ConfigError(f"invalid value for '{EXTENDS_KEY}' in {source}: expected the name of a built-in "
                              f"config or a path, got {_show(parent)}", key=EXTENDS_KEY, source=source)
        here = pathlib.Path(os.fspath(entry)).parent if isinstance(entry, (str, os.PathLike)) else None
        base = _load_layers(parent, builtin_dir, origins, (*chain, source), relative_to=here)
        data = deep_merge(base, data)
    _record_origins(data if parent is None else _strip(data, base), source, origins)
    return data


def _strip(data: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """The parts of merged ``data`` that differ from ``base`` (the keys the child file set)."""
    out = {}
    for key, value in data.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            sub = _strip(value, base[key])
            if sub:
                out[key] = sub
        elif key not in base or base[key] != value:
            out[key] = value
    return out


def _record_origins(data: Mapping[str, Any], source: str, origins: dict[str, str], prefix: str = "") -> None:
    for key, value in data.items():
        path = _join(prefix, str(key))
        if isinstance(value, Mapping):  # a table belongs to the first layer that opened it, a value to the last
            origins.setdefault(path, source)
            _record_origins(value, source, origins, path)
        else:
            origins[path] = source


def _looks_like_path(text: str) -> bool:
    return text.endswith(".toml") or "/" in text or os.sep in text or (os.altsep or "/") in text


def _resolve(name_or_path: Any, builtin_dir: Any, relative_to: pathlib.Path | None) -> tuple[Any, str]:
    text = os.fspath(name_or_path)
    if isinstance(name_or_path, os.PathLike) or _looks_like_path(text):
        path = pathlib.Path(text).expanduser()
        if relative_to is not None and not path.is_absolute():
            path = relative_to / path
        if not path.is_file():
            message = f"config file not found: {path}"
            stem = path.name[: -len(".toml")] if path.name.endswith(".toml") else None
            if stem and stem in builtin_configs(builtin_dir) and "/" not in text and os.sep not in text:
                message += f" (a built-in config is named without .toml: {stem!r})"
            raise ConfigError(message, source=str(path))
        return path, str(path)
    available = builtin_configs(builtin_dir)
    if text not in available:
        close = difflib.get_close_matches(text, list(available), n=3)
        message = f"no built-in config named {text!r}"
        if close:
            message += "; did you mean " + " or ".join(repr(c) for c in close) + "?"
        message += f" Available: {', '.join(available) or '(none)'}. A file path must end in .toml or contain a '/'."
        raise ConfigError(message, source=text)
    entry = available[text].path
    return entry, os.fspath(entry) if isinstance(entry, (str, os.PathLike)) else f"built-in config {text!r}"


def _read_toml(entry: Any, source: str) -> dict[str, Any]:
    try:
        raw = entry.read_bytes()
    except OSError as error:
        raise ConfigError(f"cannot read config {source}: {error}", source=source) from error
    try:
        return tomllib.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as error:
        raise ConfigError(f"{source} is not UTF-8 text: {error}", source=source) from error
    except tomllib.TOMLDecodeError as error:
        message = str(error)
        match = re.search(r"line (\d+)", message)
        line = f":{match.group(1)}" if match else ""
        raise ConfigError(f"TOML syntax error in {source}{line}: {message}", source=source) from error
