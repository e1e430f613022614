"""Errors a user can cause and fix. The CLI prints them as one line, no traceback.

Core code raises these with a message that names the file and line (or the
parameter) at fault; anything else escaping to the CLI is a bug and keeps its traceback.
Core messages speak Python: they name parameters in backquotes ("`num_candidates` must be
at least 1") and list them in `params`; the CLI shows them as its flags (`--num-candidates`).
"""

from __future__ import annotations

import errno


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


class Interrupted(ConvcliError):
    """A run stopped by a signal: exit code 128 + the signal (130 Ctrl-C, 143 SIGTERM)."""

    def __init__(self, message: str, *, signum: int, param: str | tuple[str, ...] | None = None):
        super().__init__(message, param=param)
        self.exit_code = 128 + signum


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


# OS faults a user can fix (space, permissions, a wrong kind of path): one line naming the
# path, not a traceback. Others (EIO, ...) are not the user's to fix and keep theirs.
OS_FAULTS = {
    errno.ENOSPC: "no space left on device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large for this filesystem",
    errno.EROFS: "read-only file system",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EISDIR: "is a directory, not a file",
    errno.ENOTDIR: "a part of this path is not a directory",
    errno.ENAMETOOLONG: "file name too long",
}


def os_fault(exc: BaseException) -> str | None:
    """The one line for an OS fault a user can fix, naming its path; None for others."""
    if not isinstance(exc, OSError) or exc.errno not in OS_FAULTS:
        return None
    where = f"{exc.filename}: " if exc.filename is not None else ""
    hint = "; free some space and run again" if exc.errno in (errno.ENOSPC, errno.EDQUOT) else ""
    return f"{where}{OS_FAULTS[exc.errno]}{hint}"
