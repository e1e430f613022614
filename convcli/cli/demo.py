"""`convcli demo`: a thin face on `convcli.apps.demo.run_demo`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convcli.apps.demo import DemoSettings, Exchange, Finished, Step, StepDone
from convcli.cli.common import info, progress_mode
from convcli.cli.options import QuietOption

DEFAULTS = DemoSettings()


def demo(
    output: Annotated[Path, typer.Option("--output", "-o", help="Where to put everything.")] = (
        DEFAULTS.output
    ),
    fresh: Annotated[bool, typer.Option("--fresh", help="Start over; reuse nothing.")] = False,
    steps: Annotated[int, typer.Option(min=1, help="Training steps per model.")] = DEFAULTS.steps,
    seed: Annotated[int, typer.Option(help="Seed of training and sampling.")] = DEFAULTS.seed,
    num_candidates: Annotated[
        int, typer.Option(min=1, help="MMI candidates per reply.")
    ] = DEFAULTS.num_candidates,
    data: Annotated[
        Path | None,
        typer.Option(
            help="Folder with dialogues.jsonl and contexts.jsonl (default: the bundled sample).",
            show_default=False,
        ),
    ] = DEFAULTS.data,
    device: Annotated[str | None, typer.Option(help="Device for the chat.")] = None,
    quiet: QuietOption = False,
) -> None:
    """Run the whole pipeline on the bundled sample data: prepare, train, reverse, MMI chat.

    Takes one to two minutes on two CPU cores and downloads nothing. Each step
    prints the convcli command that does the same, and a rerun reuses finished
    steps (use --fresh to start over).

    \b
    Example:
      convcli demo --output runs/demo
    """
    from convcli.apps.demo import run_demo

    settings = DemoSettings(
        output=output, data=data, steps=steps, seed=seed, num_candidates=num_candidates,
        fresh=fresh, device=device, progress=progress_mode(quiet),
    )  # fmt: skip
    for event in run_demo(settings):
        if isinstance(event, Step):
            reused = " (done already: reusing it)" if event.reused else ""
            info(f"\n[{event.number}/4] {event.title}{reused}\n  $ {event.command}")
        elif isinstance(event, StepDone):
            info(f"  {event.summary}")
        elif isinstance(event, Exchange):
            for i, turn in enumerate(event.context):
                speaker = "you" if (len(event.context) - i) % 2 else "bot"
                typer.echo(f"  {speaker}> {turn}")
            typer.echo(f"  bot> {event.reply}")
            if event.expected:
                typer.echo(f"       (the sample data says: {event.expected})")
            typer.echo("")
        elif isinstance(event, Finished):
            if event.expected:
                info(f"{event.matched} of {event.expected} replies match the sample data exactly")
            info(f"done. Chat yourself: {event.chat_command}")
