"""ShareGPT: `{"conversations": [{"from": "human"|"gpt"|"system", "value": "..."}]}` per
line, or a JSON array of such records. A record's own `system` string is an opening
system turn."""

from __future__ import annotations

from typing import Any

from convcli.data.readers.base import ReadOptions, Record, Role
from convcli.data.readers.json_records import JsonRecords
from convcli.data.readers.roles import role_turns

# The names ShareGPT dumps use for each side.
ROLES: dict[str, Role] = {
    "system": "system",
    "human": "user",
    "user": "user",
    "gpt": "assistant",
    "assistant": "assistant",
    "chatgpt": "assistant",
}


class ShareGpt(JsonRecords):
    name = "sharegpt"
    extensions = (".jsonl", ".json", ".ndjson")
    example = '{"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", ...}]}'
    keys = ("conversations",)

    def record(self, value: Any, source: str, line: int, options: ReadOptions) -> Record:
        key = options.field or "conversations"
        is_dict = isinstance(value, dict)
        return role_turns(
            value.get(key) if is_dict else None, key=key, role_key="from", text_key="value",
            roles=ROLES, source=source, line=line, options=options,
            system=value.get("system") if is_dict else None,
        )  # fmt: skip
