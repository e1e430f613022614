"""Contexts to answer (generate `--input`, eval, chat `--context`), read with the corpus
readers: a JSON array of turns, an object with `turns`, chat `messages` or ShareGPT
`conversations`. A context needs one turn (a dialogue to train on, two); the object's other
keys travel with it (an `id` is copied to the answer, a `reference` is what eval compares)."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from convcli.data.readers.base import BadRecord, ReadOptions
from convcli.data.readers.json_records import JsonRecords
from convcli.data.readers.lines import json_error
from convcli.data.readers.registry import READERS
from convcli.errors import InputError

CONTEXT = ReadOptions(min_turns=1)


@dataclass
class Context:
    """One context read from the input (`line`: where it starts)."""

    line: int | None
    turns: list[str]
    extra: dict[str, Any] = field(default_factory=dict)


def parse_context(text: str, *, path: str, line: int | None) -> Context:
    """A JSON text as a `Context`, or an `InputError` naming the file and line."""
    try:
        value = json.loads(text.rstrip("\r\n"))  # a line's end is not part of its columns
    except ValueError as exc:
        raise InputError(json_error(exc), path=path, line=line) from None
    return context_of(value, path=path, line=line)


def context_of(value: Any, *, path: str, line: int | None) -> Context:
    """A JSON value as a `Context`: the reader whose key the object holds reads it."""
    reader = READERS["jsonl"]
    if isinstance(value, dict):
        for candidate in READERS.values():
            keys = getattr(candidate, "keys", ())
            if isinstance(candidate, JsonRecords) and any(k in value for k in keys):
                reader = candidate
                break
    assert isinstance(reader, JsonRecords)
    record = reader.record(value, path, line or 0, CONTEXT)
    if isinstance(record, BadRecord):
        raise InputError(record.message, path=path, line=line)
    used = set(reader.keys) | ({"system"} if reader.name == "sharegpt" else set())
    extra = {k: v for k, v in value.items() if k not in used} if isinstance(value, dict) else {}
    return Context(line, record.turns, extra)
