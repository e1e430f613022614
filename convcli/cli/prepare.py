"""`convcli prepare`: dialogue corpora into a shard directory for `train`."""

from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import StageBars, given_flags, info
from convcli.data.prepare_settings import PrepareSettings

_D = PrepareSettings()

# Typer offers choices through enums; the settings keep plain strings.
Format = Enum("Format", {v: v for v in ("auto", "jsonl", "tsv", "text")}, type=str)
LongTurn = Enum("LongTurn", {v: v for v in ("truncate", "skip")}, type=str)
OnError = Enum("OnError", {v: v for v in ("strict", "skip")}, type=str)


def prepare(
    ctx: typer.Context,
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Corpus files or globs: JSONL, DialoGPT TSV or plain text, .gz too.",
            show_default=False,
        ),
    ] = None,
    output: Annotated[
        Path | None,
        typer.Option("--output", "-o", help="Shard directory to write.", show_default=False),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option(help="Tokenizer folder or name (e.g. a model folder).", show_default=False),
    ] = None,
    train_tokenizer: Annotated[
        bool,
        typer.Option(
            "--train-tokenizer", help="Train a byte-level BPE tokenizer on the inputs instead."
        ),
    ] = _D.train_tokenizer,
    vocab_size: Annotated[
        int, typer.Option(help="Vocabulary size for --train-tokenizer.")
    ] = _D.vocab_size,
    format: Annotated[
        Format,
        typer.Option(
            help="Input format (auto: per file, by extension, else by the first line).",
        ),
    ] = Format(_D.format),
    max_length: Annotated[
        int, typer.Option(help="Most tokens per example; longer dialogues are windowed.")
    ] = _D.max_length,
    long_turn: Annotated[
        LongTurn,
        typer.Option(
            help="A turn longer than --max-length: truncate it or skip its dialogue.",
        ),
    ] = LongTurn(_D.long_turn),
    valid_fraction: Annotated[
        float, typer.Option(help="Fraction of dialogues (by hash) for validation.")
    ] = _D.valid_fraction,
    dedupe: Annotated[
        bool,
        typer.Option(
            "--dedupe",
            help="Drop exact duplicate dialogues. Keeps one 16-byte key per distinct dialogue "
            "in memory (about 100 MB per million), so memory grows with the corpus.",
        ),
    ] = _D.dedupe,
    on_error: Annotated[
        OnError,
        typer.Option(
            help="Bad input lines: stop at the first (strict) or skip and count them.",
        ),
    ] = OnError(_D.on_error),
    workers: Annotated[int, typer.Option(help="Tokenizer processes.")] = _D.workers,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace --output if it exists.")
    ] = _D.overwrite,
    config: Annotated[
        Path | None,
        typer.Option(help="YAML file of these options (flags given here win).", show_default=False),
    ] = None,
) -> None:
    """Prepare dialogue corpora into shards for training.

    Tokenizes each dialogue in the conversation layout; windows long ones by whole turns.
    Splits train/valid by a hash of each dialogue (stable across runs).
    Writes memory-mapped shards, manifest.json, prepare.yaml and the tokenizer, atomically.

    Example:

        convcli prepare sample_data/dialogues.tsv -o shards --train-tokenizer --vocab-size 1000
    """
    values = dict(locals())  # first: the options, nothing else
    del values["ctx"], values["config"]
    from convcli.data.prepare import prepare as run

    settings = _merge(ctx, config, values)
    label = {"tokenizer": "training tokenizer"}.get
    with StageBars(
        lambda stage: label(stage, "preparing"),
        unit="B", unit_scale=True, unit_divisor=1024, leave=False,
    ) as bars:  # fmt: skip
        result = run(settings, bars)
    skipped = sum(result.skipped.values())
    reasons = ", ".join(f"{n} {reason}" for reason, n in result.skipped.items())
    split = ", ".join(f"{s} {d['examples']}" for s, d in result.splits.items())
    truncated = f", {result.truncated_turns} turns truncated" if result.truncated_turns else ""
    info(
        f"prepared {result.output}: {result.dialogues_read} dialogues read, "
        f"{result.dialogues_written} written, {skipped} skipped{f' ({reasons})' if reasons else ''}"
        f"{truncated}; {result.examples} examples ({split}), {result.tokens} tokens "
        f"in {result.seconds:.1f}s"
    )


def _merge(ctx: typer.Context, config: Path | None, values: dict) -> PrepareSettings:
    from convcli.settings import merge

    given = {k: v.value if isinstance(v, Enum) else v for k, v in given_flags(ctx, values).items()}
    if "inputs" in given:
        given["inputs"] = list(given["inputs"])
    return merge(PrepareSettings, config, given)
