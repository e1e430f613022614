"""`convcli convert`: exit codes, one-line errors, progress and summary on stderr."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from typer.testing import CliRunner

from convcli.cli.app import app
from tests.conftest import run_cli, tiny_gpt2
from tests.conversion.test_convert import Payload, dialogpt_state, save

runner = CliRunner()


@pytest.fixture
def pkl(tmp_path, tiny_tokenizer):
    model = tiny_gpt2(len(tiny_tokenizer), n_positions=32)
    return save(dialogpt_state(model, prefix="module."), tmp_path / "small_ft.pkl")


def convert_args(checkpoint: Path, out: Path, tokenizer: Path) -> list[str]:
    return ["convert", str(checkpoint), "-o", str(out), "--tokenizer", str(tokenizer)]


def test_convert_writes_a_folder_and_one_summary_line(
    pkl, tmp_path, tiny_tokenizer_dir, monkeypatch
):
    monkeypatch.setattr("convcli.cli.convert.progress_mode", lambda quiet: "bar")  # a terminal
    out = tmp_path / "out"
    args = convert_args(pkl, out, tiny_tokenizer_dir)
    result = runner.invoke(app, [*args, "--n-head", "4", "--reverse"])

    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith(f"wrote {out}: ")
    assert "2 layers, width 64, 4 heads, float32, max logit diff 0" in lines[-1]
    assert "dropped 3 keys: 2 causal-mask buffers" in result.stderr
    assert "module.lm_head.decoder.weight" in result.stderr
    for stage in ("load", "convert", "save", "verify"):
        assert stage in result.stderr  # a tqdm bar per stage
    assert '"reverse": true' in (out / "convcli.json").read_text()


@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (["--n-head", "5"], 2, "error: --n-head 5 disagrees with the checkpoint"),
        (["--n-layer", "12"], 2, "error: --n-layer 12 disagrees with the checkpoint"),
        (["--dtype", "float64"], 2, "error: --dtype: 'float64' is not one of float32"),
    ],
)
def test_bad_options(extra, code, message, pkl, tmp_path, tiny_tokenizer_dir):
    args = convert_args(pkl, tmp_path / "out", tiny_tokenizer_dir)
    result = runner.invoke(app, [*args, *extra])

    assert result.exit_code == code
    assert message in result.stderr
    assert not (tmp_path / "out").exists()


def test_bad_file_is_one_line_and_exit_1(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "notes.pkl"
    bad.write_text("not weights")
    result = runner.invoke(
        app,
        convert_args(bad, tmp_path / "out", tiny_tokenizer_dir),
    )

    assert result.exit_code == 1
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert errors == [
        f"error: {bad}: not a PyTorch checkpoint (neither a torch.save zip archive nor a pickle)"
    ]
    assert "Traceback" not in result.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.pkl"]


def test_existing_output_is_refused_without_overwrite(pkl, tmp_path, tiny_tokenizer_dir):
    (tmp_path / "out").mkdir()
    args = convert_args(pkl, tmp_path / "out", tiny_tokenizer_dir)
    into_empty = runner.invoke(app, [*args, "--n-head", "4", "--no-verify"])
    assert into_empty.exit_code == 0, into_empty.stderr  # an empty folder is a fine output

    refused = runner.invoke(app, args)
    replaced = runner.invoke(app, [*args, "--overwrite", "--n-head", "4", "--no-verify"])

    assert refused.exit_code == 1
    assert "already exists (pass --overwrite to replace it)" in refused.stderr
    assert replaced.exit_code == 0, replaced.stderr
    assert "max logit diff not verified" in replaced.stderr
    assert (tmp_path / "out" / "model.safetensors").is_file()


def test_help_shows_an_example():
    result = runner.invoke(app, ["convert", "--help"], env={"COLUMNS": "120"})
    assert result.exit_code == 0
    assert "Example:\n    convcli convert medium_ft.pkl -o dialogpt-medium" in result.stdout
    assert "--no-verify" in result.stdout


@pytest.mark.slow
def test_a_malicious_pickle_never_runs_in_a_real_process(tmp_path, gpt2_tokenizer_dir):
    marker = tmp_path / "pwned"
    state = dialogpt_state(tiny_gpt2(50257, n_positions=32), dtype=torch.float16)
    state["transformer.h.0.attn.bias"] = Payload(marker)  # type: ignore[assignment]
    evil = save(state, tmp_path / "medium_ft.pkl")

    result = run_cli(
        "convert", str(evil), "-o", str(tmp_path / "out"), "--tokenizer", str(gpt2_tokenizer_dir)
    )

    assert result.returncode == 1
    assert re.search(r"refused: the pickle asks to run (posix|nt)\.system", result.stderr)
    assert not marker.exists()
    assert not (tmp_path / "out").exists()
