"""Plain text: one turn per line, dialogues separated by blank lines."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from convcli.data.readers.base import BadRecord, ReadOptions, Record, check_turns
from convcli.data.readers.lines import Line, LineReader


def paragraphs(lines: Iterator[Line]) -> Iterator[tuple[int, list[str] | BadRecord]]:
    """(first line, lines) of each run of lines that are not blank; a bad line spoils
    only its own block (the first bad line stands for it)."""
    block: list[str] = []
    start = 0
    bad: BadRecord | None = None
    for number, text in lines:
        if isinstance(text, str) and not text.strip():
            if block or bad:
                yield start, bad or block
            block, bad = [], None
            continue
        if not block and bad is None:
            start = number
        if isinstance(text, BadRecord):
            bad = bad or text
        else:
            block.append(text)
    if block or bad:
        yield start, bad or block


class Text(LineReader):
    name = "text"
    extensions = (".txt",)
    example = "Hello<NEWLINE>Hi! How are you?<NEWLINE><NEWLINE>(next dialogue)"
    blocks = True

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        for start, block in paragraphs(lines):
            if isinstance(block, BadRecord):
                yield block
            else:
                yield check_turns(block, None, source, start)
