"""Line formats: files cut into chunks of whole lines, records parsed line by line.

`LineReader.chunks` is the reading loop every line format shares: raw lines in, decoding
and parsing left to the workers. A chunk never splits a line, and for block formats
(`blocks`: a record runs to a blank line) never splits a record. A read error (a corrupt
.gz) comes after the whole lines before it, as reading line by line would give it.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from convcli.data.readers.base import (
    REASONS,
    BadRecord,
    Chunk,
    Opener,
    Reader,
    ReadOptions,
    Record,
)

Line = tuple[int, "str | BadRecord"]


class LineReader(Reader):
    """A format read line by line; subclasses implement `parse`."""

    blocks: ClassVar[bool] = False  # a record spans lines up to a blank line

    def cut_at(self, data: bytearray, end: int, searched: int) -> int:
        """Where a chunk may end in `data[:end]` (whole lines; 0: nowhere yet) so that no
        record spans two chunks. `data[:searched]` is known to hold no such place."""
        return _after_last_blank_line(data, end, searched) if self.blocks else end

    def file_state(self, data: bytes, line: int, source: str) -> Any:
        """What the first lines of a file (`data`, starting at `line`) tell about all of
        it (None: not known yet; called again with the next lines)."""
        return None

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        raise NotImplementedError

    def records(self, chunk: Chunk, options: ReadOptions) -> Iterator[Record]:
        return self.parse(chunk_lines(chunk), chunk.source, chunk.state, options)

    def chunks(
        self, path: Path, open: Opener, size: int, options: ReadOptions
    ) -> Iterator[Chunk | BadRecord]:
        with open(path) as stream:
            yield from self._chunks(str(path), stream, size)

    def _chunks(self, source: str, stream: Any, size: int) -> Iterator[Chunk | BadRecord]:
        state: Any = None
        any_line = False
        seen_text = False  # a line that is not blank (or not decodable) was read
        line = 1  # the number of the first line in `pending`
        pending = bytearray()  # read, not yet in a chunk
        searched = 0  # `pending[:searched]` has no place to cut (see `cut_at`)
        error: BadRecord | None = None
        while True:
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
            if not seen_text and whole:
                any_line = True
                text = pending[:whole].decode("utf-8", "replace")
                seen_text = bool((text[1:] if line == 1 and text[:1] == "\ufeff" else text).strip())
            if state is None and seen_text:
                state = self.file_state(bytes(pending[:whole]), line, source)
            cut = whole
            if piece:  # keep records whole (text: cut after a blank line)
                cut = self.cut_at(pending, whole, searched)
                searched = whole - cut
            if cut or error:
                lines = pending.count(b"\n", 0, cut)
                if error is not None:
                    error = dataclasses.replace(error, line=line + lines)
                yield Chunk(source, self.name, line, bytes(pending[:cut]), state, error)
                line += lines
                del pending[:cut]
            if not piece:
                break
        if not seen_text and error is None:
            what = REASONS["empty-file"] + (" (only blank lines)" if any_line else "")
            yield BadRecord("empty-file", what, source)


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


def chunk_lines(chunk: Chunk) -> Iterator[Line]:
    """(line number, text) for each line of a chunk, or a BadRecord for an undecodable line;
    then the chunk's read error, if any."""
    if chunk.data:
        lines = chunk.data.split(b"\n")
        if chunk.data.endswith(b"\n"):
            lines.pop()
        for number, data in enumerate(lines, chunk.line):
            yield number, decode(data, number, chunk.source)
    if chunk.error is not None:
        yield chunk.error.line or 0, chunk.error


def decode(data: bytes, number: int, source: str) -> str | BadRecord:
    """A line as text without its line ending, or why it cannot be decoded."""
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


def json_error(exc: ValueError) -> str:
    """A JSON decoding error in a few words, with its column."""
    return f"malformed JSON: {getattr(exc, 'msg', exc)} (column {getattr(exc, 'colno', '?')})"
