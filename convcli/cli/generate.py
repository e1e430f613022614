"""`convcli generate`: the next turn of a conversation, or of every context in a JSONL file."""

from __future__ import annotations

import contextlib
import io
import json
import sys
import time
from pathlib import Path
from typing import Annotated, Any

import typer

from convcli.cli.common import StageBars, info, progress_mode
from convcli.cli.options import ExtraOption, QuietOption, extra_options, settings_options
from convcli.errors import UsageError
from convcli.inference.settings import (
    BatchSettings,
    EngineSettings,
    MMISettings,
    SamplingSettings,
)


@settings_options(
    sampling=SamplingSettings, mmi=MMISettings, batch=BatchSettings, runtime=EngineSettings
)
def generate(
    model: Annotated[
        Path, typer.Argument(help="A model folder (from train or convert, or a GPT-2 folder).")
    ],
    turns: Annotated[
        list[str] | None, typer.Argument(help="The conversation so far, oldest turn first.")
    ] = None,
    sampling: SamplingSettings = SamplingSettings(),
    option: ExtraOption = None,
    mmi: MMISettings = MMISettings(),
    json_output: Annotated[
        bool,
        typer.Option(
            "--json", help='Print one JSON object: {"context", "responses", "candidates"}.'
        ),
    ] = False,
    batch: BatchSettings = BatchSettings(),
    runtime: EngineSettings = EngineSettings(),
    quiet: QuietOption = False,
) -> None:
    """Generate the next turn of a conversation (with optional MMI reranking).

    Prints the response on stdout and nothing else, so it pipes. Every transformers
    generate option works: common ones as flags, others as --option KEY=VALUE.

    \b
    Examples:
      convcli generate my-model "Hello" "Hi, how are you?"
      convcli generate my-model "Do you like tea?" --do-sample --top-p 0.9 \\
          --seed 1 -n 3
      convcli generate my-model "Hello" --reverse-model my-reverse \\
          --num-candidates 8 --json
      convcli generate my-model --input contexts.jsonl --output answers.jsonl \\
          --batch-size 16
    """
    input, output = batch.input, batch.output
    if input is not None and turns:
        raise UsageError("give turns on the command line or --input FILE, not both")
    if input is None and not turns:
        raise UsageError(
            'give the conversation as arguments ("turn 1" "turn 2" ...) or --input FILE'
        )
    if output is not None and input is None:
        raise UsageError("--output goes with --input (single answers print on stdout)")
    if mmi.reverse_model is not None and sampling.num_return_sequences not in (None, 1):
        raise UsageError(
            "with --reverse-model the reply is one chosen candidate: use --num-candidates"
        )
    options = {**sampling.generate_kwargs(), **extra_options(option)}
    if mmi.reverse_model is not None:
        options.pop("num_return_sequences", None)
    with contextlib.ExitStack() as held:
        if output is not None:  # before any work: never an input, never replaced silently
            from convcli.outputs import check_output, hold_output

            held.enter_context(hold_output(output))  # a second generate on it fails at once
            inputs = [input] if input is not None and str(input) != "-" else []
            check_output(output, "generate", overwrite=batch.overwrite, inputs=inputs, kind="file")
        _generate(model, turns, sampling, options, mmi, json_output, batch, runtime, quiet)


def _generate(
    model: Path,
    turns: list[str] | None,
    sampling: SamplingSettings,
    options: dict[str, Any],
    mmi: MMISettings,
    json_output: bool,
    batch: BatchSettings,
    runtime: EngineSettings,
    quiet: bool,
) -> None:
    from convcli.inference.loading import load_models

    input, output = batch.input, batch.output
    counts = None
    if input is not None:
        # Read (and, by default, validate) every line before the model loads.
        counts, items = _read_input(input, strict=batch.on_error == "strict")
    forward, reranker, notes = load_models(model, mmi, runtime, report=None if quiet else info)
    for note in notes:
        info(f"warning: {note}")

    def answer(contexts: list[list[str]]) -> list[dict[str, Any]]:
        if reranker is not None:
            return [
                {"responses": [r.response], "candidates": [c.to_dict() for c in r.candidates]}
                for r in reranker.respond_batch(contexts, **options)
            ]
        result = forward.generate(contexts, **options)
        return [{"responses": group} for group in result.per_context()]

    if sampling.seed is not None:
        forward.reseed(sampling.seed)
    if counts is None:
        (record,) = answer([list(turns or [])])
        if json_output:
            typer.echo(json.dumps({"context": list(turns or []), **record}, ensure_ascii=False))
        else:
            for text in record["responses"]:
                typer.echo(" ".join(text.splitlines()))
        return
    _batch_mode(
        items,
        counts,
        output,
        answer,
        batch_size=batch.batch_size,
        overwrite=batch.overwrite,
        quiet=quiet,
    )


def _read_input(input: Path, *, strict: bool) -> tuple[Any, list[Any]]:
    from convcli.inference.batch import BatchCounts, read_items

    counts = BatchCounts()
    name = "<stdin>" if str(input) == "-" else str(input)
    try:  # utf-8-sig: a byte order mark (Windows editors) is read as nothing, as prepare does
        source = (
            io.TextIOWrapper(sys.stdin.buffer, encoding="utf-8-sig")
            if str(input) == "-"
            else input.open(encoding="utf-8-sig")
        )
    except OSError as exc:
        raise UsageError(f"--input: cannot read {input}: {exc.strerror or exc}") from None
    with source:
        items = list(read_items(source, path=name, strict=strict, counts=counts))
    for reason in counts.bad:
        info(f"skipped {reason}")
    return counts, items


def _batch_mode(
    items: list[Any],
    counts: Any,
    output: Path | None,
    answer: Any,
    *,
    batch_size: int,
    overwrite: bool,
    quiet: bool,
) -> None:
    from convcli.inference.batch import run_batches
    from convcli.outputs import atomic_file

    started = time.perf_counter()
    # The answers file appears whole when all is written (a kill or a full disk leaves the
    # previous one, or none).
    target: contextlib.AbstractContextManager[Any] = (
        contextlib.nullcontext(sys.stdout) if output is None else atomic_file(output, overwrite)
    )
    done = 0
    with target as out, StageBars(mode=progress_mode(quiet), unit="context") as bars:

        def progress(n: int) -> None:
            nonlocal done
            done += n
            bars("generate", done, len(items))

        run_batches(items, answer, out, batch_size=batch_size, counts=counts, progress=progress)
    where = f" -> {output}" if output is not None else ""
    info(
        f"generate: read {counts.read} context(s), wrote {counts.written}, skipped "
        f"{counts.skipped} bad line(s){where} in {time.perf_counter() - started:.1f} s"
    )
