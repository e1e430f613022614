"""Progress on stderr when it is a log file, not a terminal: plain lines, or none (--quiet);
and no library warnings in it."""

from __future__ import annotations

import json

import pytest

from convcli.cli.common import StageBars
from tests.conftest import DIALOGUES, run_cli

FRAMES = ("\r", "\x1b[")  # what a redirected tqdm bar fills a log with


def log_is_plain(stderr: str) -> None:
    assert not any(mark in stderr for mark in FRAMES), stderr[:500]
    assert "Warning" not in stderr, stderr  # no FutureWarning or the like from the stack


@pytest.mark.slow
def test_redirected_prepare_and_train_write_summaries_not_bar_frames(tmp_path):
    corpus = tmp_path / "corpus.jsonl"
    corpus.write_text("".join(json.dumps({"turns": d}) + "\n" for d in DIALOGUES * 5))
    shards, run = tmp_path / "shards", tmp_path / "run"
    prepared = run_cli("prepare", str(corpus), "-o", str(shards), "--train-tokenizer",
                       "--vocab-size", "300", "--valid-fraction", "0.2")  # fmt: skip
    assert prepared.returncode == 0, prepared.stderr
    log_is_plain(prepared.stderr)
    assert prepared.stderr.splitlines()[-1].startswith(f"prepared {shards}:")

    common = ["--preset", "tiny", "--max-steps", "20", "--batch-size", "8", "--val-every", "10",
              "--accelerator", "cpu", "--devices", "1"]  # fmt: skip
    trained = run_cli("train", "-d", str(shards), "-o", str(run), *common)
    assert trained.returncode == 0, trained.stderr
    log_is_plain(trained.stderr)
    # The start lines, at most a progress line per 10 s, the summary: a few hundred bytes
    # where a tqdm bar wrote a frame per update (6.6 KB, 62 carriage returns, for this run).
    lines = trained.stderr.splitlines()
    assert len(trained.stderr) < 3000 and any(line.startswith("trained 20 steps") for line in lines)

    quiet = run_cli("train", "-d", str(shards), "-o", str(run), *common, "--overwrite", "-q")
    assert quiet.returncode == 0, quiet.stderr
    assert not [line for line in quiet.stderr.splitlines() if line.startswith("step ")]
    assert any(line.startswith("trained 20 steps") for line in quiet.stderr.splitlines())


def test_stage_lines_come_every_interval_and_never_as_frames(capsys, monkeypatch):
    now = [0.0]
    monkeypatch.setattr("convcli.cli.common.time.monotonic", lambda: now[0])
    with StageBars(lambda stage: f"{stage:<9}", mode="lines", interval=5) as bars:
        for second in range(0, 21):
            now[0] = float(second)
            bars("preparing", second * 10, 200)
    err = capsys.readouterr().err
    assert err.splitlines() == [f"preparing: {n}/200 ({n / 200:.0%})" for n in (50, 100, 150, 200)]
    with StageBars(mode="off") as bars:
        bars("preparing", 100, 200)
    assert capsys.readouterr().err == ""


def test_interrupted_starts_a_fresh_line_on_a_terminal_only(capsys, monkeypatch):
    import sys

    import typer

    from convcli.cli.common import friendly_errors

    @friendly_errors
    def stopped() -> None:
        raise KeyboardInterrupt

    for terminal, expected in ((False, "interrupted\n"), (True, "\ninterrupted\n")):
        monkeypatch.setattr(sys.stderr, "isatty", lambda terminal=terminal: terminal)
        with pytest.raises(typer.Exit) as exit:
            stopped()
        assert exit.value.exit_code == 130 and capsys.readouterr().err == expected
