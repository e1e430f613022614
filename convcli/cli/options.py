"""Command-line options built from settings dataclasses: one field, one option.

A command declares the settings it takes as parameters typed with a settings dataclass
(`settings: TrainSettings`); `@settings_options(...)` replaces each such parameter by one
option per field, named after the field (`learning_rate` -> `--learning-rate`), with the
field's docstring as help, its default, and its `Literal` choices. The command receives
the settings object, built by the same rules everywhere:

    default (the dataclass, or the instance given) < `--config` file < flags typed here

With `config=...` the command also gets `--config FILE` and `--print-config`. Adding an
option to a command means adding a field (with a docstring) to its settings dataclass.

Core errors name parameters in backquotes (`ConvcliError("`num_candidates` must be at
least 1", param="num_candidates")`); the user reads the flag instead (`--num-candidates`).
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import re
import types
import typing
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import typer

from convcli.errors import ConvcliError, UsageError

# Short and extra names, shared by every command so that each means one thing.
ALIASES: dict[str, tuple[str, ...]] = {
    "output": ("-o",),
    "data": ("-d",),
    "input": ("-i",),
    "num_return_sequences": ("-n",),
    "learning_rate": ("--lr",),
    "verbose": ("-v",),
}
# The "off" name of a boolean flag, where `--no-NAME` is not the clearest.
NEGATIVES: dict[str, str] = {"do_sample": "--greedy"}
CONFIG = "config"
PRINT_CONFIG = "print_config"
_CTX = "_convcli_ctx"


def flag(name: str) -> str:
    """The flag of a settings field: `num_candidates` -> `--num-candidates`."""
    return "--" + name.replace("_", "-")


def help_text(doc: str) -> str:
    """A field docstring as option help: `name` in backquotes becomes its flag."""
    return with_flags(" ".join(doc.split()))


def with_flags(text: str) -> str:
    """A core message for the command line: each `name` in backquotes becomes its flag."""
    return re.sub(r"`([a-z][a-z0-9_]*)`", lambda m: flag(m.group(1)), text)


def _split_optional(hint: Any) -> tuple[Any, bool]:
    """(the type without None, whether None is allowed)."""
    if typing.get_origin(hint) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        base = args[0] if len(args) == 1 else typing.Union[tuple(args)]  # noqa: UP007
        return base, len(args) < len(typing.get_args(hint))
    return hint, False


def _choices(hint: Any) -> tuple[str, ...]:
    base, _ = _split_optional(hint)
    if typing.get_origin(base) is typing.Literal:
        return tuple(str(a) for a in typing.get_args(base))
    return ()


def _parameter(name: str, hint: Any, default: Any, doc: str, *, argument: bool) -> Any:
    """The Typer `Annotated[...]` for one settings field."""
    base, optional = _split_optional(hint)
    help = help_text(doc)
    show_default = default is not None and not isinstance(default, bool)
    if argument:
        return Annotated[
            list[str] | None if typing.get_origin(base) is list else hint,
            typer.Argument(help=help, show_default=False),
        ]
    decls = ALIASES.get(name, ())
    if base is bool:
        names = f"{flag(name)}/{NEGATIVES.get(name, '--no-' + flag(name)[2:])}"
        return Annotated[
            bool | None if optional else bool,
            typer.Option(names, *decls, help=help, show_default=False),
        ]
    choices = _choices(hint)
    if choices:
        # Parsed as text and checked with the config values' rule: one line, one style.
        metavar = "[" + "|".join(choices) + "]"
        if len(metavar) > 32:  # a long list goes in the help, which wraps (80 columns)
            metavar, help = f"<{name}>", f"{help} One of: {', '.join(choices)}."
        return Annotated[
            str | None if optional else str,
            typer.Option(flag(name), *decls, help=help, metavar=metavar, show_default=show_default),
        ]
    return Annotated[hint, typer.Option(flag(name), *decls, help=help, show_default=show_default)]


@dataclasses.dataclass(frozen=True)
class _Group:
    """One settings parameter of a command: its dataclass, defaults and exposed fields."""

    param: str
    cls: type
    base: Any
    fields: tuple[str, ...]
    hints: dict[str, Any]


def _group(param: str, spec: Any, hide: frozenset[str]) -> _Group:
    cls = spec if isinstance(spec, type) else type(spec)
    base = spec() if isinstance(spec, type) else spec
    hints = typing.get_type_hints(cls)
    names = tuple(f.name for f in dataclasses.fields(cls) if f.name not in hide)
    return _Group(param, cls, base, names, hints)


def settings_options(
    *,
    config: str | None = None,
    arguments: tuple[str, ...] = (),
    hide: tuple[str, ...] = (),
    **specs: Any,
) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """Turn the command's settings parameters into options (see the module docstring).

    specs: parameter name -> a settings dataclass, or an instance of one whose values are
    this command's defaults (e.g. chat's sampling defaults).
    config: the command name for `--config`/`--print-config` (None: no config file).
    arguments: fields taken as positional arguments instead of options.
    hide: fields not offered on this command (they keep their default; a config may set them).
    """
    hidden = frozenset(hide)

    def decorate(func: Callable[..., Any]) -> Callable[..., Any]:
        groups = [_group(p, spec, hidden) for p, spec in specs.items()]
        by_param = {g.param: g for g in groups}
        own_hints = typing.get_type_hints(func, include_extras=True)
        params = [inspect.Parameter(_CTX, inspect.Parameter.KEYWORD_ONLY, annotation=typer.Context)]
        for p in inspect.signature(func).parameters.values():
            group = by_param.get(p.name)
            if group is None:
                params.append(p.replace(kind=inspect.Parameter.KEYWORD_ONLY,
                                        annotation=own_hints[p.name]))  # fmt: skip
                continue
            docs = _field_docs(group.cls)
            for name in group.fields:
                default = getattr(group.base, name)
                annotation = _parameter(
                    name, group.hints[name], default, docs.get(name, ""),
                    argument=name in arguments,
                )  # fmt: skip
                default = None if name in arguments else default
                params.append(
                    inspect.Parameter(name, inspect.Parameter.KEYWORD_ONLY,
                                      annotation=annotation, default=default)
                )  # fmt: skip
        if config is not None:
            params += _config_parameters()

        @functools.wraps(func)
        def command(**values: Any) -> Any:
            ctx: typer.Context = values.pop(_CTX)
            try:
                kwargs = _resolve(ctx, groups, values, config)
                if kwargs is None:  # --print-config done
                    return None
                return func(**kwargs)
            except ConvcliError as exc:
                _as_flags(exc, ctx)
                raise

        command.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
        command.__annotations__ = {p.name: p.annotation for p in params}
        del command.__wrapped__  # Typer must read the signature above, not func's
        return command

    return decorate


def _field_docs(cls: type) -> dict[str, str]:
    from convcli.settings import field_docs

    return field_docs(cls)


def _config_parameters() -> list[inspect.Parameter]:
    kw = inspect.Parameter.KEYWORD_ONLY
    return [
        inspect.Parameter(
            CONFIG, kw, default=None,
            annotation=Annotated[Path | None, typer.Option(
                "--config", "-c", help="YAML settings file (flags given here win).",
                show_default=False)],
        ),
        inspect.Parameter(
            PRINT_CONFIG, kw, default=False,
            annotation=Annotated[bool, typer.Option(
                "--print-config", help="Print the resolved settings as YAML and exit.",
                show_default=False)],
        ),
    ]  # fmt: skip


def typed_here(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave this parameter on the command line (or its environment)."""
    # By name: typer 0.29 vendors its own click, whose ParameterSource is not click's.
    source = getattr(ctx.get_parameter_source(name), "name", None)
    return source in ("COMMANDLINE", "ENVIRONMENT")


