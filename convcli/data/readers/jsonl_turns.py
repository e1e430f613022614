"""JSONL of turns: each line a JSON array of strings, or an object with a `turns` array."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

from convcli.data.readers.base import BadRecord, Head, ReadOptions, Record, check_turns
from convcli.data.readers.lines import Line, LineReader, json_error

NOT_TURNS = 'expected a JSON array of strings or an object with a "turns" array of strings'


def json_lines(lines: Iterator[Line], source: str) -> Iterator[tuple[int, Any] | BadRecord]:
    """(line number, JSON value) of each line that is not blank, or why it is no JSON."""
    for number, text in lines:
        if isinstance(text, BadRecord):
            yield text
        elif text.strip():
            try:
                yield number, json.loads(text)
            except ValueError as exc:
                yield BadRecord("malformed-json", json_error(exc), source, number)


def first_json(head: Head) -> Any:
    """The first line of a file as JSON (None where it is not, or cut short)."""
    lines = head.lines(1)
    try:
        return json.loads(lines[0]) if lines else None
    except ValueError:
        return None


class JsonlTurns(LineReader):
    name = "jsonl"
    extensions = (".jsonl", ".json", ".ndjson")
    example = '["Hello", "Hi! How are you?"]  or  {"turns": ["Hello", "Hi!"]}'

    def sniff(self, head: Head) -> int:
        value = first_json(head)
        if isinstance(value, dict):
            value = value.get("turns")
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return 3
        lines = head.lines(1)
        return 1 if lines and lines[0].lstrip("\ufeff \t")[:1] in ("[", "{") else 0

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        for item in json_lines(lines, source):
            if isinstance(item, BadRecord):
                yield item
                continue
            number, value = item
            turns = value.get("turns") if isinstance(value, dict) else value
            if not isinstance(turns, list) or not set(map(type, turns)) <= {str}:
                yield BadRecord("not-turns", NOT_TURNS, source, number)
                continue
            yield check_turns(turns, None, source, number)
