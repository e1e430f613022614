"""`--help` of every command at 80 columns: option names whole, examples copyable."""

from __future__ import annotations

import re
import shlex

import pytest
import typer
from typer.testing import CliRunner

from convcli.cli.app import COMMANDS, app

runner = CliRunner()


def help_at_80(*args: str) -> str:
    result = runner.invoke(app, [*args, "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert result.exit_code == 0, result.output
    return result.output


def options_of(name: str) -> dict[str, object]:
    command = typer.main.get_command(app).commands[name]  # type: ignore[attr-defined]
    return {opt: p for p in command.params for opt in (*p.opts, *p.secondary_opts)}


def examples(text: str) -> list[str]:
    """The example commands of a help text, with `\\` continuation lines joined."""
    joined = re.sub(r"\\\n\s*", "", text)
    return [line.strip() for line in joined.splitlines() if line.strip().startswith("convcli ")]


def test_the_app_help_fits():
    text = help_at_80()
    assert max(map(len, text.splitlines())) <= 80
    for name in COMMANDS:
        assert re.search(rf"^\s+{name}\s", text, re.M), name


@pytest.mark.parametrize("name", list(COMMANDS))
def test_help_fits_80_columns_with_every_option_whole(name):
    text = help_at_80(name)
    lines = text.splitlines()
    assert max(map(len, lines)) <= 80, [line for line in lines if len(line) > 80]
    assert "…" not in text and "<bool>" not in text
    for opt in options_of(name):
        # whole: not cut, and not glued to the next word
        assert re.search(rf"(^|[\s,/]){re.escape(opt)}([\s,/=]|$)", text, re.M), opt


@pytest.mark.parametrize("name", list(COMMANDS))
def test_examples_are_whole_commands_with_known_options(name):
    found = examples(help_at_80(name))
    assert found, f"{name} --help shows no example"
    for example in found:
        words = shlex.split(example)  # quotes balanced: it pastes into a shell
        assert words[:2] == ["convcli", name] or words[1] in COMMANDS, example
        known = options_of(words[1])
        flags = [w.split("=")[0] for w in words[2:] if w.startswith("-") and w != "-"]
        assert [f for f in flags if f not in known] == [], example


def test_dash_o_is_the_output_everywhere():
    having = {name for name in COMMANDS if "-o" in options_of(name)}
    assert {"prepare", "train", "convert", "generate", "eval", "demo"} <= having
    for name in having:
        assert options_of(name)["-o"].name == "output", name  # type: ignore[attr-defined]