def _resolve(
    ctx: typer.Context, groups: list[_Group], values: dict[str, Any], config: str | None
) -> dict[str, Any] | None:
    """The command's keyword arguments: settings objects replace their fields' values."""
    from convcli.settings import read_yaml, to_yaml, update

    path = values.pop(CONFIG, None)
    print_config = values.pop(PRINT_CONFIG, False)
    from_file = read_yaml(path) if path is not None else {}
    known = {f.name for g in groups for f in dataclasses.fields(g.cls)}
    unknown = sorted(set(from_file) - known)
    if unknown:
        raise UsageError(f"{path}: unknown option(s): {', '.join(unknown)}")
    resolved: dict[str, Any] = {}
    for g in groups:
        names = {f.name for f in dataclasses.fields(g.cls)}
        given = {}
        for name in g.fields:
            value = values.pop(name)
            if typed_here(ctx, name):
                given[name] = list(value) if isinstance(value, tuple) else value
        for name, value in given.items():
            choices = _choices(g.hints[name])
            if choices and value not in choices:
                raise UsageError(
                    f"`{name}`: {value!r} is not one of {', '.join(choices)}", param=name
                )
        settings = update(g.base, {k: v for k, v in from_file.items() if k in names}, str(path))
        resolved[g.param] = dataclasses.replace(settings, **given)
    if print_config:
        header = f"convcli {config} settings (edit, then --config FILE)"
        texts = [
            to_yaml(s, header=header if i == 0 else "") for i, s in enumerate(resolved.values())
        ]
        typer.echo("\n".join(texts), nl=False)
        return None
    return {**values, **resolved}


def _as_flags(exc: ConvcliError, ctx: typer.Context) -> None:
    """Show the parameters a core error names (`name`, in backquotes) as this command's flags."""
    if len(exc.args) != 1 or not isinstance(exc.args[0], str):
        return
    opts = {p.name: max(p.opts, key=len) for p in ctx.command.params if p.name and p.opts}

    def shown(match: re.Match[str]) -> str:
        name = match.group(1)
        if name in opts:
            opt = opts[name]
            return opt if opt.startswith("-") else name.upper()  # an argument: NAME
        return flag(name) if name in exc.params else match.group(0)

    exc.args = (re.sub(r"`([a-z][a-z0-9_]*)`", shown, exc.args[0]),)


# Every command that shows progress: a CLI concern, so no settings field.
QuietOption = Annotated[
    bool,
    typer.Option(
        "--quiet",
        "-q",
        help="No progress output (summaries, warnings and errors stay). Without a terminal "
        "on stderr, progress is a line every few seconds.",
    ),
]


# Shared by generate and chat: options that transformers' generate takes as they are.
ExtraOption = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        metavar="KEY=VALUE",
        help="Any other transformers generate option (VALUE read as JSON), "
        "e.g. --option length_penalty=0.8; repeatable.",
    ),
]


def extra_options(items: list[str] | None) -> dict[str, Any]:
    """`--option KEY=VALUE` values as generate keyword arguments."""
    import json

    options: dict[str, Any] = {}
    for item in items or []:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return options
