"""Reply trees (ConvoKit utterances.jsonl): paths, depth, and the skips of bad trees."""

from __future__ import annotations

import json

import pytest

from convcli.data.prepare import PrepareSettings, prepare
from convcli.data.readers import BadRecord, Corpus, Dialogue, ReadOptions, parse_chunk
from convcli.errors import InputError


def u(id, conversation, reply_to, text):
    return {"id": id, "conversation_id": conversation, "reply_to": reply_to, "text": text,
            "speaker": "s", "meta": {}}  # fmt: skip


UTTERANCES = [
    u("u1", "c1", None, "How do I brew tea?"),  # line 1
    u("u2", "c1", "u1", "Boil water."),
    u("u3", "c1", "u2", "Then?"),
    u("u4", "c1", "u3", "Steep 3 minutes."),
    u("u5", "c1", "u1", "Use a teapot."),  # line 5
    u("u6", "c1", "u2", "How hot?"),
    u("r1", "c2", None, "Hi"),
    u("r2", "c2", "r1", "Hello"),
    u("o1", "c2", "gone", "An orphan"),
    u("o2", "c2", "o1", "A reply to the orphan"),  # line 10
    u("x1", "c2", "x2", "Round"),
    u("x2", "c2", "x1", "and round"),
    u("x3", "c2", "x2", "Hanging off the cycle"),
    u("s1", "c3", None, "One root"),
    u("s2", "c3", None, "Another root"),  # line 15
    u("s3", "c3", "s1", "Reply"),
    u("l1", "c4", None, "Nobody answers"),
]


@pytest.fixture
def corpus_dir(tmp_path):
    folder = tmp_path / "tea-corpus"
    folder.mkdir()
    lines = "".join(json.dumps(x) + "\n" for x in UTTERANCES)
    (folder / "utterances.jsonl").write_text(lines, encoding="utf-8")
    (folder / "corpus.json").write_text("{}")
    return folder


def summary(records):
    return [
        (r.turns[-1], len(r.turns), r.line) if isinstance(r, Dialogue) else (r.reason, r.line)
        for r in records
    ]


def test_each_root_to_leaf_path_is_a_dialogue_and_bad_trees_are_counted(corpus_dir):
    corpus = Corpus([str(corpus_dir)])
    assert corpus.formats == {str(corpus_dir): "convokit"}
    got = list(corpus)
    assert got[0].turns == ["How do I brew tea?", "Boil water.", "Then?", "Steep 3 minutes."]
    assert summary(got) == [
        ("Steep 3 minutes.", 4, 4), ("How hot?", 3, 6), ("Use a teapot.", 2, 5),
        ("Hello", 2, 8), ("orphan", 9), ("cycle", 11),
        ("several-roots", 14),
        ("one-turn", 17),
    ]  # fmt: skip
    messages = {r.reason: str(r.error()) for r in got if isinstance(r, BadRecord)}
    source = corpus_dir / "utterances.jsonl"
    assert messages == {
        "orphan": f"{source}:9: utterance 'o1' replies to 'gone', which is not in its conversation",
        "cycle": f"{source}:11: utterances reply to each other in a cycle: 'x1' -> 'x2' -> 'x1'",
        "several-roots": (
            f"{source}:14: conversation 'c3' has 2 roots (utterances with no reply_to)"
        ),
        "one-turn": f"{source}:17: a dialogue needs at least 2 turns, this one has 1",
    }


def test_every_node_path_and_max_depth(corpus_dir):
    every = [r for r in Corpus([str(corpus_dir)], options=ReadOptions(tree_paths="all"))]
    assert summary(every)[:6] == [
        ("Boil water.", 2, 2), ("Then?", 3, 3), ("Steep 3 minutes.", 4, 4), ("How hot?", 3, 6),
        ("Use a teapot.", 2, 5), ("Hello", 2, 8),
    ]  # fmt: skip
    shallow = list(Corpus([str(corpus_dir)], options=ReadOptions(max_depth=3)))
    assert summary(shallow)[:3] == [("Then?", 3, 3), ("How hot?", 3, 6), ("Use a teapot.", 2, 5)]


def test_any_chunk_size_keeps_conversations_whole(corpus_dir):
    expected = list(Corpus([str(corpus_dir)]))
    for size in (1, 40, 300):
        chunks = list(Corpus([str(corpus_dir)]).chunks(size))
        assert len(chunks) > 1 or size == 300
        got = [r for c in chunks for r in parse_chunk(c)]
        assert got == expected, size


def test_prepare_counts_tree_skips_and_strict_names_the_line(
    tmp_path, corpus_dir, tiny_tokenizer_dir
):
    def run(**options):
        return prepare(
            PrepareSettings(
                inputs=[str(corpus_dir)], output=tmp_path / "out",
                tokenizer=str(tiny_tokenizer_dir), workers=1, overwrite=True, **options,
            )
        )  # fmt: skip

    result = run(on_error="skip")
    assert result.skipped == {"cycle": 1, "one-turn": 1, "orphan": 1, "several-roots": 1}
    assert result.dialogues_written == 4 and result.dialogues_read == 8
    assert result.manifest["sources"][0]["format"] == "convokit"
    assert result.manifest["sources"][0]["bytes"] > 0
    with pytest.raises(InputError, match=r"utterances\.jsonl:9: utterance 'o1' replies to 'gone'"):
        run()


def test_a_conversation_too_large_to_hold_is_cut_and_counted(corpus_dir, monkeypatch):
    from convcli.data.readers import REASONS, trees

    monkeypatch.setattr(trees, "MAX_CONVERSATION", 300)  # bytes: about two utterances
    got = [r for c in Corpus([str(corpus_dir)]).chunks(100) for r in parse_chunk(c)]
    assert all(r.reason in REASONS for r in got if isinstance(r, BadRecord))
    reasons = [r.reason for r in got if isinstance(r, BadRecord)]
    assert reasons.count("orphan") > 1  # replies cut from their parents, counted
    assert len(got) >= 8
