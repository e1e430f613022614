from __future__ import annotations

import shlex
import shutil
import subprocess

import pytest
import yaml
from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.demo import DemoSettings, _command, _train_settings, run_demo
from convcli.errors import ConvcliError
from convcli.settings import to_dict
from tests.conftest import REPO, run_cli

runner = CliRunner()


@pytest.mark.parametrize("reverse", [False, True])
def test_the_printed_train_command_means_the_same_settings(reverse, tmp_path):
    settings = _train_settings(DemoSettings(), tmp_path / "shards", tmp_path / "run", reverse)
    command = _command("train", settings)
    result = runner.invoke(app, [*shlex.split(command)[1:], "--print-config"])
    assert result.exit_code == 0, result.stderr
    assert yaml.safe_load(result.stdout) == to_dict(settings)


def test_refuses_a_directory_that_is_not_a_demo(tmp_path):
    (tmp_path / "precious.txt").write_text("keep me")
    with pytest.raises(ConvcliError, match="not a demo directory"):
        next(run_demo(DemoSettings(output=tmp_path, fresh=True)))
    assert (tmp_path / "precious.txt").exists()


def test_refuses_to_reuse_steps_made_with_other_settings(tmp_path):
    out = tmp_path / "demo"
    out.mkdir()
    (out / "demo.json").write_text('{"data": "elsewhere", "steps": 5, "seed": 0}')
    with pytest.raises(ConvcliError, match=r"made with other settings .*steps 5 -> 700"):
        next(run_demo(DemoSettings(output=out)))


def readme_demo_command() -> list[str]:
    """The `convcli demo ...` part of the README's first setup command."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    fenced, in_fence = [], False
    for line in text.splitlines():
        if line.startswith("```"):
            in_fence = not in_fence
        elif in_fence:
            fenced.append(line)
    line = next(line for line in fenced if "convcli demo" in line)
    command = shlex.split(line[line.index("convcli demo") :])
    assert command[:2] == ["convcli", "demo"]
    return command[2:]


EXPECTED = "(the sample data says: "


def replies_and_expected(stdout: str) -> list[tuple[str, str]]:
    """(the bot's reply, the sample data's reply) for each exchange the demo printed."""
    lines = [line.strip() for line in stdout.splitlines()]
    return [
        (lines[i - 1].removeprefix("bot> "), line[len(EXPECTED) : -1])
        for i, line in enumerate(lines)
        if line.startswith(EXPECTED) and lines[i - 1].startswith("bot> ")
    ]


@pytest.mark.slow
def test_readme_demo_runs_on_a_clean_checkout(tmp_path):
    checkout = tmp_path / "convcli"
    subprocess.run(["git", "clone", "-q", str(REPO), str(checkout)], check=True)
    shutil.copy(REPO / "README.md", checkout / "README.md")  # the README under test
    args = readme_demo_command()
    first = run_cli("demo", *args, cwd=checkout, env_repo=checkout)
    assert first.returncode == 0, first.stderr[-2000:]
    out = checkout / "runs" / "demo"
    for model in ("forward", "reverse"):
        assert (out / model / "final" / "model.safetensors").is_file()
    assert "convcli train --data" in first.stderr and "--reverse" in first.stderr
    # The models learnt the sample data: most held-out contexts (combinations no training
    # dialogue contains) get exactly the reply the sample data implies.
    pairs = replies_and_expected(first.stdout)
    contexts = (checkout / "sample_data" / "contexts.jsonl").read_text(encoding="utf-8")
    assert len(pairs) == len(contexts.splitlines()), first.stdout
    right = sum(reply == expected for reply, expected in pairs)
    assert right >= len(pairs) / 2, first.stdout
    assert f"{right} of {len(pairs)} replies match the sample data exactly" in first.stderr
    rerun = run_cli("demo", *args, cwd=checkout, env_repo=checkout)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stderr.count("done already") == 3
