"""Outputs: one lock per output, atomic replacement that survives kills, markers that keep
`overwrite` to previous outputs of the same command, OS faults as one line (issue 11)."""

from __future__ import annotations

import errno
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.errors import ConvcliError
from convcli.outputs import MARKER, hold_output, recover_leftovers, write_atomically
from tests.conftest import DIALOGUES, REPO

runner = CliRunner()


def write_jsonl(path: Path) -> Path:
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in DIALOGUES))
    return path


def prepare_args(source: Path, out: Path, tokenizer: Path, *more: str) -> list[str]:
    return ["prepare", str(source), "-o", str(out), "--tokenizer", str(tokenizer),
            "--workers", "1", *more]  # fmt: skip


def python(code: str, **popen: object) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(code)], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, **popen,
    )  # fmt: skip


def folder_bytes(path: Path) -> dict[str, str]:
    return {p.name: p.read_bytes().hex() for p in sorted(path.iterdir()) if p.is_file()}


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir() if p.name != path.name)


# -- item 4: two runs on one output ------------------------------------------------------------


def command_on(command: str, tmp_path: Path, out: Path, tokenizer: Path) -> list[str]:
    """A `command` that would write `out` (its inputs need not be valid: the lock comes
    first)."""
    source = write_jsonl(tmp_path / "d.jsonl")
    return {
        "prepare": prepare_args(source, out, tokenizer),
        "train": ["train", "-d", str(tmp_path), "--preset", "tiny", "-o", str(out)],
        "convert": ["convert", str(tmp_path / "m.pkl"), "-o", str(out)],
        "generate": ["generate", str(tmp_path / "model"), "--input", str(source),
                     "--output", str(out)],
    }[command]  # fmt: skip


@pytest.mark.parametrize("command", ["prepare", "train", "convert", "generate"])
def test_a_second_run_on_a_locked_output_fails_at_once_naming_the_holder(
    tmp_path, tiny_tokenizer_dir, command
):
    out = tmp_path / "out"
    holder = python(
        f"""
        import sys, time
        from convcli.outputs import hold_output
        with hold_output({str(out)!r}):
            print("held", flush=True)
            time.sleep(600)
        """
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
        started = time.monotonic()
        result = runner.invoke(app, command_on(command, tmp_path, out, tiny_tokenizer_dir))
        assert time.monotonic() - started < 60  # it did not wait for the holder (imports aside)
    finally:
        holder.kill()
        holder.wait()
    assert result.exit_code == 1, result.output
    assert result.stderr.strip() == (
        f"error: {out} is in use by another convcli run (pid {holder.pid}); wait for it to "
        "finish or choose another --output"
    )
    assert not out.exists()


def test_a_killed_holder_leaves_no_stale_lock(tmp_path):
    out = tmp_path / "o"
    holder = python(
        f"""
        import time
        from convcli.outputs import hold_output
        with hold_output({str(out)!r}):
            print("held", flush=True)
            time.sleep(60)
        """
    )
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    with hold_output(out):  # the kernel released the dead process's lock
        pass
    assert siblings(out) == []  # and the lock file goes with the last holder


def test_nested_holds_in_one_process_are_fine(tmp_path):
    with hold_output(tmp_path / "o"), hold_output(tmp_path / "o"):
        pass


# -- item 5: the overwrite swap survives a kill ------------------------------------------------


KILLED_WRITE = """
    import os, signal
    from pathlib import Path
    import convcli.outputs as outputs

    out = Path({out!r})
    if {between_renames!r}:  # the fallback where the kernel cannot exchange two folders
        outputs.exchange = lambda a, b: False
        real_rename = os.rename
        def rename(src, dst):
            real_rename(src, dst)
            os.kill(os.getpid(), signal.SIGKILL)  # after setting the old output aside
        outputs.os.rename = rename

    def write(tmp):
        (tmp / "data.txt").write_text("new")
        if not {between_renames!r}:
            os.kill(os.getpid(), signal.SIGKILL)  # mid-write

    outputs.write_atomically(out, write, overwrite=True, command="prepare")
"""


@pytest.mark.parametrize("between_renames", [False, True], ids=["mid-write", "mid-swap"])
def test_a_kill_during_an_overwrite_keeps_the_old_output_and_a_rerun_cleans_up(
    tmp_path, between_renames
):
    out = tmp_path / "out"
    write_atomically(out, lambda tmp: (tmp / "data.txt").write_text("old"), command="prepare")

    killed = python(KILLED_WRITE.format(out=str(out), between_renames=between_renames))
    killed.wait(timeout=60)

    assert killed.returncode == -signal.SIGKILL
    leftovers = [n for n in siblings(out) if n != ".out.lock"]  # a dead holder's: harmless
    assert leftovers and all(".out.tmp-" in n or ".out.old-" in n for n in leftovers)
    with hold_output(out):
        recovered = recover_leftovers(out)  # what every next run on this output does first
    assert (out / "data.txt").read_text() == "old"
    assert siblings(out) == []
    assert recovered
    write_atomically(out, lambda tmp: (tmp / "data.txt").write_text("new"),
                     overwrite=True, command="prepare")  # fmt: skip
    assert (out / "data.txt").read_text() == "new"
    assert siblings(out) == []


def test_an_overwrite_replaces_in_one_step(tmp_path):
    out = tmp_path / "out"
    write_atomically(out, lambda tmp: (tmp / "a").write_text("1"), command="prepare")
    write_atomically(out, lambda tmp: (tmp / "b").write_text("2"), overwrite=True,
                     command="prepare")  # fmt: skip
    assert sorted(folder_bytes(out)) == [MARKER, "b"] and (out / "b").read_text() == "2"
    assert siblings(out) == []


# -- item 3: overwrite deletes only a previous output of the same command ----------------------


def test_overwrite_refuses_a_folder_that_is_not_a_previous_output(tmp_path, tiny_tokenizer_dir):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    source = write_jsonl(tmp_path / "d.jsonl")

    result = runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir, "--overwrite"))

    assert result.exit_code == 1
    assert result.stderr.strip() == (
        f"error: {out} is not a previous output of `convcli prepare` (no {MARKER}); "
        "refusing to delete it: choose another --output or remove it yourself"
    )
    assert folder_bytes(out) == {"thesis.tex": b"years of work".hex()}


