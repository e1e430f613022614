"""`convcli train`: fine-tune or train a conversation model from shards (Lightning)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import given_flags, info
from convcli.errors import UsageError
from convcli.training.settings import TrainSettings

_D = TrainSettings()


def _check_choices(given: dict[str, object]) -> None:
    """One line for a flag outside its choices (values from --config are checked by merge)."""
    import typing

    hints = typing.get_type_hints(TrainSettings)
    for name, value in given.items():
        choices = [a for a in typing.get_args(hints[name]) if isinstance(a, str)]
        if choices and value not in choices:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"{flag}: {value!r} is not one of {', '.join(choices)}")


def train(
    ctx: typer.Context,
    data: Annotated[
        Path | None, typer.Option("--data", "-d", help="Shard directory from `convcli prepare`.")
    ] = _D.data,
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Run directory (final/, best/, ...).")
    ] = _D.output,
    model: Annotated[
        str | None, typer.Option(help="Start from this model folder or hub name.")
    ] = _D.model,
    preset: Annotated[
        str | None, typer.Option(help="Start from random weights: tiny, small or medium.")
    ] = _D.preset,
    token_types: Annotated[
        bool | None,
        typer.Option(
            "--token-types/--no-token-types",
            help="Feed token types (default: as the model folder says; presets: on).",
            show_default=False,
        ),
    ] = _D.token_types,
    train_on: Annotated[
        str, typer.Option(help="Loss tokens: responses, all, weights.")
    ] = _D.train_on,
    reverse: Annotated[
        bool, typer.Option("--reverse", help="Train a reverse (MMI) model.")
    ] = _D.reverse,
    batch_tokens: Annotated[
        int, typer.Option(help="Tokens per batch per device, padding included.")
    ] = _D.batch_tokens,
    batch_size: Annotated[
        int | None, typer.Option(help="Fixed examples per batch instead of --batch-tokens.")
    ] = _D.batch_size,
    learning_rate: Annotated[
        float, typer.Option("--learning-rate", "--lr", help="Peak AdamW learning rate.")
    ] = _D.learning_rate,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = _D.weight_decay,
    warmup_steps: Annotated[int, typer.Option(help="Linear warmup steps.")] = _D.warmup_steps,
    schedule: Annotated[str, typer.Option(help="After warmup: linear, constant.")] = _D.schedule,
    grad_clip: Annotated[float, typer.Option(help="Gradient norm clip (0: off).")] = _D.grad_clip,
    accumulate: Annotated[int, typer.Option(help="Batches per optimizer step.")] = _D.accumulate,
    precision: Annotated[
        str, typer.Option(help="Precision: 32, bf16-mixed, 16-mixed.")
    ] = _D.precision,
    seed: Annotated[int, typer.Option(help="Random seed.")] = _D.seed,
    max_steps: Annotated[int | None, typer.Option(help="Optimizer steps to run.")] = _D.max_steps,
    max_epochs: Annotated[
        int | None, typer.Option(help="Epochs to run (default 1 without --max-steps).")
    ] = _D.max_epochs,
    val_every: Annotated[int, typer.Option(help="Validate every N steps.")] = _D.val_every,
    save_every: Annotated[int, typer.Option(help="Checkpoint every N steps.")] = _D.save_every,
    keep_checkpoints: Annotated[
        int, typer.Option(help="Newest checkpoints to keep.")
    ] = _D.keep_checkpoints,
    resume: Annotated[
        str | None, typer.Option(help="auto (newest checkpoint of --output) or a .ckpt path.")
    ] = _D.resume,
    logger: Annotated[str, typer.Option(help="Metrics logger: csv, tensorboard.")] = _D.logger,
    accelerator: Annotated[str, typer.Option(help="Lightning accelerator.")] = _D.accelerator,
    devices: Annotated[str, typer.Option(help="Lightning devices: auto, 2, 0,1.")] = _D.devices,
    num_nodes: Annotated[int, typer.Option(help="Machines.")] = _D.num_nodes,
    strategy: Annotated[str, typer.Option(help="Lightning strategy: ddp, fsdp...")] = _D.strategy,
    num_workers: Annotated[int, typer.Option(help="DataLoader workers.")] = _D.num_workers,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace a run already in --output.")
    ] = _D.overwrite,
    config: Annotated[
        Path | None, typer.Option("--config", "-c", help="YAML settings (flags override it).")
    ] = None,
    print_config: Annotated[
        bool, typer.Option("--print-config", help="Print the settings as YAML and exit.")
    ] = False,
) -> None:
    """Fine-tune a model (or train one from a preset) on prepared shards.

    Writes RUN_DIR/final/ and RUN_DIR/best/ (Hugging Face folders), checkpoints and logs.

    Examples:

        convcli train -d shards/ --preset tiny -o runs/tiny --max-steps 300

        convcli train --print-config > train.yaml

        convcli train --config train.yaml --resume auto
    """
    from convcli.settings import merge, to_yaml

    values = {k: v for k, v in ctx.params.items() if k not in ("config", "print_config")}
    given = given_flags(ctx, values)
    _check_choices(given)
    settings = merge(TrainSettings, config, given)
    if print_config:
        typer.echo(to_yaml(settings, header="convcli train settings (edit, then --config FILE)"))
        return

    from convcli.training.fit import train as run

    result = run(settings, report=info)
    if not result.is_global_zero:
        return
    val = (
        f"val loss {result.val_loss:.4f} (ppl {result.val_ppl:.2f})"
        if result.val_loss is not None
        else "no validation split"
    )
    best = f", best: {result.best}" if result.best else ""
    info(
        f"trained {result.steps} steps on {result.tokens:,} tokens in {result.seconds:.1f} s; "
        f"{val}; final: {result.final}{best}"
    )
