"""Reply trees: ConvoKit corpora (`utterances.jsonl`: `id`, `conversation_id`, `reply_to`,
`text`, one utterance per line), given as the corpus folder or the file.

Each root-to-leaf path is a dialogue, as DialoGPT's Reddit extractor makes them
(`tree_paths="leaves"`), or every node's path from the root ("all", as DialoGPT trains on);
`max_depth` drops replies deeper than that many turns. A conversation is read whole, so
memory is its utterances, not the corpus's: the utterances of a conversation must be on
consecutive lines, as ConvoKit writes them (a conversation that comes back later is read
as another one, whose replies to the first part are counted as orphans), and one over
`MAX_CONVERSATION` bytes is read in parts (the same: its later replies become orphans).
The paths of a conversation are many: their turns add up to (paths x depth), which
`max_depth` bounds.

Counted skips, per conversation: several roots (the whole conversation); a reply whose
parent is missing (the orphan and its replies); a cycle (its utterances and replies).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convcli.data.readers.base import (
    BadRecord,
    Chunk,
    Head,
    Opener,
    ReadOptions,
    Record,
    check_turns,
)
from convcli.data.readers.json_records import first_record
from convcli.data.readers.lines import Line, LineReader, json_error

UTTERANCES = "utterances.jsonl"
MAX_CONVERSATION = 64 << 20  # bytes of one conversation read whole, at most
FIELDS = ("id", "conversation_id", "reply_to", "text")
_CONVERSATION = re.compile(rb'"conversation_id"\s*:\s*("(?:[^"\\]|\\.)*"|[^\s,}]+)')


def _conversation(line: bytes) -> bytes | None:
    """A raw line's conversation id, as written (None: none to be seen)."""
    match = _CONVERSATION.search(line)
    return match.group(1) if match else None


class Utterance:
    __slots__ = ("children", "line", "parent", "text")

    def __init__(self, line: int, text: str, parent: str | None) -> None:
        self.line, self.text, self.parent = line, text, parent
        self.children: list[str] = []


class ReplyTrees(LineReader):
    name = "convokit"
    extensions = (".jsonl",)
    example = '{"id": "u2", "conversation_id": "u1", "reply_to": "u1", "text": "Hi there"}'
    directories = True

    def sniff(self, head: Head) -> int:
        value = first_record(head)
        return 3 if isinstance(value, dict) and {"conversation_id", "reply_to"} <= set(value) else 0

    def claims(self, folder: Path) -> bool:
        return (folder / UTTERANCES).is_file()

    def chunks(
        self, path: Path, open: Opener, size: int, options: ReadOptions
    ) -> Iterator[Chunk | BadRecord]:
        return super().chunks(path / UTTERANCES if path.is_dir() else path, open, size, options)

    def cut_at(self, data: bytearray, end: int, searched: int) -> int:
        """Before the first line of the last conversation read (it may go on). A
        conversation over `MAX_CONVERSATION` bytes is cut anyway: memory stays bounded, and
        its later replies are counted as orphans."""
        if end > MAX_CONVERSATION:
            return end
        last: bytes | None = None
        stop = end - 1  # the newline that ends the line looked at
        while stop >= 0:
            start = data.rfind(b"\n", 0, stop) + 1
            if start < searched:  # the rest is one conversation, searched before
                first = next(filter(None, map(_conversation, data[:searched].split(b"\n"))), None)
                return searched if last is not None and first != last else 0
            conversation = _conversation(data[start:stop])
            if conversation is not None:
                if last is not None and conversation != last:
                    return stop + 1
                last = conversation
            stop = start - 1
        return 0

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        group: list[tuple[int, dict[str, Any]]] = []
        for number, text in lines:
            if isinstance(text, BadRecord):
                yield text
                continue
            if not text.strip():
                continue
            try:
                value = json.loads(text)
            except ValueError as exc:
                yield BadRecord("malformed-json", json_error(exc), source, number)
                continue
            problem = _check(value)
            if problem:
                yield BadRecord("not-turns", problem, source, number)
                continue
            if group and group[0][1]["conversation_id"] != value["conversation_id"]:
                yield from _paths(group, source, options)
                group = []
            group.append((number, value))
        if group:
            yield from _paths(group, source, options)


