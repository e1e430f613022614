"""Speaker-prefixed transcripts: `A: hello` / `B: hi there`, one turn per line, a blank
line between dialogues. Lines of one speaker in a row are one turn (`same_role`)."""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

from convcli.data.readers.base import BadRecord, Head, ReadOptions, Record, check_turns
from convcli.data.readers.lines import Line, LineReader
from convcli.data.readers.text import paragraphs

# A speaker is a short name (letters, digits, spaces, . ' -) before a colon.
SPEAKER = re.compile(r"\s*(\w[\w .'-]{0,39}?)\s*:\s*(.*)", re.DOTALL)


class Transcript(LineReader):
    name = "transcript"
    extensions = (".txt",)
    example = "A: Hello<NEWLINE>B: Hi! How are you?<NEWLINE><NEWLINE>(next dialogue)"
    blocks = True

    def sniff(self, head: Head) -> int:
        """Sure enough where nine lines of ten in the head name a speaker and, in each
        dialogue of three lines or more, a speaker comes back (`key: value` lines name each
        key once: a config file or a mail header is no transcript)."""
        blocks: list[list[str]] = [[]]
        lines = misses = 0
        for line in head.whole_lines()[:200]:
            if not line.strip():
                blocks.append([])
                continue
            lines += 1
            match = SPEAKER.fullmatch(line)
            if match is None:
                misses += 1
            else:
                blocks[-1].append(match.group(1))
        long = [b for b in blocks if len(b) >= 3]
        if not long or misses * 10 > lines:
            return 0
        return 2 if all(len(set(b)) < len(b) for b in long) else 0

    def parse(
        self, lines: Iterator[Line], source: str, state: Any, options: ReadOptions
    ) -> Iterator[Record]:
        for start, block in paragraphs(lines):
            if isinstance(block, BadRecord):
                yield block
                continue
            turns: list[str] = []
            speakers: list[str] = []
            same = 0
            for offset, text in enumerate(block):
                match = SPEAKER.fullmatch(text)
                if match is None:
                    message = "expected `speaker: text`, found no speaker"
                    yield BadRecord("no-speaker", message, source, start + offset)
                    break
                speaker, said = match.group(1), (match.group(2) or "").strip()
                if not said:
                    message = f"turn {len(turns) + 1} ({speaker}) is empty"
                    yield BadRecord("empty-turn", message, source, start + offset)
                    break
                if speakers and speakers[-1] == speaker:
                    same += 1
                    if options.same_role == "join":
                        turns[-1] += "\n" + said
                        continue
                turns.append(said)
                speakers.append(speaker)
            else:
                yield check_turns(turns, None, source, start, joined=same)
