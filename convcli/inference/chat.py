"""A chat session: history as turns, slash commands, a JSONL transcript. No terminal I/O.

`ChatSession.handle(line)` takes one line the user typed and returns a `ChatReply`
(the bot's reply for stdout, notes for stderr, whether to quit); `convcli chat` only
reads lines and prints replies. The model side is a `Responder`: a function from the
context turns to a `Response`, built by `make_responder` from a `ConversationModel`
(plain sampling) or an `MMIReranker`.

Transcript format (one JSON object per line, flushed as it happens):

    {"event": "start", "time": ..., "context": [opening turns], ...settings}
    {"event": "turn", "time": ..., "user": "...", "bot": "...", "candidates": [...]}
    {"event": "reset", "time": ...}
    {"event": "resume", "time": ...}

Resuming replays the turns after the last `start` (and after the last `reset`).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import IO, Any

from convcli.errors import InputError

HELP = """commands:
  /reset       start a new conversation (the opening turns are kept)
  /candidates  show the last turn's candidates and their MMI scores
  /help        show this help
  /quit, /exit end the chat (so do Ctrl-D and Ctrl-C)
  //text       send a message that starts with "/" """


@dataclass
class Response:
    """What the model said to one context."""

    text: str
    candidates: list[Any] = field(default_factory=list)
    """`mmi.Candidate`s (empty without a reverse model)."""
    chosen: int = 0
    new_tokens: int = 0
    """Tokens generated, all candidates together."""
    seconds: float = 0.0


Responder = Callable[[list[str], int], Response]
"""(context turns, number of leading turns to always keep) -> Response."""


@dataclass
class ChatReply:
    """The outcome of one input line."""

    text: str | None = None
    """The bot's reply (stdout), or None when the line was a command or empty."""
    notes: list[str] = field(default_factory=list)
    """Messages for the user (stderr)."""
    quit: bool = False


def now() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


class Transcript:
    """An append-only JSONL transcript, flushed after every event."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file: IO[str] = self.path.open("a", encoding="utf-8")
        if not _ends_a_line(self.path):  # a chat killed mid-write: never append onto it
            self._file.write("\n")
            self._file.flush()

    def write(self, event: str, **fields: Any) -> None:
        from convcli.outputs import named_os_errors

        record = {"event": event, "time": now(), **fields}
        with named_os_errors(self.path):  # a full disk names the transcript
            self._file.write(json.dumps(record, ensure_ascii=False) + "\n")
            self._file.flush()

    def close(self) -> None:
        self._file.close()


def _ends_a_line(path: Path) -> bool:
    """Whether the file is empty or ends with a newline."""
    with path.open("rb") as handle:
        if handle.seek(0, 2) == 0:
            return True
        handle.seek(-1, 2)
        return handle.read(1) == b"\n"


@dataclass
class TranscriptState:
    """What a transcript says about the conversation to resume."""

    opening: list[str]
    history: list[str]
    start: dict[str, Any]
    cut_lines: list[int] = field(default_factory=list)
    """Lines left half-written by a chat that was killed (ignored)."""


def load_transcript(path: str | Path) -> TranscriptState:
    """The opening turns and history of the last conversation in a transcript.

    A line cut short by a killed chat (the last line, or one followed by the next chat's
    "start" or "resume") is ignored and listed in `cut_lines`; any other bad line is an
    error naming the line.
    """
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8-sig").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        why = exc.strerror if isinstance(exc, OSError) else f"not UTF-8 ({exc.reason})"
        raise InputError(f"cannot read transcript: {why or exc}", path=str(path)) from exc
    state = TranscriptState(opening=[], history=[], start={})
    cut: list[int] = []
    for number, text in enumerate(lines, 1):
        if not text.strip():
            continue
        try:
            record = json.loads(text)
            if not isinstance(record, dict):
                raise ValueError("not a JSON object")
        except ValueError as exc:
            if _restarts_after(lines, number):
                cut.append(number)
                continue
            raise InputError(f"not a transcript line: {exc}", path=str(path), line=number) from None
        event = record.get("event")
        if event == "start":
            state = TranscriptState(list(record.get("context") or []), [], record)
        elif event == "resume" and "context" in record:
            state.opening = list(record["context"] or [])  # a resume may set a new persona
        elif event == "reset":
            state.history = []
        elif event == "turn":
            user, bot = record.get("user"), record.get("bot")
            if not isinstance(user, str) or not isinstance(bot, str):
                raise InputError(
                    "a turn needs 'user' and 'bot' strings", path=str(path), line=number
                )
            state.history += [user, bot] if bot else [user]  # as ChatSession keeps it
    state.cut_lines = cut
    return state


def _restarts_after(lines: list[str], number: int) -> bool:
    """Whether line `number` (1-based) was the last a killed chat wrote: nothing follows
    it, or the next chat's first record ("start" or "resume")."""
    following = next((t for t in lines[number:] if t.strip()), None)
    if following is None:
        return True
    try:
        record = json.loads(following)
    except ValueError:
        return False
    return isinstance(record, dict) and record.get("event") in ("start", "resume")


@dataclass
class Start:
    """What a chat starts from: its opening turns, and the history of a resumed one."""

    opening: list[str]
    history: list[str]
    resumed: bool
    """Whether it continues a transcript (False for a new conversation)."""
    notes: list[str] = field(default_factory=list)


