"""The newer formats: chat messages, ShareGPT (JSONL and JSON arrays), roles and masks."""

from __future__ import annotations

import gzip
import json
import re

import numpy as np
import pytest

from convcli.data.prepare import PrepareSettings, prepare
from convcli.data.readers import Corpus, Dialogue, ReadOptions
from convcli.data.shards import Shards
from convcli.training.datamodule import select_labels

SYSTEM = {"role": "system", "content": "Be brief."}


def msg(role, content, **extra):
    return {"role": role, "content": content, **extra}


def chat(*pairs):
    return {"messages": [msg(r, c) for r, c in pairs]}


def write_lines(path, records):
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


def records(*paths, format="auto", **options):
    return list(Corpus([str(p) for p in paths], format, ReadOptions(**options)))


def summary(got):
    return [
        (r.turns, r.roles, r.weights, r.line) if isinstance(r, Dialogue) else (r.reason, r.line)
        for r in got
    ]


def test_chat_messages_give_turns_roles_and_weights(tmp_path):
    path = write_lines(
        tmp_path / "chat.jsonl",
        [
            {"messages": [SYSTEM, msg("user", "Hello"), msg("assistant", " Hi there ")]},
            chat(("user", "a"), ("assistant", "b"), ("user", "c"), ("assistant", "d")),
            {"messages": [msg("user", "x"), msg("assistant", "no", weight=0), msg("user", "y"),
                          msg("assistant", "yes", weight=1)]},
        ],
    )  # fmt: skip
    corpus = Corpus([str(path)])
    assert corpus.formats == {str(path): "messages"}
    assert summary(list(corpus)) == [
        (["Be brief.", "Hello", "Hi there"], ["system", "user", "assistant"], [0, 0, 1], 1),
        (["a", "b", "c", "d"], ["user", "assistant"] * 2, [0, 1, 0, 1], 2),
        (["x", "no", "y", "yes"], ["user", "assistant"] * 2, [0, 0, 0, 1], 3),
    ]


