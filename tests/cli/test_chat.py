from __future__ import annotations

import json
from pathlib import Path

import pytest
from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.inference.chat import load_transcript

runner = CliRunner()


def chat(*args, input: str):
    return runner.invoke(app, ["chat", *map(str, args)], input=input)


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_piped_chat_with_commands_writes_the_transcript(trained, tmp_path):
    forward, reverse = trained
    log = tmp_path / "chat.jsonl"
    script = "Hello\n\n/candidates\n/reset\nこんにちは\n/quit\nnever read\n"
    result = chat(
        forward, "--reverse-model", reverse, "--num-candidates", "4", "--mmi-argmax",
        "--transcript", log, "--seed", "0", input=script,
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    replies = result.stdout.splitlines()
    recorded = events(log)
    assert [e["event"] for e in recorded] == ["start", "turn", "reset", "turn"]
    turns = [e for e in recorded if e["event"] == "turn"]
    assert [t["user"] for t in turns] == ["Hello", "こんにちは"]
    # stdout holds the replies, one per line, and nothing else.
    assert replies == [t["bot"] for t in turns]
    assert replies[0] == "Hi, how are you?"
    # Four samples each, identical ones listed once with their count.
    assert all(sum(c["count"] for c in t["candidates"]) == 4 for t in turns)
    assert all(len({c["text"] for c in t["candidates"]}) == len(t["candidates"]) for t in turns)
    # /candidates listed the first turn's candidates (on stderr).
    assert "candidates (MMI score" in result.stderr
    assert turns[0]["candidates"][0]["text"] in result.stderr
    assert "you>" not in result.stdout + result.stderr
    assert recorded[0]["reverse_model"] == str(reverse)


def test_resume_transcript_continues_the_conversation(trained, tmp_path):
    forward, _ = trained
    log = tmp_path / "chat.jsonl"
    first = chat(forward, "--transcript", log, "--seed", "1", input="Hello\n")
    assert first.exit_code == 0, first.stderr
    second = chat(
        forward, "--transcript", log, "--resume-transcript", "--verbose", input="Is it nice?\n"
    )
    assert second.exit_code == 0, second.stderr
    assert "resuming" in second.stderr and "1 turn(s)" in second.stderr
    assert "tokens/s" in second.stderr
    recorded = events(log)
    assert [e["event"] for e in recorded] == ["start", "turn", "resume", "turn"]
    from convcli.inference.chat import load_transcript

    assert load_transcript(log).history[::2] == ["Hello", "Is it nice?"]


def test_persona_context_and_history_budget(trained, tmp_path):
    forward, _ = trained
    persona = tmp_path / "persona.txt"
    persona.write_text("I love green tea.\nDo you like tea?\n", encoding="utf-8")
    log = tmp_path / "chat.jsonl"
    result = chat(
        forward, "--context", persona, "--max-history-tokens", "48", "--transcript", log,
        input="Hello\nWhere do you live?\nIs it nice?\n",
    )  # fmt: skip
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 3
    assert events(log)[0]["context"] == ["I love green tea.", "Do you like tea?"]
    too_small = chat(forward, "--context", persona, "--max-history-tokens", "10", input="Hi\n")
    assert too_small.exit_code == 2 and "--context takes" in too_small.stderr


def test_bad_input_never_crashes_it(trained):
    forward, _ = trained
    huge = "word " * 2000
    result = chat(forward, "--max-new-tokens", "5", input=f"\n   \n{huge}\nこんにちは\n")
    assert result.exit_code == 0, result.stderr
    assert len(result.stdout.splitlines()) == 2  # EOF ends it cleanly
    assert "chat ended after 2 turn(s)" in result.stderr


def test_resume_needs_a_transcript(trained):
    result = chat(trained[0], "--resume-transcript", input="")
    assert result.exit_code == 2 and "--transcript" in result.stderr


def test_a_context_file_is_read_by_the_corpus_readers(tmp_path):
    from convcli.cli.chat import read_context_file
    from convcli.errors import InputError

    persona = tmp_path / "persona.json"
    persona.write_text(
        json.dumps({"messages": [{"role": "system", "content": "I love green tea."}]}, indent=1)
    )
    assert read_context_file(persona) == ["I love green tea."]  # a system message opens it
    persona.write_text('["I love green tea.", "Do you like tea?"]')
    assert read_context_file(persona) == ["I love green tea.", "Do you like tea?"]
    persona.write_text('["I love green tea.", 3]')
    with pytest.raises(InputError, match=r"persona\.json: expected a JSON array of strings"):
        read_context_file(persona)


# Odd input (issues 11.10, 11.11): bytes that are not UTF-8 on stdin do not end the chat; a
# transcript cut short by a kill is reported and appended to on a fresh line.


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
