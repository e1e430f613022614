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

Reading and parsing are two steps so that parsing can run in other processes:
`Corpus.chunks` reads files as raw `Chunk`s of whole lines (cheap: no decoding) and
`parse_chunk` turns a chunk into records. Iterating a `Corpus` does both, in order.
"""

from __future__ import annotations

import glob
import gzip
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
CHUNK_BYTES = 1 << 18  # raw bytes per Chunk (about 4k short turns)
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


@dataclass(frozen=True, slots=True)
class Chunk:
    """Whole lines of one file, as read (not decoded); `parse_chunk` makes records of them.

    Small and picklable, so parsing can happen in a worker process. In the text format a
    chunk ends after a blank line: no dialogue spans two chunks.
    """

    source: str
    format: str
    line: int  # the number of the first line of `data`
    data: bytes
    weighted: bool | None = None  # TSV: the file's turns carry weights (None: not yet known)
    error: BadRecord | None = None  # the file could not be read past these lines


def parse_chunk(chunk: Chunk) -> Iterator[Record]:
    """The records of a chunk's lines, in order (the same as reading them as part of a file)."""
    lines = _chunk_lines(chunk)
    if chunk.format == "tsv":
        return _read_tsv(lines, chunk.source, chunk.weighted)
    return {"jsonl": _read_jsonl, "text": _read_text}[chunk.format](lines, chunk.source)


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
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]  # ~ too
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
        for item in self.chunks():
            if isinstance(item, BadRecord):
                yield item
            else:
                yield from parse_chunk(item)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[Chunk | BadRecord]:
        """The files as chunks of about `size` bytes, in order, with a `BadRecord` for
        each missing, empty or unreadable file where its records would be."""
        for pattern in self.missing:
            what = "no file matches" if glob.has_magic(pattern) else REASONS["missing-file"]
            if Path(pattern).is_dir():
                what = "is a directory, not a file"
            yield BadRecord("missing-file", what, pattern)
        for path in self.files:
            with open(path, "rb") as raw:
                self._handle = raw
                try:
                    gzipped = raw.read(2) == b"\x1f\x8b"
                    raw.seek(0)
                    stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
                    yield from self._file_chunks(path, stream, size)  # type: ignore[arg-type]
                finally:
                    self._handle = None
                    self._done_bytes += path.stat().st_size

    def _file_chunks(self, path: Path, stream: BinaryIO, size: int) -> Iterator[Chunk | BadRecord]:
        """One file's chunks. Leading blank lines are dropped (no format has a record in
        them); the first other line tells the format. Records are as if the file were read
        line by line: a read error comes after the whole lines before it."""
        source = str(path)
        format = None if self.format == "auto" else self.format
        weighted: bool | None = None  # TSV: decided by the first good line of the file
        head = True  # only blank lines so far: they hold no record, the format is unknown
        any_line = False
        last_blank = b""
        line = 1  # the number of the first line in `pending`
        pending = bytearray()  # read, not yet in a chunk
        searched = 0  # text: `pending[:searched]` has no blank line to cut after
        while True:
            error: BadRecord | None = None
            try:
                # read1: what was read before a .gz turns out corrupt is kept (read() loses it).
                piece = stream.read1(size)
            except (OSError, EOFError) as exc:  # a corrupt or truncated .gz
                piece, error = b"", BadRecord("unreadable", f"cannot read: {exc}", source)
            pending += piece
            if piece and len(pending) - searched < size:
                continue
            # Whole lines; at the end of the file the last line needs no newline, but after a
            # read error a partial line is dropped (as reading line by line would).
            whole = len(pending) if not piece and error is None else pending.rfind(b"\n") + 1
            any_line = any_line or whole > 0
            if head:
                first = _first_line_not_blank(pending[:whole], line, source)
                if first is not None or error is not None:
                    head = False
                    format = format or detect_format(path, first if isinstance(first, str) else "")
                    self.formats[source] = format
                elif whole:
                    last_blank = pending[:whole].removesuffix(b"\n").rpartition(b"\n")[2]
                    line += pending.count(b"\n", 0, whole)
                    del pending[:whole]
                    whole = 0
            if format == "tsv" and weighted is None:
                weighted = _tsv_weighted(pending[:whole], line, source)
            cut = whole
            if format == "text" and piece:  # keep dialogues whole: cut after a blank line
                cut = _after_last_blank_line(pending, whole, searched)
                searched = whole - cut
            if format is not None and (cut or error):
                lines = pending.count(b"\n", 0, cut)
                if error is not None:
                    error = BadRecord(error.reason, error.message, source, line + lines)
                yield Chunk(source, format, line, bytes(pending[:cut]), weighted, error)
                line += lines
                del pending[:cut]
            if not piece:
                break
        if head and error is None:
            if any_line:  # the format as the last blank line tells it
                self.formats[source] = format or detect_format(path, last_blank.decode())
            what = REASONS["empty-file"] + ("" if not any_line else " (only blank lines)")
            yield BadRecord("empty-file", what, source)


