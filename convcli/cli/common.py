"""What every command shares: error reporting, stderr output, flags-over-config."""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

import typer

from convcli.errors import ConvcliError, Interrupted, UsageError, os_fault

F = TypeVar("F", bound=Callable[..., Any])


def info(message: str) -> None:
    """Diagnostics, progress and summaries go to stderr; stdout is for model text."""
    typer.echo(message, err=True)


def friendly_errors(command: F) -> F:
    """Turn a user's mistake into one line on stderr and an exit code, no traceback.

    UsageError exits 2 (like click's own usage errors), other ConvcliErrors 1,
    Ctrl-C 130, OS faults a user can fix (full disk, read-only or forbidden folder, a
    folder where a file belongs) 1 with the path. Anything else is a bug and keeps its
    traceback.
    """

    @functools.wraps(command)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return command(*args, **kwargs)
        except Interrupted as exc:  # on a fresh line: a progress bar may hold this one
            info(f"\n{exc}")
            raise typer.Exit(exc.exit_code) from None
        except UsageError as exc:
            info(f"error: {exc}")
            raise typer.Exit(2) from None
        except ConvcliError as exc:
            info(f"error: {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            info("\ninterrupted")  # on a fresh line: a progress bar may hold this one
            raise typer.Exit(130) from None
        except OSError as exc:
            line = os_fault(exc)
            if line is None:
                raise
            info(f"error: {line}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def given_flags(ctx: typer.Context, values: Mapping[str, Any]) -> dict[str, Any]:
    """The subset of `values` the user typed on the command line (they beat --config)."""
    # By name: typer 0.29 vendors its own click, whose ParameterSource is not click's.
    typed = ("COMMANDLINE", "ENVIRONMENT")
    return {
        k: v
        for k, v in values.items()
        if getattr(ctx.get_parameter_source(k), "name", None) in typed
    }


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


class StageBars:
    """A `progress(stage, done, total)` callback for core functions: one tqdm bar per stage,
    on stderr. Use it as a context manager so the last bar closes even on errors."""

    def __init__(self, label: Callable[[str], str] = str, **tqdm_options: Any) -> None:
        self.label, self.options = label, tqdm_options
        self.stage: str | None = None
        self.bar: Any = None

    def __call__(self, stage: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=self.label(stage), file=sys.stderr, **self.options)
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
