"""JSONL of turns: each line a JSON array of strings, or an object with a `turns` array."""

from __future__ import annotations

from typing import Any

from convcli.data.readers.base import BadRecord, Head, ReadOptions, Record, check_turns
from convcli.data.readers.json_records import JsonRecords, first_record, is_array_document

NOT_TURNS = 'expected a JSON array of strings or an object with a "turns" array of strings'


class JsonlTurns(JsonRecords):
    name = "jsonl"
    extensions = (".jsonl", ".json", ".ndjson")
    example = '["Hello", "Hi! How are you?"]  or  {"turns": ["Hello", "Hi!"]}'
    keys = ("turns",)
    arrays = False  # a line that opens a list is a dialogue, not an array of records

    def sniff(self, head: Head) -> int:
        value = None if is_array_document(head) else first_record(head)
        if isinstance(value, dict):
            value = value.get("turns")
        if isinstance(value, list) and all(isinstance(t, str) for t in value):
            return 3
        lines = head.lines(1)
        return 1 if lines and lines[0].lstrip("\ufeff \t")[:1] in ("[", "{") else 0

    def record(self, value: Any, source: str, line: int, options: ReadOptions) -> Record:
        turns = value.get(options.field or "turns") if isinstance(value, dict) else value
        if not isinstance(turns, list) or not set(map(type, turns)) <= {str}:
            return BadRecord("not-turns", NOT_TURNS, source, line)
        return check_turns(turns, None, source, line, minimum=options.min_turns)
