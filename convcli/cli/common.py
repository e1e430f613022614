"""What every command shares: error reporting, stderr output, flags-over-config."""

from __future__ import annotations

import functools
import sys
import time
from collections.abc import Callable
from typing import Any, Literal, TypeVar

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
            info(f"\n{exc}" if sys.stderr.isatty() else str(exc))
            raise typer.Exit(exc.exit_code) from None
        except UsageError as exc:
            info(f"error: {exc}")
            raise typer.Exit(2) from None
        except ConvcliError as exc:
            info(f"error: {exc}")
            raise typer.Exit(1) from None
        except KeyboardInterrupt:
            # On a fresh line: on a terminal, a progress bar (or ^C) may hold this one.
            info("\ninterrupted" if sys.stderr.isatty() else "interrupted")
            raise typer.Exit(130) from None
        except OSError as exc:
            line = os_fault(exc)
            if line is None:
                raise
            info(f"error: {line}")
            raise typer.Exit(1) from None

    return wrapper  # type: ignore[return-value]


def stdin_is_terminal() -> bool:
    return sys.stdin.isatty()


def progress_mode(quiet: bool) -> Literal["bar", "lines", "off"]:
    """How to show progress on stderr: bars on a terminal; in a log file (stderr redirected)
    a plain line every few seconds, as bar frames would fill it; nothing with `--quiet`."""
    if quiet:
        return "off"
    return "bar" if sys.stderr.isatty() else "lines"


class StageBars:
    """A `progress(stage, done, total)` callback for core functions: one tqdm bar per stage
    on stderr, or (mode "lines") a plain line every `interval` seconds, or nothing ("off").
    Use it as a context manager so the last bar closes even on errors."""

    def __init__(
        self,
        label: Callable[[str], str] = str,
        *,
        mode: Literal["bar", "lines", "off"] = "bar",
        interval: float = 10.0,
        **tqdm_options: Any,
    ) -> None:
        self.label, self.options = label, tqdm_options
        self.mode, self.interval = mode, interval
        self.stage: str | None = None
        self.bar: Any = None
        self.last = 0.0

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.mode == "lines":
            self._line(stage, done, total)
            return
        if self.mode == "off":
            return
        from tqdm import tqdm

        if stage != self.stage:
            self.close()
            self.stage = stage
            self.bar = tqdm(total=total, desc=self.label(stage), file=sys.stderr, **self.options)
        self.bar.update(done - self.bar.n)

    def _line(self, stage: str, done: int, total: int) -> None:
        now = time.monotonic()
        if stage != self.stage:
            self.stage, self.last = stage, now  # the first line comes `interval` s in
            return
        if now - self.last >= self.interval:
            self.last = now
            share = f" ({done / total:.0%})" if total else ""
            info(f"{self.label(stage).strip()}: {done:,}/{total:,}{share}")

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    def __enter__(self) -> StageBars:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
