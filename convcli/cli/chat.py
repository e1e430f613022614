"""`convcli chat`: talk to a model on a terminal or through a pipe, optionally with MMI."""

from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import info, stdin_is_terminal
from convcli.cli.options import ExtraOption, extra_options, settings_options
from convcli.errors import UsageError
from convcli.inference.settings import (
    CHAT_SAMPLING,
    ChatSettings,
    EngineSettings,
    MMISettings,
    SamplingSettings,
)


def read_context_file(path: Path) -> list[str]:
    """Opening turns: one JSON context (an array of turns, `turns`, chat `messages`, ShareGPT
    `conversations`: the readers' own parsing), or plain text with one turn per line."""
    from convcli.data.readers.contexts import parse_context

    try:
        text = path.read_text(encoding="utf-8-sig")  # a byte order mark is read as nothing
    except OSError as exc:
        raise UsageError(f"--context: cannot read {path}: {exc.strerror or exc}") from None
    stripped = text.strip()
    if stripped.startswith(("[", "{")):
        return parse_context(stripped, path=str(path), line=None).turns
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    if interactive:
        try:
            line = input("you> ")
        except EOFError:
            return None
    else:
        line = sys.stdin.readline()
        if line == "":
            return None
    if "\ufffd" in line:
        info("note: bytes that are not UTF-8 in this line were replaced by \ufffd")
    return line.rstrip("\r\n").lstrip("\ufeff")


def _tolerant_stdin() -> None:
    """Bytes that are not UTF-8 on stdin become U+FFFD instead of ending the chat."""
    reconfigure = getattr(sys.stdin, "reconfigure", None)
    if reconfigure is not None:
        with contextlib.suppress(ValueError, io.UnsupportedOperation):
            reconfigure(errors="replace")


@settings_options(
    mmi=MMISettings,
    conversation=ChatSettings,
    sampling=CHAT_SAMPLING,
    runtime=EngineSettings,
    hide=("do_sample", "num_beams", "num_return_sequences"),
)
def chat(
    model: Annotated[
        Path, typer.Argument(help="A model folder (from train or convert, or a GPT-2 folder).")
    ],
    mmi: MMISettings = MMISettings(),
    conversation: ChatSettings = ChatSettings(),
    sampling: SamplingSettings = CHAT_SAMPLING,
    option: ExtraOption = None,
    runtime: EngineSettings = EngineSettings(),
) -> None:
    """Chat with a model; with --reverse-model, replies are reranked by MMI.

    Type a message and press Enter. Commands: /reset, /candidates, /help, /quit.
    /exit, Ctrl-D and Ctrl-C end the chat too.
    With piped stdin, replies go to stdout one per line and nothing else does.

    \b
    Examples:
      convcli chat my-model
      convcli chat my-model --reverse-model my-reverse --show-candidates
      convcli chat my-model --context persona.txt --transcript chat.jsonl
      convcli chat my-model --transcript chat.jsonl --resume-transcript
      printf 'Hello\\n/quit\\n' | convcli chat my-model
    """
    from convcli.inference.chat import (
        ChatSession,
        Transcript,
        check_opening,
        make_responder,
        start_conversation,
    )
    from convcli.inference.loading import load_models

    c = conversation
    opening = read_context_file(c.context) if c.context is not None else None
    start = start_conversation(opening, c.transcript, c.resume_transcript)
    for note in start.notes:
        info(note)
    options = {**sampling.generate_kwargs(), **extra_options(option)}
    forward, reranker, notes = load_models(model, mmi, runtime, report=info)
    for note in notes:
        info(f"warning: {note}")
    # The opening turns must leave room for a message in the context budget.
    _, budget = forward.plan_lengths(options.get("max_new_tokens"))
    if c.max_history_tokens is not None:
        budget = min(budget, c.max_history_tokens)
    check_opening(forward, start.opening, budget)
    if sampling.seed is not None:
        forward.reseed(sampling.seed)

    log = Transcript(c.transcript) if c.transcript is not None else None
    if log is not None:
        if start.resumed:
            log.write("resume", context=start.opening)
        else:
            log.write(
                "start",
                model=str(model),
                reverse_model=str(mmi.reverse_model) if mmi.reverse_model else None,
                context=start.opening,
                seed=sampling.seed,
            )
    session = ChatSession(
        make_responder(forward, reranker, max_history_tokens=c.max_history_tokens, **options),
        opening=start.opening,
        history=start.history,
        transcript=log,
        show_candidates=c.show_candidates,
        verbose=c.verbose,
    )
    interactive = stdin_is_terminal()
    _tolerant_stdin()
    if interactive:
        mode = f"MMI over {mmi.num_candidates} candidates" if reranker else "sampling"
        info(f"chatting with {model} ({mode}); /help for commands, /quit to end")
    try:
        while True:
            line = _read_line(interactive)
            if line is None:
                break
            reply = session.handle(line)
            for note in reply.notes:
                info(note)
            if reply.text is not None:
                text = " ".join(reply.text.splitlines())
                typer.echo(f"bot> {text}" if interactive else text)
            if reply.quit:
                break
    except KeyboardInterrupt:
        if interactive:
            info("")
    finally:
        if log is not None:
            log.close()
    info(
        f"chat ended after {session.turns} turn(s)"
        + (f"; transcript: {c.transcript}" if c.transcript else "")
    )