def test_same_role_turns_join_or_split_and_are_counted(tmp_path):
    path = write_lines(
        tmp_path / "c.jsonl",
        [chat(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Yes"))],
    )
    (joined,) = records(path)
    assert joined.turns == ["Hi\nAnyone?", "Yes"] and joined.joined == 1
    (split,) = records(path, same_role="split")
    assert split.turns == ["Hi", "Anyone?", "Yes"] and split.roles == ["user", "user", "assistant"]
    assert split.joined == 1


def test_sharegpt_lines_and_a_pretty_printed_json_array(tmp_path):
    convo = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}
    lines = write_lines(tmp_path / "s.jsonl", [convo, {**convo, "system": "Be kind."}])
    assert summary(records(lines)) == [
        (["Hello", "Hi"], ["user", "assistant"], [0, 1], 1),
        (["Be kind.", "Hello", "Hi"], ["system", "user", "assistant"], [0, 0, 1], 2),
    ]
    array = tmp_path / "s.json"
    array.write_text(json.dumps([convo] * 3, indent=2), encoding="utf-8")
    corpus = Corpus([str(array)])
    assert corpus.formats == {str(array): "sharegpt"}
    got = list(corpus)
    step = json.dumps([convo], indent=2).count("\n") - 1  # lines per element
    assert [(d.turns, d.line) for d in got] == [(["Hello", "Hi"], 2 + i * step) for i in range(3)]
    # Any chunk size gives the same records, gzipped too.
    gz = tmp_path / "s.json.gz"
    gz.write_bytes(gzip.compress(array.read_bytes()))
    for size in (1, 50, 1 << 20):
        chunks = list(Corpus([str(gz)]).chunks(size))
        from convcli.data.readers import parse_chunk

        again = [r for c in chunks for r in parse_chunk(c)]
        assert [(d.turns, d.line) for d in again] == [(d.turns, d.line) for d in got]


BAD = [
    # (records, reason, message after "file:line: ")
    ([{"messages": [msg("user", "hi"), {"content": "x"}]}], "no-role",
     '1: message 2 has no "role"'),
    ([{"messages": [msg("user", "hi"), msg("tool", "x")]}], "unknown-role",
     "1: message 2: unknown role 'tool' (known: assistant, system, user)"),
    ([{"messages": [msg("user", "hi"), msg("assistant", ["x"])]}], "not-text",
     '1: message 2 has a non-string "content"'),
    ([{"messages": [msg("user", "hi"), msg("assistant", None)]}], "not-text",
     '1: message 2 has no "content"'),
    ([{"messages": [msg("user", "hi"), msg("assistant", "  ")]}], "empty-turn",
     "1: message 2 is empty"),
    ([{"messages": []}], "not-turns", '1: expected an object with a non-empty "messages" array'),
    ([{"messages": ["hi", "there"]}], "not-turns", "1: message 1 is not an object"),
    ([{"messages": [SYSTEM, msg("user", "hi")]}], "one-turn",
     "1: a dialogue needs at least 2 turns besides the system message, this one has 1"),
    ([chat(("user", "a"), ("user", "b"))], "one-turn",
     "1: a dialogue needs at least 2 turns besides the system message, this one has 1"),
]  # fmt: skip


@pytest.mark.parametrize(("lines", "reason", "message"), BAD)
def test_bad_messages_name_file_line_and_reason(tmp_path, lines, reason, message):
    path = write_lines(tmp_path / "m.jsonl", [chat(("user", "ok"), ("assistant", "fine")), *lines])
    got = records(path, format="messages")
    assert isinstance(got[0], Dialogue) and len(got) == 2
    assert got[1].reason == reason
    assert str(got[1].error()) == f"{path}:{message.replace('1:', '2:', 1)}"


@pytest.mark.parametrize(
    ("text", "reason", "line", "kept"),
    [
        ('[{"conversations": []},\n  {"conversations": [}\n]', "malformed-json", 2, 1),
        ('[{"conversations": []}\n  {"x": 1}]', "malformed-json", 2, 1),
        ('[{"conversations": []}', "malformed-json", 1, 1),
        ('[{"conversations": []}] trailing', "malformed-json", 1, 1),
        ("[ ]", "empty-file", None, 0),
    ],
)
def test_a_broken_json_array_ends_its_file_with_the_line(tmp_path, text, reason, line, kept):
    path = tmp_path / "s.json"
    path.write_text(text, encoding="utf-8")
    got = records(path, format="sharegpt")
    assert [r.reason for r in got[:kept]] == ["not-turns"] * kept  # the elements before
    assert got[-1].reason == reason and got[-1].line == line, got


@pytest.fixture
def gpt2_run(tmp_path, gpt2_tokenizer_dir):
    def run(path, **options):
        return prepare(
            PrepareSettings(
                inputs=[str(path)], output=tmp_path / "out", tokenizer=str(gpt2_tokenizer_dir),
                workers=1, valid_fraction=0.0, **options,
            )
        )  # fmt: skip

    return run


def test_roles_decide_the_trained_tokens_exactly(tmp_path, gpt2_run):
    path = write_lines(
        tmp_path / "chat.jsonl",
        [{"messages": [SYSTEM, msg("user", "Hello"), msg("assistant", "Hi there"),
                       msg("user", "Bye"), msg("assistant", "Bye now")]}],
    )  # fmt: skip
    result = gpt2_run(path)
    example = Shards(result.output).split("train")[0]
    sep, x = 50256, -100
    assert example.ids.tolist() == [
        sep, 3856, 4506, 13, sep, 15496, sep, 17250, 612, sep, 3886, 68, sep, 3886, 68, 783, sep,
    ]  # fmt: skip
    # System and user turns are context; the assistant's tokens and the sep that ends each
    # of its turns are trained, with `train_on` responses and weights alike.
    expected = [x, x, x, x, x, x, x, 17250, 612, sep, x, x, x, 3886, 68, 783, sep]
    for train_on in ("responses", "weights"):
        labels = select_labels(example.ids, example.mask, train_on)
        assert labels.tolist() == expected, train_on
    assert np.count_nonzero(select_labels(example.ids, example.mask, "all") != x) == 16


def test_prepare_counts_same_role_turns_and_says_the_format(tmp_path, gpt2_run):
    path = write_lines(
        tmp_path / "c.jsonl",
        [chat(("user", "Hi"), ("user", "Anyone?"), ("assistant", "Yes")), {"messages": []}],
    )
    result = gpt2_run(path, on_error="skip")
    assert result.same_role_turns == 1 and result.skipped == {"not-turns": 1}
    assert result.dialogues_read == 2 and result.dialogues_written == 1
    manifest = Shards(result.output).manifest
    assert manifest["same_role_turns"] == 1
    assert manifest["sources"][0]["format"] == "messages"


def test_speaker_transcripts_join_a_speakers_lines(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text(
        "A: Hello\nB: Hi there\nB: how are you?\nA: Fine.\n\nAnna: x\nBob: y\nAnna: z\n",
        encoding="utf-8",
    )
    corpus = Corpus([str(path)])
    assert corpus.formats == {str(path): "transcript"}
    got = list(corpus)
    assert [(d.turns, d.line, d.joined) for d in got] == [
        (["Hello", "Hi there\nhow are you?", "Fine."], 1, 1),
        (["x", "y", "z"], 6, 0),
    ]
    assert records(path, same_role="split")[0].turns == [
        "Hello",
        "Hi there",
        "how are you?",
        "Fine.",
    ]


def test_bad_transcript_lines_spoil_their_dialogue_only(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("A: hi\nB: yo\n\nA: hi\nno speaker here\n\nA: a\nB:\n\nA: a\nB: b\n")
    got = records(path, format="transcript")
    assert summary(got) == [
        (["hi", "yo"], None, None, 1),
        ("no-speaker", 5),
        ("empty-turn", 8),
        (["a", "b"], None, None, 10),
    ]
    assert str(got[1].error()) == f"{path}:5: expected `speaker: text`, found no speaker"
    assert str(got[2].error()) == f"{path}:8: turn 2 (B) is empty"


def test_plain_text_with_colons_stays_plain_text(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("Note: tea at 5\nOK\n\nTime: now\nDate: today\nPlace: here\nWho: me\n")
    assert Corpus([str(path)]).formats == {str(path): "text"}


def test_sniffing_reads_content_where_the_extension_says_nothing(tmp_path):
    (tmp_path / "a.data").write_text(json.dumps(chat(("user", "a"), ("assistant", "b"))) + "\n")
    (tmp_path / "b").write_text("A: one\nB: two\nA: three\nB: four\nA: five\n")
    (tmp_path / "c.log").write_text("")
    corpus = Corpus([str(tmp_path / n) for n in ("a.data", "b", "c.log")])
    assert list(corpus.formats.values()) == ["messages", "transcript", "text"]
    assert [getattr(r, "reason", None) for r in corpus] == [None, None, "empty-file"]


def test_a_file_no_format_fits_is_refused_with_the_formats_and_the_way_out(tmp_path):
    from convcli.errors import InputError

    path = tmp_path / "config.yml"
    path.write_text("name: demo\nlayers: 2\nwidth: 64\nseed: 1\nsteps: 10\n")
    with pytest.raises(InputError) as caught:
        Corpus([str(path)])
    message = str(caught.value)
    assert message.startswith(f"{path}: no known format fits its extension (.yml) nor its first")
    assert "formats: jsonl (.jsonl .json .ndjson), messages (" in message
    assert "Pass `format` text to read it as plain text" in message
    assert caught.value.params == ("format",)
    assert [d.turns for d in records(path, format="text")] == [path.read_text().splitlines()]


def test_the_readme_format_table_examples_read_as_their_format(tmp_path):
    from tests.conftest import REPO

    readme = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^  \| `(\w+)` \| `\.(\w+)`[^|]*\| `([^`]+)`", readme, flags=re.M)
    checked = []
    for name, ext, line in rows:
        if name in ("text", "transcript"):
            continue  # their examples span lines
        path = tmp_path / f"{name}.{ext}"
        path.write_text(line.replace("<TAB>", "\t") + "\n", encoding="utf-8")
        corpus = Corpus([str(path)])
        assert corpus.formats == {str(path): name}
        assert all(isinstance(r, Dialogue) for r in corpus), name
        checked.append(name)
    assert checked == ["jsonl", "messages", "sharegpt", "tsv"]


def test_field_names_the_key_of_the_messages(tmp_path):
    record = {"chat": [msg("user", "Hi"), msg("assistant", "Hello")]}
    path = write_lines(tmp_path / "c.jsonl", [record])
    (got,) = records(path, format="messages", field="chat")
    assert got.turns == ["Hi", "Hello"]
    (bad,) = records(path, format="messages")
    assert bad.message == 'expected an object with a non-empty "messages" array'
    turns = write_lines(tmp_path / "t.jsonl", [{"lines": ["a", "b"]}])
    assert records(turns, format="jsonl", field="lines")[0].turns == ["a", "b"]


def test_prepare_counts_every_record_of_arrays_and_transcripts_with_two_workers(
    tmp_path, tiny_tokenizer_dir
):
    convo = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "gpt", "value": "Hi"}]}
    broken = {"conversations": [{"from": "human", "value": "Hello"}, {"from": "bot", "value": "x"}]}
    array = tmp_path / "s.json"
    array.write_text(json.dumps([convo] * 300 + [broken] + [convo] * 5, indent=1))
    transcript = tmp_path / "t.txt"
    transcript.write_text(("A: hi\nB: yo\nA: tea?\n\n" * 9 + "A: hi\nnobody\n\n") * 10)
    result = prepare(
        PrepareSettings(
            inputs=[str(array), str(transcript)], output=tmp_path / "out",
            tokenizer=str(tiny_tokenizer_dir), workers=2, on_error="skip",
        )
    )  # fmt: skip
    assert result.formats == {str(array): "sharegpt", str(transcript): "transcript"}
    assert result.skipped == {"unknown-role": 1, "no-speaker": 10}
    assert result.dialogues_read == 306 + 100
    assert result.dialogues_written + sum(result.skipped.values()) == result.dialogues_read
