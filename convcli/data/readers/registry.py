"""The formats `prepare` reads: one line per reader, and how a file's format is found."""

from __future__ import annotations

from pathlib import Path

from convcli.data.readers.arrow import Arrow, DatasetFolder, Parquet
from convcli.data.readers.base import Head, Reader
from convcli.data.readers.jsonl_turns import JsonlTurns
from convcli.data.readers.messages import Messages
from convcli.data.readers.sharegpt import ShareGpt
from convcli.data.readers.text import Text
from convcli.data.readers.transcript import Transcript
from convcli.data.readers.trees import ReplyTrees
from convcli.data.readers.tsv import Tsv

# In order of preference where two readers are equally sure.
READERS: dict[str, Reader] = {
    r.name: r
    for r in (
        JsonlTurns(),
        Messages(),
        ShareGpt(),
        ReplyTrees(),
        Tsv(),
        Text(),
        Transcript(),
        Parquet(),
        Arrow(),
        DatasetFolder(),
    )
}
FORMATS = tuple(READERS)


def suffix(path: Path) -> str:
    """A file's format suffix, lower case, under any .gz ("" if none)."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    return suffixes[-1] if suffixes else ""


def detect_format(path: Path, head: Head | str = "") -> str | None:
    """The format of an input: among the readers that claim its extension (or folder),
    the one its start fits best; with no such reader, one its start fits; else None."""
    if not isinstance(head, Head):
        head = Head(path, head)
    if path.is_dir():
        return next((r.name for r in READERS.values() if r.directories and r.claims(path)), None)
    claimed = [r for r in READERS.values() if suffix(path) in r.extensions]
    if claimed:
        return max(claimed, key=lambda r: r.sniff(head)).name  # max keeps the first of ties
    scores = {r.name: r.sniff(head) for r in READERS.values()}
    best = max(scores, key=lambda name: scores[name])
    return best if scores[best] > 0 else None


def unknown_format(path: Path) -> str:
    """Why an input is refused when no format fits it, and what to do."""
    ext = suffix(path)
    what = f"its extension ({ext}) nor its first lines" if ext else "its first lines"
    listed = ", ".join(
        f"{r.name} ({' '.join(r.extensions)})" if r.extensions else r.name for r in READERS.values()
    )
    return (
        f"no known format fits {what}; formats: {listed}. "
        "Pass `format` text to read it as plain text (one turn per line)"
    )
