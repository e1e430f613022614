from __future__ import annotations

import json

from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.data.shards import Shards
from tests.conftest import DIALOGUES, REPO, run_cli

runner = CliRunner()


def write_jsonl(path, dialogues=DIALOGUES):
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues))
    return str(path)


def test_prepare_writes_shards_and_a_one_line_summary(tmp_path, tiny_tokenizer_dir):
    source = write_jsonl(tmp_path / "d.jsonl")
    out = tmp_path / "out"
    args = ["prepare", source, "-o", str(out), "--tokenizer", str(tiny_tokenizer_dir)]
    result = runner.invoke(app, [*args, "--workers", "1"])
    assert result.exit_code == 0, result.output
    assert result.stdout == ""
    summary = result.stderr.strip().splitlines()[-1]
    assert summary.startswith(f"prepared {out}: 24 dialogues read, 24 written, 0 skipped;")
    assert Shards(out).manifest["dialogues_written"] == len(DIALOGUES)
    again = runner.invoke(app, args)
    assert again.exit_code == 1
    assert again.stderr.strip() == f"error: {out} already exists (pass --overwrite to replace it)"


def test_config_file_with_flags_winning(tmp_path, tiny_tokenizer_dir):
    source = write_jsonl(tmp_path / "d.jsonl")
    config = tmp_path / "c.yaml"
    config.write_text(
        f"inputs: [{source}]\ntokenizer: {tiny_tokenizer_dir}\nmax_length: 64\n"
        "valid_fraction: 0.5\nworkers: 1\n"
    )
    out = tmp_path / "out"
    result = runner.invoke(
        app, ["prepare", "--config", str(config), "-o", str(out), "--max-length", "32"]
    )
    assert result.exit_code == 0, result.output
    manifest = Shards(out).manifest
    assert manifest["max_length"] == 32 and manifest["settings"]["valid_fraction"] == 0.5
    resolved = (out / "prepare.yaml").read_text()
    assert "max_length: 32" in resolved and "valid_fraction: 0.5" in resolved


def test_user_mistakes_are_one_line_with_exit_codes(tmp_path, tiny_tokenizer_dir):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('["ok", "fine"]\n["broken"\n')
    tok = ["--tokenizer", str(tiny_tokenizer_dir), "--workers", "1"]
    cases = [
        (["prepare", str(bad), "-o", str(tmp_path / "o"), *tok], 1,
         f"error: {bad}:2: malformed JSON: "),
        (["prepare", str(tmp_path / "nope.txt"), "-o", str(tmp_path / "o"), *tok], 1,
         f"error: {tmp_path / 'nope.txt'}: file not found"),
        (["prepare", str(bad), "-o", str(tmp_path / "o")], 2,
         "error: give --tokenizer NAME_OR_PATH, or --train-tokenizer --vocab-size N"),
        (["prepare", str(bad), *tok], 2,
         "error: --output: the shard directory to write is required"),
        (["prepare", str(bad), "-o", "x", "--format", "csv", *tok], 2, ""),
        (["prepare", str(bad), "-o", str(tmp_path), "--overwrite", *tok], 2,
         f"error: --output {tmp_path} would replace the input {bad}"),
    ]  # fmt: skip
    for args, code, message in cases:
        result = runner.invoke(app, args)
        assert result.exit_code == code, (args, result.output)
        assert result.stderr.startswith(message) and "Traceback" not in result.stderr
        if code == 1:
            assert len(result.stderr.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists() and bad.exists()
    skip = runner.invoke(
        app, ["prepare", str(bad), "-o", str(tmp_path / "o"), "--on-error", "skip", *tok]
    )
    assert skip.exit_code == 0
    assert "2 dialogues read, 1 written, 1 skipped (1 malformed-json)" in skip.stderr


def test_subprocess_keeps_a_redirected_stderr_plain_and_trains_a_tokenizer(tmp_path):
    out = tmp_path / "out"
    result = run_cli(
        "prepare",
        "sample_data/dialogues.txt",
        "sample_data/dialogues.tsv",
        "-o",
        str(out),
        "--train-tokenizer",
        "--vocab-size",
        "500",
        cwd=REPO,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""
    assert "\r" not in result.stderr and "B/s" not in result.stderr  # no tqdm bar in a log
    assert "4000 dialogues read, 4000 written, 0 skipped" in result.stderr
    formats = [s["format"] for s in Shards(out).manifest["sources"]]
    assert formats == ["text", "tsv"]


def test_a_file_of_no_known_format_is_refused_before_any_work(tmp_path, tiny_tokenizer_dir):
    config = tmp_path / "settings.yml"
    config.write_text("name: demo\nlayers: 2\nwidth: 64\n")
    out = tmp_path / "out"
    tok = ["--tokenizer", str(tiny_tokenizer_dir), "--workers", "1"]
    result = runner.invoke(app, ["prepare", str(config), "-o", str(out), *tok])
    assert result.exit_code == 1 and not out.exists()
    error = result.stderr.strip()
    assert error.startswith(f"error: {config}: no known format fits its extension (.yml)")
    assert error.endswith("Pass --format text to read it as plain text (one turn per line)")
    assert len(error.splitlines()) == 1
    forced = runner.invoke(app, ["prepare", str(config), "-o", str(out), "--format", "text", *tok])
    assert forced.exit_code == 0, forced.output
    assert forced.stderr.strip().endswith("; read as text")
