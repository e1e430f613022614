"""The JSONL batch mode of `convcli generate`: contexts in, one JSON answer per line out.

An input line is a context as the corpus readers read it (`data.readers.contexts`): a JSON
array of turns (`["Hello", "Hi!"]`), an object with a `turns` array, chat `messages` or
ShareGPT `conversations` (the object's other keys are copied to the output line). Blank
lines are ignored. A bad line is an error naming its line number, or, with `strict=False`,
counted and skipped.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import IO, Any

from convcli.data.readers.contexts import Context, parse_context
from convcli.errors import InputError

Item = Context  # one context read from the input


@dataclass
class BatchCounts:
    """Line accounting: read = written + skipped."""

    read: int = 0
    written: int = 0
    skipped: int = 0
    bad: list[str] = field(default_factory=list)
    """`path:line: reason` of each skipped line."""


def read_items(
    lines: Iterable[str], *, path: str, strict: bool, counts: BatchCounts
) -> Iterator[Item]:
    """Parse input lines; bad ones raise (strict) or are counted in `counts` and skipped."""
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        counts.read += 1
        try:
            yield parse_context(text, path=path, line=number)
        except InputError as exc:
            if strict:
                raise
            counts.skipped += 1
            counts.bad.append(str(exc))


def batched(items: Iterable[Item], size: int) -> Iterator[list[Item]]:
    chunk: list[Item] = []
    for item in items:
        chunk.append(item)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


Answer = Callable[[list[list[str]]], list[dict[str, Any]]]
"""A batch of contexts -> one answer dict per context (`responses`, maybe `candidates`)."""


def run_batches(
    items: Sequence[Item],
    answer: Answer,
    out: IO[str],
    *,
    batch_size: int,
    counts: BatchCounts,
    progress: Callable[[int], None] | None = None,
) -> None:
    """Answer the items batch by batch, writing (and flushing) one JSON line each."""
    for chunk in batched(items, batch_size):
        answers = answer([item.turns for item in chunk])
        for item, result in zip(chunk, answers, strict=True):
            record = {**item.extra, "line": item.line, "context": item.turns, **result}
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
            counts.written += 1
        out.flush()
        if progress:
            progress(len(chunk))
