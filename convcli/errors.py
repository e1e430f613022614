"""Errors a user can cause and fix. The CLI prints them as one line, no traceback.

Core code raises these with a message that names the file and line (or the
parameter) at fault; anything else escaping to the CLI is a bug and keeps its traceback.
Core messages speak Python: they name parameters in backquotes ("`num_candidates` must be
at least 1") and list them in `params`; the CLI shows them as its flags (`--num-candidates`).
"""

from __future__ import annotations


class ConvcliError(Exception):
    """A problem with the user's input, files or options (exit code 1).

    `param`: the settings field(s) the message names (in backquotes), so that a front end
    can show them its own way (the CLI: as flags).
    """

    def __init__(self, *args: object, param: str | tuple[str, ...] | None = None) -> None:
        super().__init__(*args)
        self.params: tuple[str, ...] = (param,) if isinstance(param, str) else tuple(param or ())


class UsageError(ConvcliError):
    """A bad combination or value of options (exit code 2, like click's usage errors)."""


class InputError(ConvcliError):
    """A malformed input file: the message starts with `file:line:` where known."""

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | str | None = None,
        param: str | tuple[str, ...] | None = None,
    ):
        self.path, self.line, self.reason = path, line, message
        where = f"{path}:{line}: " if path and line else (f"{path}: " if path else "")
        super().__init__(f"{where}{message}", param=param)


def first_line(exc: BaseException) -> str:
    """The first line of an exception's message (libraries' errors can run for pages)."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
