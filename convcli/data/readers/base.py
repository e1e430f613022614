"""What every reader shares: records, chunks, reasons, and the `Reader` protocol.

A reader handles one family of formats. It says how sure it is that a file is its format
(`sniff`), cuts a file into `Chunk`s in the main process (cheap: no parsing), and turns a
chunk into records (`records`, in worker processes). A record is a `Dialogue` (turns,
their weights and roles, where it came from) or a `BadRecord` (where, and what is wrong);
the caller decides whether a bad record stops the run (strict) or is counted by `reason`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO, ClassVar, Literal

from convcli.errors import InputError

CHUNK_BYTES = 1 << 18  # raw bytes per Chunk (about 4k short turns)

# Why a record was skipped: the keys of the manifest's `skipped` counts.
REASONS = {
    "missing-file": "file not found",
    "empty-file": "empty file",
    "unreadable": "unreadable file (corrupt .gz?)",
    "invalid-utf8": "invalid UTF-8",
    "nul-byte": "NUL byte",
    "malformed-json": "malformed JSON",
    "not-turns": "not a list of turns",
    "no-tab": "TSV line without a tab",
    "several-tabs": "TSV line with several tabs",
    "bad-weight": "turn without a weight",
    "empty-turn": "empty turn",
    "one-turn": "dialogue of one turn",
    "no-role": "message without a role",
    "unknown-role": "message with an unknown role",
    "not-text": "content that is not a string",
    "no-speaker": "transcript line without a speaker",
    "no-field": "no column of turns",
    "cycle": "reply tree with a cycle",
    "orphan": "reply to a missing utterance",
    "several-roots": "conversation with several roots",
    "too-deep": "reply path longer than max_depth",
}

Role = Literal["system", "user", "assistant"]


@dataclass(frozen=True, slots=True)
class Dialogue:
    """Turns of one dialogue; `weights` (one per turn) only where the corpus gives them,
    `roles` only where it names them. `line` is a line number, or a row (see `unit`)."""

    turns: list[str]
    weights: list[float] | None
    source: str
    line: int
    roles: list[Role] | None = None
    joined: int = 0  # turns of one role in a row joined into one (same_role="join")
    unit: str = "line"


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line (or file, row, tree) that is not a usable dialogue; `reason` is a key of
    `REASONS`."""

    reason: str
    message: str
    source: str
    line: int | None = None
    unit: str = "line"  # what `line` counts: "line", or "row" in a table

    def error(self) -> InputError:
        where: int | str | None = self.line
        if self.unit != "line" and self.line is not None:
            where = f"{self.unit} {self.line}"  # a table's `file:row 12:`
        return InputError(self.message, path=self.source, line=where)


Record = Dialogue | BadRecord


@dataclass(frozen=True, slots=True)
class ReadOptions:
    """How to read records: the reading fields of the prepare settings (picklable)."""

    field: str | None = None  # the column (or key) holding the turns
    split: str | None = None  # the split of a dataset folder
    tree_paths: str = "leaves"  # reply trees: root-to-leaf paths, or every node's path
    max_depth: int | None = None  # reply trees: longest path kept
    same_role: str = "join"  # two turns of one role in a row: join them, or keep both
    min_turns: int = 2  # a dialogue to train on needs two; a context to answer, one


@dataclass(frozen=True, slots=True)
class Chunk:
    """A piece of one file, as read (not parsed); its reader makes records of it.

    Small and picklable, so parsing can happen in a worker process. Line formats hold
    whole lines in `data`; others hold what their reader needs (a table's record batch).
    """

    source: str
    format: str
    line: int  # the number of the first line (or row) of `data`
    data: Any
    state: Any = None  # what the reader learnt of the whole file (TSV: turns carry weights)
    error: BadRecord | None = None  # the file could not be read past this chunk


@dataclass(frozen=True, slots=True)
class Head:
    """The start of an input, for sniffing: its path and its first bytes as text."""

    path: Path
    text: str  # up to `HEAD_BYTES`, decoded leniently (a bad byte is U+FFFD)
    complete: bool = True  # `text` is the whole file

    def whole_lines(self) -> list[str]:
        """The lines of the head, less a last one that the head cuts short."""
        text = self.text if self.complete else self.text[: self.text.rfind("\n") + 1]
        return text.splitlines()

    def lines(self, count: int = 20) -> list[str]:
        """The first `count` whole lines that are not blank."""
        found = []
        for line in self.whole_lines():
            if line.strip():
                found.append(line)
                if len(found) == count:
                    break
        return found


HEAD_BYTES = 1 << 16

Opener = Callable[[Path], AbstractContextManager[BinaryIO]]


class Reader:
    """One family of formats. Subclasses set the class attributes and override what
    differs; a new format is a new subclass and a line in `registry.READERS`."""

    name: ClassVar[str]
    extensions: ClassVar[tuple[str, ...]] = ()  # claimed suffixes (under any .gz)
    example: ClassVar[str] = ""  # one example line of the format, for help and the README
    directories: ClassVar[bool] = False  # inputs are folders (a dataset saved to disk)

    def sniff(self, head: Head) -> int:
        """How sure the start of a file says it is this format: 0 (no idea) to 3 (sure)."""
        return 0

    def check(self) -> None:
        """Raise a `ConvcliError` saying what to install if this reader cannot work here."""

    def check_input(self, path: Path, options: ReadOptions) -> None:
        """Raise an `InputError` for an input that cannot be read at all with these options
        (before any work starts; what is wrong inside an input is a record's business)."""

    def claims(self, folder: Path) -> bool:
        """Whether a folder is one input of this format (only with `directories`)."""
        return False

    def chunks(
        self, path: Path, open: Opener, size: int, options: ReadOptions
    ) -> Iterator[Chunk | BadRecord]:
        """The input as chunks of about `size` bytes, in order; a `BadRecord` where the
        input cannot be read (an empty file, a corrupt .gz), in its place."""
        raise NotImplementedError

    def records(self, chunk: Chunk, options: ReadOptions) -> Iterator[Record]:
        """The records of a chunk, in order (the same as reading them as part of a file)."""
        raise NotImplementedError


def check_turns(
    turns: list[str],
    weights: list[float] | None,
    source: str,
    line: int,
    roles: list[Role] | None = None,
    joined: int = 0,
    unit: str = "line",
    minimum: int = 2,
) -> Record:
    """A dialogue of these turns (stripped), or why it is not one (fewer than `minimum`
    turns besides a system message, or an empty one)."""
    stripped = [t.strip() for t in turns]
    if not all(stripped):
        empty = stripped.index("") + 1
        return BadRecord("empty-turn", f"turn {empty} is empty", source, line, unit)
    # A dialogue to train on needs two turns besides a system message; a context to answer
    # (minimum 1), any turn: a system message alone opens a chat.
    trained = len(stripped) if roles is None or minimum < 2 else sum(r != "system" for r in roles)
    if trained < minimum:
        what = "turn" if minimum == 1 else "turns"
        what += "" if roles is None or minimum < 2 else " besides the system message"
        message = f"a dialogue needs at least {minimum} {what}, this one has {trained}"
        return BadRecord("one-turn", message, source, line, unit)
    return Dialogue(stripped, weights, source, line, roles, joined, unit)
