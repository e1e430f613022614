"""Chat messages JSONL (OpenAI fine-tuning, TRL, axolotl): one object per line with
`messages: [{"role": "system"|"user"|"assistant", "content": "..."}]`."""

from __future__ import annotations

from typing import Any

from convcli.data.readers.base import ReadOptions, Record, Role
from convcli.data.readers.json_records import JsonRecords
from convcli.data.readers.roles import role_turns

ROLES: dict[str, Role] = {"system": "system", "user": "user", "assistant": "assistant"}


class Messages(JsonRecords):
    name = "messages"
    extensions = (".jsonl", ".json", ".ndjson")
    example = '{"messages": [{"role": "user", "content": "Hello"}, {"role": "assistant", ...}]}'
    keys = ("messages",)

    def record(self, value: Any, source: str, line: int, options: ReadOptions) -> Record:
        messages = value.get(options.field or "messages") if isinstance(value, dict) else None
        return role_turns(
            messages, key=options.field or "messages", role_key="role", text_key="content",
            roles=ROLES, source=source, line=line, options=options,
        )  # fmt: skip
