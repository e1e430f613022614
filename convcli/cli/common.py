"""What every command shares: error reporting, stderr output, flags-over-config."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import typer

from convcli.errors import ConvcliError, UsageError

F = TypeVar("F", bound=Callable[..., Any])


def info(message: str) -> None:
    """Diagnostics, progress and summaries go to stderr; stdout is for model text."""
    typer.echo(message, err=True)


def friendly_errors(command: F) -> F:
    """Turn a user's mistake into one line on stderr and an exit code, no traceback.

    UsageError exits 2 (like click's own usage errors), other ConvcliErrors 1,
    Ctrl-C 130. Anything else is a bug and keeps its traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except UsageError as exc:
            info(f"error: {exc}")
            raise typer.Exit(2) from None
        except ConvcliError as exc:
            info(f"error: {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            info("interrupted")
            raise typer.Exit(130) from None

    return wrapper  # type: ignore[return-value]


def given_flags(ctx: typer.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `values` the user typed on the command line (they beat --config)."""
    # Compare by name: typer vendors its own click, whose ParameterSource is another enum.
    typed = ("COMMANDLINE", "ENVIRONMENT")
    sources = {k: ctx.get_parameter_source(k) for k in values}
    return {k: v for k, v in values.items() if getattr(sources[k], "name", None) in typed}


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()
