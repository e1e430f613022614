"""Streaming readers for dialogue corpora: JSONL, DialoGPT TSV and plain text, optionally gzipped.

Every reader yields, in file order, either a `Dialogue` (turns, per-turn weights, where it
came from) or a `BadRecord` (where, and what is wrong). The caller decides whether a bad
record stops the run (strict) or is skipped and counted by `reason`.

- JSONL: each line a JSON array of turns, or an object with a `turns` array.
- TSV (DialoGPT): `turn EOS turn ... <TAB> response`. Either every turn carries a weight
  (`0.0 text`: context only, `1.0 text`: trained on) or none does; the first good line of
  a file decides. Raw lines get DialoGPT's own weights: context 0.0, response 1.0.
- Text: one turn per line, dialogues separated by blank lines.

Turns are stripped of surrounding whitespace. Blank lines in JSONL and TSV are ignored.
"""

from __future__ import annotations

import glob
import gzip
import itertools
import json
import re
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from convcli.errors import InputError

FORMATS = ("jsonl", "tsv", "text")
EXTENSIONS = {
    ".jsonl": "jsonl",
    ".json": "jsonl",
    ".ndjson": "jsonl",
    ".tsv": "tsv",
    ".txt": "text",
}
TSV_TURN_SEPARATOR = " EOS "
_WEIGHT = re.compile(r"([0-9]*\.[0-9]+) (.*)", re.DOTALL)

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
}


@dataclass(frozen=True, slots=True)
class Dialogue:
    """Turns of one dialogue; `weights` (one per turn) only where the corpus gives them."""

    turns: list[str]
    weights: list[float] | None
    source: str
    line: int


@dataclass(frozen=True, slots=True)
class BadRecord:
    """A line (or file) that is not a usable dialogue; `reason` is a key of `REASONS`."""

    reason: str
    message: str
    source: str
    line: int | None = None

    def error(self) -> InputError:
        return InputError(self.message, path=self.source, line=self.line)


Record = Dialogue | BadRecord


def detect_format(path: Path, first_line: str = "") -> str:
    """The format of a file from its extension (under any .gz), else from its first line."""
    suffixes = [s.lower() for s in path.suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    if suffixes and suffixes[-1] in EXTENSIONS:
        return EXTENSIONS[suffixes[-1]]
    stripped = first_line.lstrip("\ufeff \t")
    if stripped.startswith(("[", "{")):
        return "jsonl"
    if "\t" in first_line:
        return "tsv"
    return "text"


def expand_inputs(patterns: Iterable[str | Path]) -> tuple[list[Path], list[str]]:
    """Files named by paths and globs, in order, each once; and the patterns that name none."""
    files: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()
    for pattern in patterns:
        text = str(pattern)
        path = Path(text).expanduser()
        if path.exists() or not glob.has_magic(text):
            matches = [path] if path.is_file() else []
        else:
            matches = [Path(p) for p in sorted(glob.glob(text, recursive=True))]
            matches = [p for p in matches if p.is_file()]
        if not matches:
            missing.append(text)
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files, missing


class Corpus:
    """The records of several input files, read lazily, with a byte count for progress.

    `format` is "auto" (per file) or one of `FORMATS` for every file.
    """

    def __init__(self, inputs: Sequence[str | Path], format: str = "auto") -> None:
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"unknown format {format!r}")
        self.format = format
        self.files, self.missing = expand_inputs(inputs)
        self.total_bytes = sum(f.stat().st_size for f in self.files)
        self.formats: dict[str, str] = {}  # file -> format, filled in as files are opened
        self._done_bytes = 0
        self._handle: BinaryIO | None = None

    @property
    def bytes_read(self) -> int:
        """Bytes of the input files (as stored, compressed or not) consumed so far."""
        current = self._handle.tell() if self._handle is not None else 0
        return self._done_bytes + current

    def __iter__(self) -> Iterator[Record]:
        for pattern in self.missing:
            what = "no file matches" if glob.has_magic(pattern) else REASONS["missing-file"]
            if Path(pattern).is_dir():
                what = "is a directory, not a file"
            yield BadRecord("missing-file", what, pattern)
        for path in self.files:
            with open(path, "rb") as raw:
                self._handle = raw
                try:
                    yield from self._read(path, raw)
                finally:
                    self._handle = None
                    self._done_bytes += path.stat().st_size

    def _read(self, path: Path, raw: BinaryIO) -> Iterator[Record]:
        source = str(path)
        gzipped = raw.read(2) == b"\x1f\x8b"
        raw.seek(0)
        stream: BinaryIO = gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[assignment]
        lines = _numbered_lines(stream, source)
        head: list[Line] = []  # up to the first non-blank line, which tells the format
        for item in lines:
            head.append(item)
            if not isinstance(item[1], str) or item[1].strip():
                break
        if not head:
            yield BadRecord("empty-file", REASONS["empty-file"], source)
            return
        format = self.format
        if format == "auto":
            sniff = head[-1][1]
            format = detect_format(path, sniff if isinstance(sniff, str) else "")
        self.formats[source] = format
        reader = {"jsonl": _read_jsonl, "tsv": _read_tsv, "text": _read_text}[format]
        count = 0
        for record in reader(itertools.chain(head, lines), source):
            count += 1
            yield record
        if not count:
            yield BadRecord("empty-file", f"{REASONS['empty-file']} (only blank lines)", source)