def test_overwrite_refuses_another_commands_output(tmp_path):
    out = tmp_path / "model"
    write_atomically(out, lambda tmp: (tmp / "w").write_text("weights"), command="convert")
    with pytest.raises(ConvcliError, match="not a previous output of `convcli prepare`"):
        write_atomically(out, lambda tmp: None, overwrite=True, command="prepare")
    assert (out / "w").read_text() == "weights"


def test_prepare_overwrites_its_own_output_and_an_empty_folder_is_fine(
    tmp_path, tiny_tokenizer_dir
):
    source = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "shards"
    out.mkdir()  # empty: no --overwrite needed
    first = runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir))
    again = runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir, "--overwrite"))
    assert first.exit_code == 0, first.stderr
    assert again.exit_code == 0, again.stderr
    assert json.loads((out / MARKER).read_text())["command"] == "prepare"
    assert siblings(out) == ["d.jsonl"]


def test_train_overwrite_refuses_to_delete_the_model_it_starts_from(tmp_path):
    run = tmp_path / "run"
    (run / "final").mkdir(parents=True)
    (run / "final" / "model.safetensors").write_text("the only copy")
    (run / "train.yaml").write_text("old run")
    (tmp_path / "shards").mkdir()
    args = ["train", "-d", str(tmp_path / "shards"), "--model", str(run / "final"),
            "-o", str(run), "--overwrite"]  # fmt: skip

    result = runner.invoke(app, args)

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --model {run / 'final'} lies in the run directory --output {run}, which this "
        "run rewrites; copy it elsewhere or choose another --output"
    )
    assert (run / "final" / "model.safetensors").read_text() == "the only copy"


