"""A run stopped by SIGTERM or Ctrl-C saves a checkpoint and resumes from it; a save killed
midway never leaves a checkpoint `--resume auto` trips on (issue 11 items 6 and 7).
Real signals, sent to `python -m convcli train` in a subprocess."""

from __future__ import annotations

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
from convcli.training.fit import train
from tests.conftest import REPO, run_cli
from tests.training.test_fit import settings

runner = CliRunner()


def start_training(shards: Path, run: Path) -> subprocess.Popen[str]:
    args = ["train", "-d", str(shards), "--preset", "tiny", "-o", str(run), "--batch-size", "4",
            "--max-steps", "100000", "--save-every", "100000", "--val-every", "100000",
            "--accelerator", "cpu", "--devices", "1"]  # fmt: skip
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "convcli", *args], env=env, text=True,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )  # fmt: skip


def wait_for_steps(process: subprocess.Popen[str], run: Path, timeout: float = 180) -> None:
    """Until Lightning has flushed its first metrics (steps are running)."""
    deadline = time.monotonic() + timeout
    while not (run / "logs" / "version_0" / "metrics.csv").is_file():
        if process.poll() is not None:
            raise AssertionError(f"training ended early: {process.communicate()[1][-2000:]}")
        if time.monotonic() > deadline:
            process.kill()
            raise AssertionError("training did not start in time")
        time.sleep(0.2)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("signum", "code", "name"), [(signal.SIGTERM, 143, "SIGTERM"), (signal.SIGINT, 130, "Ctrl-C")]
)
def test_a_signal_saves_a_checkpoint_that_resume_auto_continues(
    signum, code, name, make_shards, tmp_path
):
    shards, run = make_shards(), tmp_path / "run"
    process = start_training(shards, run)
    wait_for_steps(process, run)

    process.send_signal(signum)
    _, stderr = process.communicate(timeout=120)

    assert process.returncode == code, stderr[-2000:]
    assert f"{name}: saving a checkpoint at the end of this step, then stopping" in stderr
    last = stderr.strip().splitlines()[-1]
    assert last.startswith(f"stopped by {name} at step "), last
    step = int(last.split(" at step ")[1].split(";")[0])
    saved = run / "checkpoints" / f"step-{step:07d}.ckpt"
    assert step >= 1 and last.endswith(f"saved {saved}: continue with --resume auto")
    assert saved.is_file() and "Traceback" not in stderr
    assert [p.name for p in (run / "checkpoints").iterdir()] == [saved.name]

    if signum == signal.SIGTERM:  # resuming costs a few seconds; once is enough
        resumed = run_cli("train", "-d", str(shards), "--preset", "tiny", "-o", str(run),
                          "--batch-size", "4", "--resume", "auto", "--max-steps", str(step + 2),
                          "--save-every", "100000", "--val-every", "100000",
                          "--accelerator", "cpu", "--devices", "1")  # fmt: skip
        assert resumed.returncode == 0, resumed.stderr[-2000:]
        assert f"resuming from {saved}" in resumed.stderr
        assert f"trained {step + 2} steps" in resumed.stderr


def test_resume_auto_skips_a_truncated_newest_checkpoint(make_shards, tmp_path):
    shards, run = make_shards(), tmp_path / "run"
    train(settings(shards, run, preset="tiny", max_steps=4, save_every=2), progress=False)
    checkpoints = run / "checkpoints"
    newest = checkpoints / "step-0000004.ckpt"
    newest.write_bytes(newest.read_bytes()[: newest.stat().st_size // 2])  # a killed copy
    (checkpoints / ".ckpt-tmp-step-0000006.ckpt-x1y2").write_bytes(b"\0" * 1000)  # a leak

    result = runner.invoke(app, [
        "train", "-d", str(shards), "--preset", "tiny", "-o", str(run), "--batch-size", "4",
        "--resume", "auto", "--max-steps", "6", "--save-every", "2", "--val-every", "5",
        "--learning-rate", "1e-3", "--warmup-steps", "2", "--accelerator", "cpu", "--devices", "1",
    ])  # fmt: skip

    assert result.exit_code == 0, result.output
    assert (
        "warning: skipped step-0000004.ckpt (truncated or corrupt checkpoint); resuming from "
        "step-0000002.ckpt"
    ) in result.stderr
    assert sorted(p.name for p in checkpoints.iterdir()) == [
        "step-0000004.ckpt",
        "step-0000006.ckpt",
    ]  # the leaked temporary is gone; step 4 was written again, whole


KILLED_SAVE = """
    import os, signal, torch
    from convcli.training.checkpoint_files import AtomicCheckpointIO

    real_save = torch.save
    def save_and_die(obj, handle):
        handle.write(b"PK" + b"half a checkpoint" * 1000)
        handle.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    torch.save = save_and_die
    AtomicCheckpointIO().save_checkpoint({{"state_dict": {{}}}}, {path!r})
"""


def test_a_save_killed_midway_leaves_no_checkpoint_only_a_temporary(tmp_path):
    target = tmp_path / "checkpoints" / "step-0000010.ckpt"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    code = textwrap.dedent(KILLED_SAVE.format(path=str(target)))
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, timeout=120)

    assert done.returncode == -signal.SIGKILL, done.stderr
    assert not target.exists()
    leftovers = [p.name for p in target.parent.iterdir()]
    assert len(leftovers) == 1 and leftovers[0].startswith(".ckpt-tmp-step-0000010.ckpt")


def test_a_second_signal_aborts_without_saving(tmp_path, capfd):
    from convcli.training.callbacks import StepCheckpoints
    from convcli.training.stopping import SaveOnSignal, Stopped

    stopper = SaveOnSignal(StepCheckpoints(tmp_path, every=10, keep=2))
    stopper._handle(signal.SIGINT, None)  # what Python runs on the first Ctrl-C
    with pytest.raises(Stopped) as second:
        stopper._handle(signal.SIGINT, None)

    # Written to the file descriptor: a handler must not re-enter sys.stderr's writer.
    assert capfd.readouterr().err == (
        "Ctrl-C: saving a checkpoint at the end of this step, then stopping "
        "(Ctrl-C again to abort)\n"
    )
    assert second.value.message() == (
        "aborted by a second Ctrl-C; nothing saved since the last checkpoint"
    )
    assert second.value.signum + 128 == 130 and list(tmp_path.iterdir()) == []


def test_a_crashed_run_gives_the_signals_back(make_shards, tmp_path):
    from tests.training.test_fit import Crash

    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with pytest.raises(RuntimeError, match="simulated crash"):
        train(settings(make_shards(), tmp_path / "run", preset="tiny", max_steps=4),
              callbacks=[Crash(at=2)], progress=False)  # fmt: skip
    # else a later Ctrl-C (or a pool's SIGTERM to its forked workers) would be swallowed
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
