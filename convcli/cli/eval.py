"""`convcli eval`: a thin face on `convcli.evaluation`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated, Any

import typer

from convcli.cli.common import info
from convcli.cli.options import settings_options
from convcli.evaluation import EVAL_SAMPLING, EvalSettings
from convcli.inference.settings import MMISettings, RuntimeSettings, SamplingSettings


@settings_options(
    config="eval",
    settings=EvalSettings,
    mmi=MMISettings,
    sampling=EVAL_SAMPLING,
    runtime=RuntimeSettings,
    hide=("num_return_sequences", "num_beams"),
)
def evaluate(
    model: Annotated[Path, typer.Argument(help="The model folder to evaluate.")],
    settings: EvalSettings = EvalSettings(),
    mmi: MMISettings = MMISettings(),
    sampling: SamplingSettings = EVAL_SAMPLING,
    runtime: RuntimeSettings = RuntimeSettings(),
    as_json: Annotated[bool, typer.Option("--json", help="Print one JSON object.")] = False,
) -> None:
    """Evaluate a model: loss/perplexity on shards, or response metrics on contexts.

    Response metrics: distinct-1/2 (variety), unigram F1 against the references, and
    average length in words; with --reverse-model, plain sampling and MMI side by side.

    \b
    Examples:
      convcli eval runs/demo/forward/final --data runs/demo/shards
      convcli eval runs/demo/forward/final \\
          --input convcli/apps/demo_data/contexts.jsonl \\
          --reverse-model runs/demo/reverse/final --json
    """
    from convcli.evaluation import evaluate_loss, evaluate_responses, read_samples, save_report
    from convcli.inference.loading import load_models

    s = settings
    s.check()
    samples = read_samples(s.input, s.references) if s.input is not None else None  # fail early
    forward, reranker, notes = load_models(model, mmi, runtime)
    for note in notes:
        info(f"warning: {note}")
    result: dict[str, Any] = {"model": str(model)}
    if s.data is not None:
        loss = evaluate_loss(
            forward, s.data, split=s.split, train_on=s.train_on, batch_tokens=s.batch_tokens
        )
        result["loss"] = loss.__dict__
        if not as_json:
            typer.echo(
                f"{s.data} {s.split}: loss {loss.loss:.4f}, perplexity {loss.perplexity:.2f} "
                f"over {loss.tokens:,} tokens of {loss.examples:,} examples ({loss.train_on})"
            )
    if samples is not None:
        reports = evaluate_responses(
            forward, samples, reranker=reranker, batch_size=s.batch_size, seed=sampling.seed,
            **sampling.generate_kwargs(),
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
    if s.output is not None:
        config = save_report(s.output, result, s, mmi, sampling, runtime)
        info(f"report: {s.output}; settings: {config}")
