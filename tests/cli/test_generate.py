from __future__ import annotations

import errno
import json
from pathlib import Path

from typer.testing import CliRunner

from convcli.cli.app import app
from convcli.inference.model import ConversationModel
from tests.conftest import DIALOGUES

runner = CliRunner()


def generate(*args: str):
    return runner.invoke(app, ["generate", *map(str, args)])


def test_prints_exactly_the_reply_on_stdout(trained):
    forward, _ = trained
    result = generate(forward, "Hello", "--device", "cpu")
    assert result.exit_code == 0, result.stderr
    expected = ConversationModel.from_pretrained(forward, device="cpu").generate(["Hello"]).text
    assert result.stdout == expected + "\n"
    assert expected == DIALOGUES[0][1]


def test_do_sample_samples_and_the_seed_repeats_it(trained):
    forward, _ = trained
    context = [forward, "Do you like tea?", "--max-new-tokens", "6"]
    hot = ["--do-sample", "--temperature", "3", "--top-k", "0", "-n", "3"]
    greedy = generate(*context)
    first = generate(*context, *hot, "--seed", "5")
    again = generate(*context, *hot, "--seed", "5")
    other_seed = generate(*context, *hot, "--seed", "6")
    for result in (greedy, first, again, other_seed):
        assert result.exit_code == 0, result.stderr
    # The model has learnt this dialogue: greedy decoding gives its reply (cut to 6 tokens).
    assert DIALOGUES[2][1].startswith(greedy.stdout.strip())
    # At temperature 3 with top-k off, three samples are three different replies, none
    # of them the greedy one: a run that ignored --do-sample would print greedy thrice
    # (or fail on -n 3).
    replies = first.stdout.splitlines()
    assert len(replies) == 3 and len(set(replies)) == 3, replies
    assert greedy.stdout.strip() not in replies
    assert first.stdout == again.stdout
    assert other_seed.stdout != first.stdout


def test_other_generate_options_pass_through(trained):
    extra = generate(
        trained[0], "Hello", "--option", "num_beams=2", "--option", "bad_words_ids=[[5]]"
    )
    assert extra.exit_code == 0, extra.stderr
    assert extra.stdout.strip()


def test_json_with_mmi(trained):
    forward, reverse = trained
    result = generate(
        forward,
        "Hello",
        "--reverse-model",
        reverse,
        "--num-candidates",
        "4",
        "--json",
        "--seed",
        "1",
    )
    assert result.exit_code == 0, result.stderr
    payload = json.loads(result.stdout)
    assert set(payload) == {"context", "responses", "candidates"}
    assert payload["context"] == ["Hello"]
    assert len(payload["responses"]) == 1
    assert sum(c["count"] for c in payload["candidates"]) == 4  # duplicates listed once
    assert all(
        set(c) == {"text", "score", "count"} and isinstance(c["score"], float)
        for c in payload["candidates"]
    )
    assert payload["responses"][0] in [c["text"] for c in payload["candidates"]]
    assert "not marked as a reverse model" not in result.stderr


def test_json_without_mmi_has_no_candidates(trained):
    result = generate(trained[0], "Hello", "How are you?", "--json")
    assert result.exit_code == 0, result.stderr
    assert set(json.loads(result.stdout)) == {"context", "responses"}


def test_a_reverse_model_not_marked_reverse_is_a_warning(trained):
    forward, _ = trained
    result = generate(forward, "Hello", "--reverse-model", forward, "--num-candidates", "2")
    assert result.exit_code == 0, result.stderr
    assert "not marked as a reverse model" in result.stderr
    assert len(result.stdout.splitlines()) == 1


def test_usage_errors(trained, tmp_path):
    assert generate(trained[0]).exit_code == 2
    both = generate(trained[0], "Hello", "--input", tmp_path / "x.jsonl")
    assert both.exit_code == 2 and "not both" in both.stderr
    missing = generate(tmp_path / "nope", "Hello")
    assert missing.exit_code == 1 and "not found" in missing.stderr
    greedy_many = generate(trained[0], "Hello", "-n", "2", "--greedy")
    assert greedy_many.exit_code == 2 and "generation options rejected" in greedy_many.stderr


