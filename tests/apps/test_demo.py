from __future__ import annotations

import importlib.util
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from contextlib import ExitStack
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from convcli.apps.demo import DemoSettings, _command, _data_files, _train_settings, run_demo
from convcli.cli.app import app
from convcli.errors import ConvcliError
from convcli.settings import to_dict
from tests.conftest import REPO

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


def source_copy(dest: Path) -> Path:
    """The working tree as git sees it (tracked and new files, nothing ignored), so a file
    that is only on this disk, or only in the index, cannot make the build pass."""
    listed = subprocess.run(
        ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
        cwd=REPO, capture_output=True, text=True, check=True,
    ).stdout.split("\0")  # fmt: skip
    for name in filter(None, listed):
        if (REPO / name).is_file():  # a deleted file is still listed until it is committed
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / name, dest / name)
    return dest


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """convcli built as a wheel from a copy of the working tree (offline, no isolation)."""
    if importlib.util.find_spec("setuptools") is None:
        pytest.skip("setuptools is not installed (pip install -e '.[dev]' brings it)")
    tmp = tmp_path_factory.mktemp("wheel")
    source = source_copy(tmp / "source")
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", str(source), "--no-deps", "--no-build-isolation",
         "--no-index", "--quiet", "--wheel-dir", str(tmp / "dist")],
        capture_output=True, text=True,
    )  # fmt: skip
    assert built.returncode == 0, built.stderr[-2000:]
    (path,) = (tmp / "dist").glob("convcli-*.whl")
    return path


def test_the_wheel_ships_the_demo_data(wheel):
    names = set(zipfile.ZipFile(wheel).namelist())
    assert {"convcli/apps/demo_data/dialogues.jsonl", "convcli/apps/demo_data/contexts.jsonl"} <= (
        names
    )
    assert not any(name.startswith(("tests/", "sample_data/")) for name in names)


def test_the_demo_reads_the_bundled_data_by_default():
    bundled = REPO / "convcli" / "apps" / "demo_data"
    with ExitStack() as stack:
        assert _data_files(DemoSettings(), stack) == (
            bundled / "dialogues.jsonl",
            bundled / "contexts.jsonl",
        )


def test_a_data_folder_without_the_corpus_names_the_missing_file(tmp_path):
    with pytest.raises(ConvcliError, match=r"dialogues.jsonl not found \(data needs"):
        next(run_demo(DemoSettings(output=tmp_path / "demo", data=tmp_path)))
    assert not (tmp_path / "demo").exists()


def test_the_core_never_imports_the_demo():
    """The demo is an application over the core: only the CLI may import it."""
    for path in (REPO / "convcli").rglob("*.py"):
        inside = path.relative_to(REPO / "convcli").parts[0]
        if inside not in ("apps", "cli"):
            assert "convcli.apps" not in path.read_text(encoding="utf-8"), path


def fresh_venv(where: Path, wheel: Path) -> Path:
    """A new virtualenv with only `wheel` installed in it. The packages convcli needs (torch
    & co.) come from this interpreter's site-packages, added by a .pth file: its own .pth
    files are not run, so an editable convcli installed there stays invisible."""
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(where)], check=True)
    python = where / "bin" / "python"
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps",
         "--no-index", "--quiet", str(wheel)],
        check=True,
    )  # fmt: skip
    ask = "import sysconfig; print(sysconfig.get_path('purelib'))"
    site = subprocess.run([python, "-c", ask], capture_output=True, text=True, check=True)
    ours = {sysconfig.get_path("purelib"), sysconfig.get_path("platlib")}
    Path(site.stdout.strip(), "convcli-test-deps.pth").write_text("\n".join(sorted(ours)) + "\n")
    return where


@pytest.mark.slow
def test_readme_demo_runs_from_an_installed_wheel(tmp_path, wheel):
    """`pip install convcli` then the README's `convcli demo`, from a directory that is not
    the source tree: everything the demo needs must be inside the wheel."""
    venv = fresh_venv(tmp_path / "venv", wheel)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME")}
    env |= {"PATH": f"{venv / 'bin'}{os.pathsep}{env.get('PATH', '')}", "VIRTUAL_ENV": str(venv)}

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            args, cwd=elsewhere, env=env, capture_output=True, text=True, timeout=900
        )

    where = run("python", "-c", "import convcli; print(convcli.__file__)")
    assert where.returncode == 0, where.stderr
    installed = Path(where.stdout.strip())
    assert installed.is_relative_to(venv) and not installed.is_relative_to(REPO), installed

    args = readme_demo_command()
    first = run("convcli", "demo", *args)
    assert first.returncode == 0, first.stderr[-2000:]
    # Step 1 prints the corpus it prepares: the copy inside the installed package.
    bundled = installed.parent / "apps" / "demo_data"
    assert f"convcli prepare {bundled / 'dialogues.jsonl'} " in first.stderr, first.stderr
    out = elsewhere / "runs" / "demo"
    for model in ("forward", "reverse"):
        assert (out / model / "final" / "model.safetensors").is_file()
    assert "convcli train --data" in first.stderr and "--reverse" in first.stderr
    # The models learnt the sample data: most held-out contexts (combinations no training
    # dialogue contains) get exactly the reply the sample data implies.
    pairs = replies_and_expected(first.stdout)
    contexts = (bundled / "contexts.jsonl").read_text(encoding="utf-8")
    assert len(pairs) == len(contexts.splitlines()), first.stdout
    right = sum(reply == expected for reply, expected in pairs)
    assert right >= len(pairs) / 2, first.stdout
    assert f"{right} of {len(pairs)} replies match the sample data exactly" in first.stderr
    rerun = run("convcli", "demo", *args)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert rerun.stderr.count("done already") == 3
