"""`convcli chat`: talk to a model on a terminal or through a pipe, optionally with MMI."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import info, stdin_is_terminal
from convcli.cli.options import (
    Device,
    ExtraOption,
    MaxNewTokens,
    MinNewTokens,
    MMIArgmax,
    MMISource,
    MMISourceOpt,
    MMITemperature,
    NoRepeatNgram,
    NumCandidates,
    RepetitionPenalty,
    ReverseModel,
    Seed,
    Temperature,
    TopK,
    TopP,
    load_models,
    sampling_options,
)
from convcli.errors import InputError, UsageError


def read_context_file(path: Path) -> list[str]:
    """Opening turns: a JSON array of strings, or plain text with one turn per line."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise UsageError(f"--context: cannot read {path}: {exc.strerror or exc}") from None
    stripped = text.strip()
    if stripped.startswith("["):
        try:
            turns = json.loads(stripped)
        except ValueError as exc:
            raise InputError(f"invalid JSON: {exc}", path=str(path)) from None
        if not isinstance(turns, list) or not all(isinstance(t, str) for t in turns):
            raise InputError("expected a JSON array of turn strings", path=str(path))
        return turns
    return [line.strip() for line in text.splitlines() if line.strip()]


def _read_line(interactive: bool) -> str | None:
    """The next input line, or None at end of input."""
    if interactive:
        try:
            return input("you> ")
        except EOFError:
            return None
    line = sys.stdin.readline()
    return None if line == "" else line.rstrip("\r\n")


def chat(
    model: Annotated[
        Path, typer.Argument(help="A model folder (from train or convert, or a GPT-2 folder).")
    ],
    reverse_model: ReverseModel = None,
    num_candidates: NumCandidates = 8,
    mmi_temperature: MMITemperature = 0.5,
    mmi_argmax: MMIArgmax = False,
    mmi_source: MMISourceOpt = MMISource.last,
    max_history_tokens: Annotated[
        int | None,
        typer.Option(
            "--max-history-tokens",
            min=8,
            help="Keep the history within this many tokens, oldest turns dropped "
            "(default: what fits the model).",
        ),
    ] = None,
    context: Annotated[
        Path | None,
        typer.Option(
            "--context",
            help="Opening turns always kept (persona): a JSON array, or one turn per line.",
        ),
    ] = None,
    show_candidates: Annotated[
        bool,
        typer.Option(
            "--show-candidates", help="Show the MMI candidates and scores every turn (stderr)."
        ),
    ] = False,
    seed: Seed = None,
    transcript: Annotated[
        Path | None,
        typer.Option("--transcript", help="Append every turn to this JSONL file as it happens."),
    ] = None,
    resume_transcript: Annotated[
        bool,
        typer.Option("--resume-transcript", help="Continue the last conversation in --transcript."),
    ] = False,
    verbose: Annotated[
        bool, typer.Option("--verbose", "-v", help="Report time and tokens/s per turn (stderr).")
    ] = False,
    max_new_tokens: MaxNewTokens = None,
    min_new_tokens: MinNewTokens = None,
    temperature: Temperature = None,
    top_k: TopK = 50,
    top_p: TopP = 0.95,
    repetition_penalty: RepetitionPenalty = None,
    no_repeat_ngram_size: NoRepeatNgram = None,
    option: ExtraOption = None,
    device: Device = None,
) -> None:
    """Chat with a model; with --reverse-model, replies are reranked by MMI.

    Type a message and press Enter. Commands: /reset, /candidates, /help, /quit.
    /exit, Ctrl-D and Ctrl-C end the chat too.
    With piped stdin, replies go to stdout one per line and nothing else does.

    Examples:

      convcli chat my-model

      convcli chat my-model --reverse-model my-reverse --num-candidates 8 --show-candidates

      convcli chat my-model --context persona.txt --transcript chat.jsonl --seed 1

      convcli chat my-model --transcript chat.jsonl --resume-transcript

      printf 'Hello\\n/quit\\n' | convcli chat my-model
    """
    from convcli.inference.chat import ChatSession, Transcript, load_transcript, make_responder

    if resume_transcript and transcript is None:
        raise UsageError("--resume-transcript needs --transcript FILE")
    opening = read_context_file(context) if context is not None else None
    history: list[str] = []
    if resume_transcript and transcript is not None:
        if transcript.is_file():
            state = load_transcript(transcript)
            history = state.history
            if opening is None:
                opening = state.opening
            info(f"resuming {transcript}: {len(history) // 2} turn(s)")
        else:
            info(f"{transcript} does not exist yet: starting a new conversation")
            resume_transcript = False
    opening = opening or []

    options = sampling_options(
        max_new_tokens=max_new_tokens,
        min_new_tokens=min_new_tokens,
        do_sample=True,
        temperature=temperature,
        top_k=top_k,
        top_p=top_p,
        repetition_penalty=repetition_penalty,
        no_repeat_ngram_size=no_repeat_ngram_size,
        option=option,
    )
    forward, reranker = load_models(
        model,
        reverse_model,
        device=device,
        num_candidates=num_candidates,
        mmi_temperature=mmi_temperature,
        mmi_argmax=mmi_argmax,
        mmi_source=mmi_source.value,
    )
    # The opening turns must leave room for a message in the context budget.
    _, budget = forward.plan_lengths(options.get("max_new_tokens"))
    if max_history_tokens is not None:
        budget = min(budget, max_history_tokens)
    opening_tokens = sum(len(t) + 1 for t in forward.tokenizer.encode_turns(opening)) + 1
    if opening and opening_tokens + 8 > budget:
        raise UsageError(
            f"--context takes {opening_tokens} tokens, leaving no room for the conversation in "
            f"the {budget}-token context budget"
        )
    if seed is not None:
        import torch

        torch.manual_seed(seed)

    log = Transcript(transcript) if transcript is not None else None
    if log is not None:
        if resume_transcript:
            log.write("resume", context=opening)
        else:
            log.write(
                "start",
                model=str(model),
                reverse_model=str(reverse_model) if reverse_model else None,
                context=opening,
                seed=seed,
            )
    session = ChatSession(
        make_responder(forward, reranker, max_history_tokens=max_history_tokens, **options),
        opening=opening,
        history=history,
        transcript=log,
        show_candidates=show_candidates,
        verbose=verbose,
    )
    interactive = stdin_is_terminal()
    if interactive:
        mode = f"MMI over {num_candidates} candidates" if reranker else "sampling"
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
        + (f"; transcript: {transcript}" if transcript else "")
    )