def _first_line_not_blank(data: bytes, number: int, source: str) -> str | BadRecord | None:
    """The first line of `data` that is not blank (decoded, or why it cannot be), if any."""
    start = 0
    while start < len(data):
        end = data.find(b"\n", start)
        end = len(data) if end < 0 else end
        text = _decode(data[start:end], number, source)
        if not isinstance(text, str) or text.strip():
            return text
        start, number = end + 1, number + 1
    return None


def _tsv_weighted(data: bytes, number: int, source: str) -> bool | None:
    """Whether the first good TSV line of `data` (if any) has a weight on every turn."""
    for offset, raw in enumerate(data.split(b"\n")):
        text = _decode(raw, number + offset, source)
        if isinstance(text, str) and text.strip() and text.count("\t") == 1:
            return all(_weights(_tsv_turns(text)))
    return None


def _after_last_blank_line(data: bytearray, end: int, searched: int) -> int:
    """The offset just after the last line of `data[:end]` that is blank for sure (0: none).

    Lines before `searched` are known not to be blank. Only lines of ASCII whitespace are
    taken; a line blank by Unicode's rules alone (U+3000) is not a place to cut, which is
    safe: the chunk just gets longer.
    """
    stop = data.rfind(b"\n", 0, end)  # the newline that ends the line looked at
    while stop >= searched:
        start = data.rfind(b"\n", 0, stop) + 1
        if not data[start:stop].strip():
            return stop + 1
        stop = start - 1
    return 0


Line = tuple[int, "str | BadRecord"]


def _chunk_lines(chunk: Chunk) -> Iterator[Line]:
    """(line number, text) for each line of a chunk, or a BadRecord for an undecodable line;
    then the chunk's read error, if any."""
    if chunk.data:
        lines = chunk.data.split(b"\n")
        if chunk.data.endswith(b"\n"):
            lines.pop()
        for number, data in enumerate(lines, chunk.line):
            yield number, _decode(data, number, chunk.source)
    if chunk.error is not None:
        yield chunk.error.line or 0, chunk.error


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


def _tsv_turns(text: str) -> list[str]:
    """The turns of a TSV line with exactly one tab (weights not split off yet)."""
    context, response = text.split("\t")
    return [*context.split(TSV_TURN_SEPARATOR), response]


def _weights(turns: list[str]) -> list[re.Match[str] | None]:
    """Each turn's `weight text` match, or None where it has no weight."""
    return [_WEIGHT.fullmatch(t.strip()) for t in turns]


def _read_tsv(lines: Iterator[Line], source: str, weighted: bool | None = None) -> Iterator[Record]:
    """TSV records; `weighted` (None: decided by the first good line) as for the whole file."""
    for number, text in lines:
        if isinstance(text, BadRecord):
            yield text
            continue
        if not text.strip():
            continue
        tabs = text.count("\t")
        if tabs == 0:
            yield BadRecord(
                "no-tab", "expected `context<TAB>response`, found no tab", source, number
            )
            continue
        if tabs > 1:
            message = f"expected `context<TAB>response`, found {tabs} tabs"
            yield BadRecord("several-tabs", message, source, number)
            continue
        turns = _tsv_turns(text)
        matches = _weights(turns)
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