Line = tuple[int, "str | BadRecord"]


def _numbered_lines(stream: BinaryIO, source: str) -> Iterator[Line]:
    """(line number, text) for each line, or a BadRecord for an undecodable line."""
    number = 0
    try:
        for number, data in enumerate(stream, 1):
            yield number, _decode(data, number, source)
    except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
        yield number + 1, BadRecord("unreadable", f"cannot read: {exc}", source, number + 1)


def _decode(data: bytes, number: int, source: str) -> str | BadRecord:
    if b"\0" in data:
        column = data.index(b"\0") + 1
        return BadRecord("nul-byte", f"NUL byte at column {column}", source, number)
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        message = f"invalid UTF-8 (byte 0x{data[exc.start]:02x} at column {exc.start + 1})"
        return BadRecord("invalid-utf8", message, source, number)
    if number == 1:
        text = text.removeprefix("\ufeff")
    return text.rstrip("\r\n")


def _check_turns(turns: list[str], weights: list[float] | None, source: str, line: int) -> Record:
    stripped = [t.strip() for t in turns]
    if not all(stripped):
        empty = stripped.index("") + 1
        return BadRecord("empty-turn", f"turn {empty} is empty", source, line)
    if len(stripped) < 2:
        return BadRecord(
            "one-turn", "a dialogue needs at least 2 turns, this one has 1", source, line
        )
    return Dialogue(stripped, weights, source, line)


def _read_jsonl(lines: Iterator[Line], source: str) -> Iterator[Record]:
    for number, text in lines:
        if isinstance(text, BadRecord):
            yield text
            continue
        if not text.strip():
            continue
        try:
            value = json.loads(text)
        except ValueError as exc:
            message = (
                f"malformed JSON: {getattr(exc, 'msg', exc)} (column {getattr(exc, 'colno', '?')})"
            )
            yield BadRecord("malformed-json", message, source, number)
            continue
        turns = value.get("turns") if isinstance(value, dict) else value
        if not isinstance(turns, list) or not set(map(type, turns)) <= {str}:
            yield BadRecord(
                "not-turns",
                'expected a JSON array of strings or an object with a "turns" array of strings',
                source,
                number,
            )
            continue
        yield _check_turns(turns, None, source, number)


def _read_tsv(lines: Iterator[Line], source: str) -> Iterator[Record]:
    weighted: bool | None = None  # decided by the first good line of the file
    for number, text in lines:
        if isinstance(text, BadRecord):
            yield text
            continue
        if not text.strip():
            continue
        parts = text.split("\t")
        if len(parts) == 1:
            yield BadRecord(
                "no-tab", "expected `context<TAB>response`, found no tab", source, number
            )
            continue
        if len(parts) > 2:
            message = f"expected `context<TAB>response`, found {len(parts) - 1} tabs"
            yield BadRecord("several-tabs", message, source, number)
            continue
        turns = [*parts[0].split(TSV_TURN_SEPARATOR), parts[1]]
        matches = [_WEIGHT.fullmatch(t.strip()) for t in turns]
        if weighted is None:
            weighted = all(matches)
        if weighted:
            unweighted = [i + 1 for i, m in enumerate(matches) if m is None]
            if unweighted:
                message = (
                    f"turn {unweighted[0]} has no weight (this file's turns start with a "
                    "weight, like `1.0 text`)"
                )
                yield BadRecord("bad-weight", message, source, number)
                continue
            weights = [float(m.group(1)) for m in matches]  # type: ignore[union-attr]
            turns = [m.group(2) for m in matches]  # type: ignore[union-attr]
        else:
            # DialoGPT's prepare4db.sh gives raw lines weight 0.0 to context, 1.0 to the response.
            weights = [0.0] * (len(turns) - 1) + [1.0]
        yield _check_turns(turns, weights, source, number)


def _read_text(lines: Iterator[Line], source: str) -> Iterator[Record]:
    turns: list[str] = []
    start = 0
    bad: BadRecord | None = None
    for number, text in lines:
        if isinstance(text, str) and not text.strip():
            if turns or bad:
                yield bad or _check_turns(turns, None, source, start)
            turns, bad = [], None
            continue
        if not turns and bad is None:
            start = number
        if isinstance(text, BadRecord):
            bad = bad or text
        else:
            turns.append(text)
    if turns or bad:
        yield bad or _check_turns(turns, None, source, start)
