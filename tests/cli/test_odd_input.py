"""Odd input and the answers file: generate never replaces an output silently or its own
input, writes the answers whole or not at all; BOMs are accepted, bytes that are not UTF-8
on chat's stdin do not end the chat, a transcript cut short by a kill is reported and
appended to on a fresh line (issues 11.9, 11.10, 11.11, 15.7)."""

from __future__ import annotations

import errno
import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.inference.chat import load_transcript

runner = CliRunner()
CONTEXTS = '["Hello"]\n{"turns": ["Do you like tea?"]}\n'


def generate(model: Path, *args: object, input: str | bytes | None = None):
    return runner.invoke(app, ["generate", str(model), *map(str, args)], input=input)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# -- generate --output (15.7, 11.9, 11.11) -----------------------------------------------------


def test_an_existing_answers_file_needs_overwrite(trained, tmp_path):
    contexts, answers = tmp_path / "c.jsonl", tmp_path / "answers.jsonl"
    contexts.write_text(CONTEXTS)
    answers.write_text("my earlier answers\n")

    refused = generate(trained[0], "--input", contexts, "--output", answers)
    replaced = generate(trained[0], "--input", contexts, "--output", answers, "--overwrite")

    assert refused.exit_code == 1
    assert refused.stderr.strip() == (
        f"error: {answers} already exists (pass --overwrite to replace it)"
    )
    assert replaced.exit_code == 0, replaced.stderr
    assert len(answers.read_text().splitlines()) == 2
    assert siblings(answers) == ["answers.jsonl", "c.jsonl"]


def test_generate_refuses_to_write_over_its_input(trained, tmp_path):
    contexts = tmp_path / "c.jsonl"
    contexts.write_text(CONTEXTS)

    result = generate(trained[0], "--input", contexts, "--output", contexts, "--overwrite")

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --output {contexts} would replace the input {contexts}"
    )
    assert contexts.read_text() == CONTEXTS


def test_an_answers_file_that_is_a_folder_is_one_line(trained, tmp_path):
    contexts, folder = tmp_path / "c.jsonl", tmp_path / "answers"
    contexts.write_text(CONTEXTS)
    (folder / "inside").mkdir(parents=True)

    result = generate(trained[0], "--input", contexts, "--output", folder, "--overwrite")

    assert result.exit_code == 1
    assert result.stderr.strip() == f"error: {folder} is not a regular file; refusing to replace it"


def test_a_full_disk_while_answering_keeps_the_previous_answers(trained, tmp_path, monkeypatch):
    import convcli.inference.batch as batch

    contexts, answers = tmp_path / "c.jsonl", tmp_path / "answers.jsonl"
    contexts.write_text(CONTEXTS)
    answers.write_text("my earlier answers\n")

    def half_then_full(items, answer, out, **kwargs):
        out.write('{"context": ["Hello"], "responses": ["Hi"]}\n')
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(batch, "run_batches", half_then_full)
    result = generate(trained[0], "--input", contexts, "--output", answers, "--overwrite")

    assert result.exit_code == 1
    assert result.stderr.strip().splitlines()[-1] == (
        f"error: {answers}: no space left on device; free some space and run again"
    )
    assert answers.read_text() == "my earlier answers\n"
    assert siblings(answers) == ["answers.jsonl", "c.jsonl"]  # no half-written temporary


# -- BOMs (11.11) ------------------------------------------------------------------------------


def test_a_byte_order_mark_is_accepted_by_generate_and_chat(trained, tmp_path):
    contexts, persona = tmp_path / "c.jsonl", tmp_path / "persona.txt"
    contexts.write_bytes(b"\xef\xbb\xbf" + CONTEXTS.encode())
    persona.write_bytes(b"\xef\xbb\xbfHello\n")

    from_file = generate(trained[0], "--input", contexts)
    from_stdin = generate(trained[0], "--input", "-", input=b"\xef\xbb\xbf" + CONTEXTS.encode())
    log = tmp_path / "t.jsonl"
    chat = ["chat", str(trained[0]), "--context", str(persona), "--transcript", str(log)]
    chatted = runner.invoke(app, chat, input="Hi\n")

    for result in (from_file, from_stdin):
        assert result.exit_code == 0, result.stderr
        assert len(result.stdout.splitlines()) == 2
        assert "read 2 context(s), wrote 2, skipped 0" in result.stderr
    assert chatted.exit_code == 0, chatted.stderr
    start = json.loads(log.read_text().splitlines()[0])
    assert start["context"] == ["Hello"]  # no "\ufeffHello"


# -- chat's stdin and transcripts (11.10, 11.11) -----------------------------------------------


def test_bytes_that_are_not_utf8_on_chat_stdin_are_replaced_and_the_chat_goes_on(trained):
    result = runner.invoke(app, ["chat", str(trained[0])], input=b"Hello\n\xff\xfe tea?\nHi\n")

    assert result.exit_code == 0, result.output
    assert len(result.stdout.splitlines()) == 3
    assert "note: bytes that are not UTF-8 in this line were replaced by \ufffd" in result.stderr
    assert "chat ended after 3 turn(s)" in result.stderr


@pytest.fixture
def cut_transcript(tmp_path) -> Path:
    """A transcript whose chat was killed while writing its second turn."""
    log = tmp_path / "chat.jsonl"
    start = {"event": "start", "time": "t", "context": []}
    turn = {"event": "turn", "time": "t", "user": "Hello", "bot": "Hi, how are you?"}
    log.write_text(json.dumps(start) + "\n" + json.dumps(turn) + '\n{"event": "turn", "ti')
    return log


def test_a_transcript_cut_short_is_reported_and_appended_on_a_fresh_line(trained, cut_transcript):
    log = cut_transcript
    args = ["chat", str(trained[0]), "--transcript", str(log), "--resume-transcript"]

    first = runner.invoke(app, args, input="Is it nice?\n")
    second = runner.invoke(app, args, input="Yes\n")  # the file is still readable

    assert first.exit_code == 0, first.stderr
    assert f"{log}:3: ignored a line cut short (a chat killed while writing it)" in first.stderr
    assert "resuming" in first.stderr and "1 turn(s)" in first.stderr
    lines = log.read_text().splitlines()
    assert lines[2] == '{"event": "turn", "ti'  # kept, on its own line
    assert json.loads(lines[3])["event"] == "resume"
    assert second.exit_code == 0, second.stderr
    assert "resuming" in second.stderr and "2 turn(s)" in second.stderr
    assert load_transcript(log).history[:2] == ["Hello", "Hi, how are you?"]
