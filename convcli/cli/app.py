"""`convcli`: the Typer app. Command modules stay light: torch loads inside commands."""

from __future__ import annotations

from typing import Annotated

import typer

from convcli import __version__
from convcli.cli.chat import chat
from convcli.cli.common import friendly_errors
from convcli.cli.convert import convert
from convcli.cli.demo import demo
from convcli.cli.eval import evaluate
from convcli.cli.generate import generate
from convcli.cli.prepare import prepare
from convcli.cli.serve import serve
from convcli.cli.train import train

app = typer.Typer(
    name="convcli",
    help="Train and talk to GPT-2-style conversation models.",
    no_args_is_help=True,
    context_settings={"help_option_names": ["-h", "--help"]},
    rich_markup_mode=None,
    pretty_exceptions_enable=False,
)

# One line each in `convcli --help`: the first line of each command's docstring.
COMMANDS = {
    "prepare": prepare,
    "train": train,
    "convert": convert,
    "generate": generate,
    "chat": chat,
    "eval": evaluate,
    "demo": demo,
    "serve": serve,
}
for _name, _command in COMMANDS.items():
    app.command(_name)(friendly_errors(_command))


def _version(value: bool) -> None:
    if value:
        typer.echo(f"convcli {__version__}")
        raise typer.Exit()


@app.callback()
def _root(
    version: Annotated[
        bool,
        typer.Option(
            "--version", "-V", callback=_version, is_eager=True, help="Print the version and exit."
        ),
    ] = False,
) -> None:
    """Train and talk to GPT-2-style conversation models.

    Prepare corpora into shards, fine-tune with PyTorch Lightning, convert DialoGPT
    checkpoints, and generate or chat (with MMI reranking by a reverse model).
    """


def main() -> None:
    app()
