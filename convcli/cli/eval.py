"""`convcli eval`: a thin face on `convcli.evaluation`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import Annotated, Any

import typer

from convcli.cli.options import (
    Device,
    MaxNewTokens,
    MMIArgmax,
    MMITemperature,
    NumCandidates,
    ReverseModel,
    Seed,
    load_models,
)
from convcli.errors import UsageError


class TrainOn(str, Enum):
    responses = "responses"
    all = "all"
    weights = "weights"


def evaluate(
    model: Annotated[Path, typer.Argument(help="The model folder to evaluate.")],
    data: Annotated[
        Path | None,
        typer.Option("--data", "-d", help="A shard directory: report loss and perplexity."),
    ] = None,
    split: Annotated[str, typer.Option(help="The shard split to score.")] = "valid",
    train_on: Annotated[
        TrainOn, typer.Option(help="Which tokens count, as in `convcli train --train-on`.")
    ] = TrainOn.responses,
    batch_tokens: Annotated[int, typer.Option(min=1, help="Tokens per batch (loss).")] = 4096,
    input: Annotated[
        Path | None,
        typer.Option(
            "--input",
            "-i",
            help="JSONL contexts to answer: arrays of turns or objects with 'turns'.",
        ),
    ] = None,
    references: Annotated[
        Path | None,
        typer.Option(
            help="JSONL references, one per context (default: a 'reference' or 'expected' key, "
            "else each line's last turn)."
        ),
    ] = None,
    reverse_model: ReverseModel = None,
    num_candidates: NumCandidates = 8,
    mmi_temperature: MMITemperature = 0.5,
    mmi_argmax: MMIArgmax = False,
    max_new_tokens: MaxNewTokens = None,
    batch_size: Annotated[int, typer.Option(min=1, help="Contexts per generate call.")] = 16,
    seed: Seed = 0,
    device: Device = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate a model: loss/perplexity on shards, or response metrics on contexts.

    [b]Examples[/b]

      convcli eval runs/demo/forward/final --data runs/demo/shards
      convcli eval runs/demo/forward/final --input convcli/apps/demo_data/contexts.jsonl \\
          --reverse-model runs/demo/reverse/final --json

    Response metrics: distinct-1/2 (variety), unigram F1 against the references, and
    average length in words; with --reverse-model, plain sampling and MMI side by side.
    """
    from convcli.evaluation import evaluate_loss, evaluate_responses, read_samples

    if data is None and input is None:
        raise UsageError("give --data SHARDS (loss) and/or --input CONTEXTS.jsonl (responses)")
    if references is not None and input is None:
        raise UsageError("--references needs --input")
    samples = read_samples(input, references) if input is not None else None  # fail early
    forward, reranker = load_models(
        model, reverse_model, device=device, num_candidates=num_candidates,
        mmi_temperature=mmi_temperature, mmi_argmax=mmi_argmax, mmi_source="last",
    )  # fmt: skip
    result: dict[str, Any] = {"model": str(model)}
    if data is not None:
        loss = evaluate_loss(
            forward, data, split=split, train_on=train_on.value, batch_tokens=batch_tokens
        )
        result["loss"] = loss.__dict__
        if not as_json:
            typer.echo(
                f"{data} {split}: loss {loss.loss:.4f}, perplexity {loss.perplexity:.2f} "
                f"over {loss.tokens:,} tokens of {loss.examples:,} examples ({loss.train_on})"
            )
    if samples is not None:
        generate_kwargs = {"max_new_tokens": max_new_tokens} if max_new_tokens else {}
        reports = evaluate_responses(
            forward, samples, reranker=reranker, batch_size=batch_size, seed=seed,
            **generate_kwargs,
        )  # fmt: skip
        result["responses"] = [r.__dict__ for r in reports]
        if not as_json:
            for r in reports:
                m = r.metrics
                typer.echo(
                    f"{r.system:>8}: F1 {m['f1']:.3f}  distinct-1 {m['distinct_1']:.3f}  "
                    f"distinct-2 {m['distinct_2']:.3f}  avg length {m['avg_length']:.1f} words  "
                    f"({r.samples} contexts)"
                )
    if as_json:
        typer.echo(json.dumps(result, ensure_ascii=False))
