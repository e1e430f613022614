"""DialoGPT TSV: `turn EOS turn ... <TAB> response`, one dialogue per line.

Either every turn carries a weight (`0.0 text`: context only, `1.0 text`: trained on) or
none does; the first good line of a file decides. Raw lines get DialoGPT's own weights:
context 0.0, response 1.0.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from convcli.data.readers.base import BadRecord, Head, ReadOptions, Record, check_turns
from convcli.data.readers.lines import Line, LineReader, decode

TURN_SEPARATOR = " EOS "
_WEIGHT = re.compile(r"([0-9]*\.[0-9]+) (.*)", re.DOTALL)


def _turns(text: str) -> list[str]:
    """The turns of a TSV line with exactly one tab (weights not split off yet)."""
    context, response = text.split("\t")
    return [*context.split(TURN_SEPARATOR), response]


def _weights(turns: list[str]) -> list[re.Match[str] | None]:
    """Each turn's `weight text` match, or None where it has no weight."""
    return [_WEIGHT.fullmatch(t.strip()) for t in turns]


class Tsv(LineReader):
    name = "tsv"
    extensions = (".tsv",)
    example = "0.0 Hello EOS 1.0 Hi! How are you?<TAB>1.0 Fine, thanks."

    def sniff(self, head: Head) -> int:
        lines = head.lines(5)
        return 2 if lines and all(line.count("\t") == 1 for line in lines) else 0

    def file_state(self, data: bytes, line: int, source: str) -> bool | None:
        """Whether the first good line of `data` (if any) has a weight on every turn."""
        for offset, raw in enumerate(data.split(b"\n")):
            text = decode(raw, line + offset, source)
            if isinstance(text, str) and text.strip() and text.count("\t") == 1:
                return all(_weights(_turns(text)))
        return None

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        weighted: bool | None = state
        for number, text in lines:
            if isinstance(text, BadRecord):
                yield text
                continue
            if not text.strip():
                continue
            tabs = text.count("\t")
            if tabs == 0:
                message = "expected `context<TAB>response`, found no tab"
                yield BadRecord("no-tab", message, source, number)
                continue
            if tabs > 1:
                message = f"expected `context<TAB>response`, found {tabs} tabs"
                yield BadRecord("several-tabs", message, source, number)
                continue
            turns = _turns(text)
            matches = _weights(turns)
            if weighted is None:
                weighted = all(matches)
            if weighted:
                unweighted = [i + 1 for i, m in enumerate(matches) if m is None]
                if unweighted:
                    message = (
                        f"turn {unweighted[0]} has no weight (this file's turns start with a "
                        "weight, like `1.0 text`)"
                    )
                    yield BadRecord("bad-weight", message, source, number)
                    continue
                weights = [float(m.group(1)) for m in matches]  # type: ignore[union-attr]
                turns = [m.group(2) for m in matches]  # type: ignore[union-attr]
            else:
                # DialoGPT's prepare4db.sh gives raw lines weight 0.0 to context, 1.0 to the reply.
                weights = [0.0] * (len(turns) - 1) + [1.0]
            yield check_turns(turns, weights, source, number)