def write_contexts(path: Path) -> Path:
    lines = [
        '["Hello"]',
        '{"id": "tea", "turns": ["Do you like tea?"]}',
        "{not json",
        "",
        '["Where do you live?", "I live in a small town."]',
        '{"id": "empty", "turns": []}',
    ]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return path


def test_batch_mode_strict_stops_with_the_line_number(trained, tmp_path):
    contexts = write_contexts(tmp_path / "contexts.jsonl")
    out = tmp_path / "out.jsonl"
    result = generate(trained[0], "--input", contexts, "--output", out)
    assert result.exit_code == 1
    assert "contexts.jsonl:3: malformed JSON" in result.stderr
    assert not out.exists()


def test_batch_mode_skip_accounts_for_every_line(trained, tmp_path):
    contexts = write_contexts(tmp_path / "contexts.jsonl")
    out = tmp_path / "out.jsonl"
    result = generate(
        trained[0], "--input", contexts, "--output", out, "--on-error", "skip", "--batch-size", "2"
    )
    assert result.exit_code == 0, result.stderr
    assert result.stdout == ""
    records = [json.loads(line) for line in out.read_text(encoding="utf-8").splitlines()]
    assert [r["line"] for r in records] == [1, 2, 5]
    assert records[1]["id"] == "tea" and records[1]["context"] == ["Do you like tea?"]
    assert records[0]["responses"] == [DIALOGUES[0][1]]
    assert "read 5 context(s), wrote 3, skipped 2 bad line(s)" in result.stderr
    assert "contexts.jsonl:6:" in result.stderr


def test_batch_mode_with_mmi_writes_candidates_to_stdout(trained, tmp_path):
    forward, reverse = trained
    contexts = tmp_path / "c.jsonl"
    contexts.write_text('["Hello"]\n["こんにちは"]\n', encoding="utf-8")
    result = generate(forward, "-i", contexts, "--reverse-model", reverse, "--num-candidates", "3")
    assert result.exit_code == 0, result.stderr
    records = [json.loads(line) for line in result.stdout.splitlines()]
    assert [sum(c["count"] for c in r["candidates"]) for r in records] == [3, 3]
    assert records[1]["context"] == ["こんにちは"]


# The answers file and odd input (issues 11.9, 11.11, 15.7): generate never replaces an
# output silently or its own input, writes the answers whole or not at all; BOMs are accepted.


CONTEXTS = '["Hello"]\n{"turns": ["Do you like tea?"]}\n'


def generate_answers(model: Path, *args: object, input: str | bytes | None = None):
    return runner.invoke(app, ["generate", str(model), *map(str, args)], input=input)


def siblings(path: Path) -> list[str]:
    return sorted(p.name for p in path.parent.iterdir())


# -- generate --output (15.7, 11.9, 11.11) -----------------------------------------------------


def test_an_existing_answers_file_needs_overwrite(trained, tmp_path):
    contexts, answers = tmp_path / "c.jsonl", tmp_path / "answers.jsonl"
    contexts.write_text(CONTEXTS)
    answers.write_text("my earlier answers\n")

    refused = generate_answers(trained[0], "--input", contexts, "--output", answers)
    replaced = generate_answers(trained[0], "--input", contexts, "--output", answers, "--overwrite")

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

    result = generate_answers(trained[0], "--input", contexts, "--output", contexts, "--overwrite")

    assert result.exit_code == 2
    assert result.stderr.strip() == (
        f"error: --output {contexts} would replace the input {contexts}"
    )
    assert contexts.read_text() == CONTEXTS


def test_an_answers_file_that_is_a_folder_is_one_line(trained, tmp_path):
    contexts, folder = tmp_path / "c.jsonl", tmp_path / "answers"
    contexts.write_text(CONTEXTS)
    (folder / "inside").mkdir(parents=True)

    result = generate_answers(trained[0], "--input", contexts, "--output", folder, "--overwrite")

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
    result = generate_answers(trained[0], "--input", contexts, "--output", answers, "--overwrite")

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

    from_file = generate_answers(trained[0], "--input", contexts)
    from_stdin = generate_answers(
        trained[0], "--input", "-", input=b"\xef\xbb\xbf" + CONTEXTS.encode()
    )
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