def _check(value: Any) -> str | None:
    if not isinstance(value, dict) or not all(k in value for k in FIELDS):
        return "expected an utterance object with " + ", ".join(f'"{k}"' for k in FIELDS)
    if not isinstance(value["text"], str):
        return '"text" is not a string'
    if not isinstance(value["id"], str | int) or not isinstance(
        value["reply_to"], str | int | type(None)
    ):
        return '"id" and "reply_to" must be strings (or null for a root)'
    return None


def _paths(
    group: list[tuple[int, dict[str, Any]]], source: str, options: ReadOptions
) -> Iterator[Record]:
    """The dialogues of one conversation (and its counted skips), in file order."""
    nodes: dict[str, Utterance] = {}
    for number, value in group:
        key = str(value["id"])
        if key in nodes:
            yield BadRecord("not-turns", f"utterance id {key!r} again", source, number)
            continue
        parent = value["reply_to"]
        nodes[key] = Utterance(number, value["text"], None if parent is None else str(parent))
    roots = [k for k, n in nodes.items() if n.parent is None]
    first = group[0][0]
    if len(roots) > 1:
        conversation = group[0][1]["conversation_id"]
        message = (
            f"conversation {conversation!r} has {len(roots)} roots (utterances with no reply_to)"
        )
        yield BadRecord("several-roots", message, source, first)
        return
    for key, node in nodes.items():
        if node.parent is not None and node.parent in nodes:
            nodes[node.parent].children.append(key)
    reached: set[str] = set()
    if roots:
        yield from _walk(nodes, roots[0], reached, source, options)
    for key, node in nodes.items():  # what the root does not reach: orphans and cycles
        if key in reached:
            continue
        if node.parent is not None and node.parent not in nodes:
            message = (
                f"utterance {key!r} replies to {node.parent!r}, which is not in its conversation"
            )
            yield BadRecord("orphan", message, source, node.line)
            _mark(nodes, key, reached)
    for key in nodes:
        if key in reached:
            continue
        cycle = _cycle_from(nodes, key)
        if cycle is not None:
            message = "utterances reply to each other in a cycle: " + " -> ".join(
                repr(k) for k in [*cycle, cycle[0]]
            )
            yield BadRecord("cycle", message, source, nodes[cycle[0]].line)
            for member in cycle:
                _mark(nodes, member, reached)


def _walk(
    nodes: dict[str, Utterance], root: str, reached: set[str], source: str, options: ReadOptions
) -> Iterator[Record]:
    """Depth first from the root: each leaf's path (or each node's, with "all")."""
    limit = options.max_depth or 0
    path: list[str] = []  # texts from the root to the node on top of the stack
    stack: list[tuple[str, int]] = [(root, 1)]
    count = 0
    while stack:
        key, depth = stack.pop()
        node = nodes[key]
        reached.add(key)
        del path[depth - 1 :]
        path.append(node.text)
        children = node.children if not limit or depth < limit else []
        if depth >= 2 and (options.tree_paths == "all" or not children):
            count += 1
            yield check_turns(list(path), None, source, node.line)
        stack.extend((child, depth + 1) for child in reversed(children))
    if count == 0:  # a root nobody replied to
        yield check_turns(path, None, source, nodes[root].line)


def _mark(nodes: dict[str, Utterance], key: str, reached: set[str]) -> None:
    """Mark an utterance and every reply under it as dealt with."""
    stack = [key]
    while stack:
        current = stack.pop()
        if current not in reached:
            reached.add(current)
            stack.extend(nodes[current].children)


def _cycle_from(nodes: dict[str, Utterance], key: str) -> list[str] | None:
    """The cycle that `key`'s chain of parents runs into, if any (first member: the first
    one met)."""
    seen: dict[str, int] = {}
    chain: list[str] = []
    current: str | None = key
    while current is not None and current in nodes and current not in seen:
        seen[current] = len(chain)
        chain.append(current)
        current = nodes[current].parent
    if current is None or current not in nodes:
        return None
    return chain[seen[current] :]