def test_train_overwrite_refuses_a_folder_that_is_not_a_run(tmp_path, make_shards):
    shards = make_shards()
    run = tmp_path / "project"
    (run / "logs").mkdir(parents=True)
    (run / "logs" / "notes.txt").write_text("my own logs")
    args = ["train", "-d", str(shards), "--preset", "tiny", "-o", str(run), "--overwrite",
            "--max-steps", "1"]  # fmt: skip

    result = runner.invoke(app, args)

    assert result.exit_code == 1
    assert "is not a previous run of `convcli train`" in result.stderr
    assert (run / "logs" / "notes.txt").read_text() == "my own logs"


# -- item 11 (part): roots and homes are never outputs -----------------------------------------


@pytest.mark.parametrize("where", ["/", "~"])
def test_a_filesystem_root_or_home_is_refused_as_an_output(tmp_path, where, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    monkeypatch.setenv("HOME", str(home))
    (tmp_path / "shards").mkdir()
    output = where if where == "/" else str(home)
    args = ["train", "-d", str(tmp_path / "shards"), "--preset", "tiny", "-o", output,
            "--overwrite"]  # fmt: skip

    result = runner.invoke(app, args)

    what = "a filesystem root" if where == "/" else "a home folder"
    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --output {output} is {what}; give a folder of its own"
    )


# -- item 9: OS faults are one line naming the path, the old output intact ---------------------


def test_a_full_disk_is_one_line_and_the_previous_output_stays(
    tmp_path, tiny_tokenizer_dir, monkeypatch
):
    source = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "shards"
    assert runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir)).exit_code == 0
    before = folder_bytes(out)

    from convcli.data import shards

    def full(self):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(shards.ShardWriter, "_flush", full)
    result = runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir, "--overwrite"))

    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {out}: no space left on device; free some space and run again"
    )
    assert "Traceback" not in result.stderr
    assert folder_bytes(out) == before
    assert siblings(out) == ["d.jsonl"]


@pytest.fixture
def small_tmpfs(tmp_path):
    """A 200 KB tmpfs, where this machine lets us mount one (root in a container)."""
    mount = tmp_path / "small"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)],
                          capture_output=True)  # fmt: skip
    if done.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (the simulated ENOSPC test covers this)")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def test_a_really_full_disk_is_one_line_and_the_previous_output_stays(
    tmp_path, small_tmpfs, tiny_tokenizer_dir
):
    source = tmp_path / "d.jsonl"
    source.write_text("".join(json.dumps(d) + "\n" for d in DIALOGUES * 150))
    out = small_tmpfs / "shards"
    write_atomically(out, lambda tmp: (tmp / "old").write_text("old"), command="prepare")

    result = runner.invoke(app, prepare_args(source, out, tiny_tokenizer_dir, "--overwrite"))

    assert result.exit_code == 1, result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {small_tmpfs}") and "no space left on device" in last
    assert (out / "old").read_text() == "old"
    assert sorted(p.name for p in small_tmpfs.iterdir()) == ["shards"]


def test_a_read_only_folder_is_one_line(tmp_path, tiny_tokenizer_dir, monkeypatch):
    source = write_jsonl(tmp_path / "d.jsonl")
    folder = tmp_path / "ro"
    folder.mkdir()
    real_open = open

    def read_only(path, *args, **kwargs):  # root ignores permission bits: simulate EROFS
        if str(path).startswith(str(folder)):
            raise OSError(errno.EROFS, "Read-only file system", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr("builtins.open", read_only)
    result = runner.invoke(app, prepare_args(source, folder / "out", tiny_tokenizer_dir))

    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {folder}: read-only file system"


def test_the_other_processes_of_a_cluster_job_do_not_take_the_lock(tmp_path, monkeypatch):
    """srun starts every rank itself: rank 0 locks the run directory, the others join it."""
    run = tmp_path / "run"
    args = ["train", "-d", str(tmp_path / "no-shards"), "--preset", "tiny", "-o", str(run)]
    with hold_output(run):  # rank 0 of the job
        monkeypatch.setenv("SLURM_PROCID", "1")
        other_rank = runner.invoke(app, args)
    assert "in use by another convcli run" not in other_rank.stderr
    missing = tmp_path / "no-shards"
    assert other_rank.stderr.strip() == f"error: shard directory not found: {missing}"
