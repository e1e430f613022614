"""Formats of one JSON record per dialogue: JSONL lines, or a JSON document that is one
top-level array of records (as ShareGPT files often are).

A JSON array is not line-delimited, so the main process finds where each element ends
(`json.JSONDecoder.raw_decode`, in C) and ships the elements' raw text to the workers,
who parse them again: the array costs one extra parse, but memory stays flat (one
element, or one read of `size` bytes, at a time) and work still spreads over workers.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, ClassVar

from convcli.data.readers.base import (
    BadRecord,
    Chunk,
    Head,
    Opener,
    ReadOptions,
    Record,
)
from convcli.data.readers.lines import Line, LineReader, json_error

_DECODER = json.JSONDecoder()
_SPACE = " \t\r\n"


def is_array_document(head: Head) -> bool:
    """Whether a file starts as a JSON array of objects (`[` then `{`), not JSON lines."""
    text = head.text.lstrip("\ufeff" + _SPACE)
    return text[:1] == "[" and text[1:].lstrip(_SPACE)[:1] == "{"


def first_record(head: Head) -> Any:
    """The first record of a file, as JSON (None where it cannot be read from the head)."""
    if is_array_document(head):
        text = head.text.lstrip("\ufeff" + _SPACE)[1:].lstrip(_SPACE)
    else:
        lines = head.lines(1)
        text = lines[0].lstrip("\ufeff") if lines else ""
    try:
        return _DECODER.raw_decode(text)[0]
    except ValueError:
        return None


def _keys_in_head(head: Head, keys: tuple[str, ...]) -> bool:
    """A cut-short first record still shows its keys (`"messages":` in its text)."""
    return any(f'"{key}"' in head.text[:4096] for key in keys)


class JsonRecords(LineReader):
    """A format of JSON records, one per line or in one top-level array; subclasses say
    how a record becomes a dialogue (`record`) and which top-level key marks them."""

    keys: ClassVar[tuple[str, ...]] = ()  # the key a record of this format holds
    arrays: ClassVar[bool] = True  # a file may be one JSON array of records

    def sniff(self, head: Head) -> int:
        value = first_record(head)
        if isinstance(value, dict):
            return 3 if any(k in value for k in self.keys) else 0
        return 2 if value is None and _keys_in_head(head, self.keys) else 0

    def record(self, value: Any, source: str, line: int, options: ReadOptions) -> Record:
        raise NotImplementedError

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        for number, text in lines:
            if isinstance(text, BadRecord):
                yield text
            elif text.strip():
                try:
                    value = json.loads(text)
                except ValueError as exc:
                    yield BadRecord("malformed-json", json_error(exc), source, number)
                else:
                    yield self.record(value, source, number, options)

    def records(self, chunk: Chunk, options: ReadOptions) -> Iterator[Record]:
        if not isinstance(chunk.data, list):
            return super().records(chunk, options)
        return self._elements(chunk, options)

    def _elements(self, chunk: Chunk, options: ReadOptions) -> Iterator[Record]:
        for number, text in chunk.data:
            yield self.record(json.loads(text), chunk.source, number, options)
        if chunk.error is not None:
            yield chunk.error

    def chunks(
        self, path: Path, open: Opener, size: int, options: ReadOptions
    ) -> Iterator[Chunk | BadRecord]:
        with open(path) as stream:
            try:
                start = stream.read1(HEAD)
            except (OSError, EOFError):
                start = b""  # a corrupt .gz: the line reader says where it breaks
            head = Head(path, start.decode("utf-8", "replace"))
            stream.seek(0)  # a GzipFile seeks back by reading again: cheap for HEAD bytes
            # A record is an object, never a list: a file that opens a list is one array.
            if self.arrays and head.text.lstrip("\ufeff" + _SPACE)[:1] == "[":
                yield from _array_chunks(str(path), stream, size, self.name)
            else:
                yield from self._chunks(str(path), stream, size)


HEAD = 4096
MAX_ELEMENT = 1 << 26  # characters: a malformed element is not read to the end of the file


def _array_chunks(source: str, stream: Any, size: int, name: str) -> Iterator[Chunk | BadRecord]:
    """Chunks of `(line, element text)` of a file that is one JSON array, in order. A
    malformed element ends the file: there is no next line to pick up from."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    text, pos, line = "", 0, 1  # text read, where parsing is, the line `pos` is on
    elements: list[tuple[int, str]] = []
    held = 0  # characters in `elements`
    eof = False

    def more() -> bool:
        """Read on (keeping `text[pos:]`); False at the end of the file."""
        nonlocal text, pos, eof
        if eof:
            return False
        try:
            piece = stream.read1(size)
            got = decoder.decode(piece, final=not piece)
        except UnicodeDecodeError as exc:
            raise _Broken("invalid-utf8", f"invalid UTF-8 ({exc.reason})") from None
        except (OSError, EOFError) as exc:
            raise _Broken("unreadable", f"cannot read: {exc}") from None
        eof = not piece
        text, pos = text[pos:] + got, 0
        return True

    def next_char() -> str:
        """The next character that is not white space ("" at the end of the file)."""
        nonlocal pos, line
        while True:
            stop = pos
            while stop < len(text) and text[stop] in _SPACE + "\ufeff":
                stop += 1
            line += text.count("\n", pos, stop)
            pos = stop
            if pos < len(text) or not more():
                return text[pos : pos + 1]

    try:
        if next_char() != "[":
            raise _Broken("malformed-json", "malformed JSON: expected `[` to open the array")
        pos += 1
        if next_char() == "]":
            pos += 1
            if next_char():
                raise _Broken("malformed-json", "malformed JSON: text after the array")
            yield BadRecord("empty-file", "empty file (an empty JSON array)", source)
            return
        while True:
            next_char()
            while True:  # an element may run past what is read: read on and try again
                try:
                    _, end = _DECODER.raw_decode(text, pos)
                    if end < len(text) or eof:
                        break
                except ValueError as exc:
                    if eof or len(text) - pos > MAX_ELEMENT:
                        raise _Broken("malformed-json", json_error(exc)) from None
                more()
            elements.append((line, text[pos:end]))
            held += end - pos
            line += text.count("\n", pos, end)
            pos = end
            char = next_char()
            if char not in (",", "]"):
                found = f"`{char}`" if char else "the end of the file"
                message = f"malformed JSON: expected `,` or `]` after an element, found {found}"
                raise _Broken("malformed-json", message)
            pos += 1
            if held >= size or char == "]":
                yield Chunk(source, name, elements[0][0], elements)
                elements, held = [], 0
            if char == "]":
                break
        if next_char():
            raise _Broken("malformed-json", "malformed JSON: text after the array")
    except _Broken as broken:
        bad = BadRecord(broken.reason, broken.message, source, line)
        if elements:
            yield Chunk(source, name, elements[0][0], elements, error=bad)
        else:
            yield bad


class _Broken(Exception):
    def __init__(self, reason: str, message: str) -> None:
        self.reason, self.message = reason, message
