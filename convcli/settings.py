"""Settings dataclasses <-> commented YAML, and the YAML-then-flags merge.

Each command's settings are a dataclass whose fields carry a docstring (a string
literal right after the field, as in `ModelMeta`). Those docstrings become the
comments of the printed config and of the resolved config written next to outputs.
Precedence (applied by the CLI, convcli/cli/options.py): a value given explicitly >
the config file > the default.
"""

from __future__ import annotations

import ast
import dataclasses
import inspect
import itertools
import textwrap
import types
import typing
from collections.abc import Mapping
from functools import cache
from pathlib import Path
from typing import Any, TypeVar

import yaml

from convcli.errors import UsageError

T = TypeVar("T")


@cache
def field_docs(cls: type) -> dict[str, str]:
    """The docstring under each field of a dataclass (inherited fields included)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError):
            continue
        body = tree.body[0].body  # type: ignore[attr-defined]
        for node, after in itertools.pairwise(body):
            if (
                isinstance(node, ast.AnnAssign)
                and isinstance(node.target, ast.Name)
                and isinstance(after, ast.Expr)
                and isinstance(after.value, ast.Constant)
                and isinstance(after.value.value, str)
            ):
                docs[node.target.id] = inspect.cleandoc(after.value.value)
    return docs


def _plain(value: Any) -> Any:
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, tuple | list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def to_dict(settings: Any) -> dict[str, Any]:
    return {f.name: _plain(getattr(settings, f.name)) for f in dataclasses.fields(settings)}


def to_yaml(settings: Any, header: str = "") -> str:
    """A complete YAML of the settings, each key preceded by its docstring as a comment."""
    docs = field_docs(type(settings))
    lines = [f"# {line}".rstrip() for line in header.splitlines()]
    for name, value in to_dict(settings).items():
        if lines:
            lines.append("")
        lines += [f"# {line}".rstrip() for line in docs.get(name, "").splitlines()]
        dumped = yaml.safe_dump({name: value}, allow_unicode=True, sort_keys=False)
        lines.append(dumped.rstrip("\n"))
    return "\n".join(lines) + "\n"


def read_yaml(path: str | Path) -> dict[str, Any]:
    """A YAML mapping from a config file, with a one-line error for a bad file."""
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8-sig"))
    except FileNotFoundError:
        raise UsageError(f"`config`: file not found: {path}", param="config") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{path}:{mark.line + 1}" if mark else str(path)
        raise UsageError(f"{where}: invalid YAML: {getattr(exc, 'problem', exc)}") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UsageError(f"{path}: a config file must be a mapping of option: value")
    return data


def _coerce(name: str, value: Any, hint: Any, source: str) -> Any:
    """Check (and gently convert) a config value against the field's type hint."""
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(name, value, arg, source)
            except UsageError as exc:
                errors.append(str(exc))
        raise UsageError(errors[0])
    if origin is typing.Literal:
        if value not in args:
            choices = ", ".join(map(str, args))
            raise UsageError(f"{source}: {name}: {value!r} is not one of {choices}")
        return value
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise UsageError(f"{source}: {name}: expected a list, got {value!r}")
        return list(value) if origin is list else tuple(value)
    if hint is Path:
        if not isinstance(value, str | Path):
            raise UsageError(f"{source}: {name}: expected a path, got {value!r}")
        return Path(value)
    if hint is bool:
        if not isinstance(value, bool):
            raise UsageError(f"{source}: {name}: expected true or false, got {value!r}")
        return value
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint in (int, float, str) and not (isinstance(value, hint) and not isinstance(value, bool)):
        raise UsageError(f"{source}: {name}: expected {hint.__name__}, got {value!r}")
    return value


def build(cls: type[T], values: Mapping[str, Any], source: str = "config") -> T:
    """Construct a settings dataclass from a mapping, rejecting unknown keys and bad types."""
    hints = typing.get_type_hints(cls)
    known = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(values) - known)
    if unknown:
        raise UsageError(f"{source}: unknown option(s): {', '.join(unknown)}")
    coerced = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
    return cls(**coerced)


def update(settings: T, values: Mapping[str, Any], source: str = "config") -> T:
    """A copy of `settings` with `values` (checked as `build` does) replacing its fields."""
    hints = typing.get_type_hints(type(settings))
    unknown = sorted(set(values) - set(hints))
    if unknown:
        raise UsageError(f"{source}: unknown option(s): {', '.join(unknown)}")
    coerced = {k: _coerce(k, v, hints[k], source) for k, v in values.items()}
    return dataclasses.replace(settings, **coerced)  # type: ignore[type-var]


def merge(cls: type[T], config: str | Path | None, given: Mapping[str, Any]) -> T:
    """Settings from a config file (if any) overridden by the values actually `given`."""
    values = read_yaml(config) if config is not None else {}
    settings = build(cls, values, str(config) if config is not None else "config")
    return dataclasses.replace(settings, **given)  # type: ignore[type-var]