def start_conversation(
    opening: list[str] | None, transcript: str | Path | None = None, resume: bool = False
) -> Start:
    """The opening and history to chat from: a given `opening` wins over a resumed
    transcript's own; resuming a transcript that does not exist yet starts a new one."""
    from convcli.errors import UsageError

    if resume and transcript is None:
        raise UsageError(
            "`resume_transcript` needs `transcript` FILE", param=("resume_transcript", "transcript")
        )
    if not resume or transcript is None:
        return Start(list(opening or []), [], False)
    if not Path(transcript).is_file():
        note = f"{transcript} does not exist yet: starting a new conversation"
        return Start(list(opening or []), [], False, [note])
    state = load_transcript(transcript)
    start_opening = opening if opening is not None else state.opening
    notes = [
        f"{transcript}:{line}: ignored a line cut short (a chat killed while writing it)"
        for line in state.cut_lines
    ]
    notes.append(f"resuming {transcript}: {len(state.history) // 2} turn(s)")
    return Start(list(start_opening or []), state.history, True, notes)


def check_opening(model: Any, opening: list[str], budget: int) -> None:
    """Refuse opening turns that leave no room for a message in the context budget."""
    from convcli.errors import UsageError

    tokens = sum(len(t) + 1 for t in model.tokenizer.encode_turns(opening)) + 1
    if opening and tokens + 8 > budget:
        raise UsageError(
            f"`context` takes {tokens} tokens, leaving no room for the conversation within "
            f"the {budget} tokens a model input may hold here",
            param="context",
        )


def one_line(text: str) -> str:
    """A reply on one output line: newlines become spaces."""
    return " ".join(text.splitlines()) if ("\n" in text or "\r" in text) else text


def format_candidates(response: Response | None) -> list[str]:
    if response is None or not response.candidates:
        return ["(no candidates: they exist only with a reverse model, after a turn)"]
    lines = ["candidates (MMI score, * = chosen):"]
    for i, cand in enumerate(response.candidates):
        mark = "*" if i == response.chosen else " "
        # A reply sampled several times is listed once, with how many times.
        times = f" (x{cand.count})" if cand.count > 1 else ""
        lines.append(f" {mark} {cand.score:8.3f}  {one_line(cand.text) or '(empty)'}{times}")
    return lines


class ChatSession:
    """The state of one chat: opening turns (always kept), history, last response."""

    def __init__(
        self,
        respond: Responder,
        *,
        opening: Sequence[str] = (),
        history: Sequence[str] = (),
        transcript: Transcript | None = None,
        show_candidates: bool = False,
        verbose: bool = False,
    ) -> None:
        self.respond = respond
        self.opening = list(opening)
        self.history = list(history)
        self.transcript = transcript
        self.show_candidates = show_candidates
        self.verbose = verbose
        self.last: Response | None = None
        self.turns = 0

    def handle(self, line: str) -> ChatReply:
        """React to one line typed by the user."""
        message = line.strip()
        if not message:
            return ChatReply()
        if message.startswith("//"):
            message = message[1:]
        elif message.startswith("/"):
            return self.command(message)
        return self.say(message)

    def command(self, message: str) -> ChatReply:
        name = message.split()[0].lower()
        if name in ("/quit", "/exit"):
            return ChatReply(quit=True)
        if name == "/reset":
            self.history = []
            self.last = None
            if self.transcript:
                self.transcript.write("reset")
            return ChatReply(notes=["(new conversation)"])
        if name == "/candidates":
            return ChatReply(notes=format_candidates(self.last))
        if name == "/help":
            return ChatReply(notes=[HELP])
        return ChatReply(notes=[f"unknown command {name} (try /help)"])

    def say(self, message: str) -> ChatReply:
        context = [*self.opening, *self.history, message]
        response = self.respond(context, len(self.opening))
        # An empty reply would put two seps in a row into the next context, a layout the
        # model never saw in training; the user's message stays.
        self.history += [message, response.text] if response.text else [message]
        self.last = response
        self.turns += 1
        if self.transcript:
            extra = {}
            if response.candidates:
                extra["candidates"] = [c.to_dict() for c in response.candidates]
            self.transcript.write("turn", user=message, bot=response.text, **extra)
        notes = format_candidates(response) if self.show_candidates and response.candidates else []
        if self.verbose:
            rate = response.new_tokens / response.seconds if response.seconds > 0 else 0.0
            notes.append(
                f"turn {self.turns}: {response.new_tokens} tokens in {response.seconds:.2f} s "
                f"({rate:.1f} tokens/s)"
            )
        return ChatReply(text=response.text, notes=notes)


def make_responder(
    model: Any,
    reranker: Any = None,
    *,
    max_history_tokens: int | None = None,
    **hf_kwargs: Any,
) -> Responder:
    """A `Responder` from a `ConversationModel`, reranked by an `MMIReranker` if given.

    `hf_kwargs` are the generation options (sampling, max_new_tokens, ...).
    """

    def respond(context: list[str], keep_first: int) -> Response:
        started = time.perf_counter()
        options = {"max_context_tokens": max_history_tokens, "keep_first_turns": keep_first}
        if reranker is not None:
            result = reranker.respond(context, **options, **hf_kwargs)
            return Response(
                text=result.response,
                candidates=result.candidates,
                chosen=result.chosen,
                new_tokens=result.new_tokens,
                seconds=time.perf_counter() - started,
            )
        out = model.generate(context, return_token_ids=True, **options, **hf_kwargs)
        return Response(
            text=out.text,
            new_tokens=len(out.token_ids[0]),
            seconds=time.perf_counter() - started,
        )

    return respond
