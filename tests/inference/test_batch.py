from __future__ import annotations

import io
import json

import pytest

from convcli.data.readers.contexts import parse_context
from convcli.errors import InputError
from convcli.inference.batch import BatchCounts, read_items, run_batches

LINES = [
    '["Hello"]',
    "",
    '{"id": "b", "turns": ["Do you like tea?", "Yes."]}',
    "not json",
    '{"id": "c"}',
    "[]",
    '["a", 3]',
    '["last"]',
]


def test_a_context_is_read_as_the_corpus_readers_read_it():
    assert parse_context('["a", "b"]', path="f", line=1).turns == ["a", "b"]
    item = parse_context('{"turns": ["a"], "id": 7}', path="f", line=2)
    assert (item.turns, item.extra, item.line) == (["a"], {"id": 7}, 2)
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    item = parse_context(json.dumps({"id": "m", "messages": messages}), path="f", line=3)
    assert (item.turns, item.extra) == (["Be brief.", "Hi"], {"id": "m"})
    sharegpt = {"conversations": [{"from": "human", "value": "Tea?"}], "reference": "Yes"}
    item = parse_context(json.dumps(sharegpt), path="f", line=4)
    assert (item.turns, item.extra) == (["Tea?"], {"reference": "Yes"})


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        ("{", "malformed JSON"),
        ('{"id": 1}', 'an object with a "turns" array'),
        ("[]", "at least 1 turn, this one has 0"),
        ('["a", 3]', "a JSON array of strings"),
        ('"just text"', "a JSON array of strings"),
        ('{"messages": [{"role": "bot", "content": "x"}]}', "unknown role 'bot'"),
    ],
)
def test_bad_lines_name_their_line(text, reason):
    with pytest.raises(InputError, match=rf"^in\.jsonl:5: .*{reason}"):
        parse_context(text, path="in.jsonl", line=5)


def test_strict_mode_stops_at_the_first_bad_line():
    counts = BatchCounts()
    with pytest.raises(InputError, match=r"^c\.jsonl:4: malformed JSON"):
        list(read_items(LINES, path="c.jsonl", strict=True, counts=counts))


def test_skip_mode_counts_and_the_output_accounts_for_every_line():
    counts = BatchCounts()
    items = list(read_items(LINES, path="c.jsonl", strict=False, counts=counts))
    assert [i.line for i in items] == [1, 3, 8]
    assert (counts.read, counts.skipped) == (7, 4)  # the blank line is not a context
    assert [b.split(":")[1] for b in counts.bad] == ["4", "5", "6", "7"]

    batches: list[int] = []

    def answer(contexts):
        batches.append(len(contexts))
        return [{"responses": [f"re: {c[-1]}"]} for c in contexts]

    out = io.StringIO()
    run_batches(items, answer, out, batch_size=2, counts=counts)
    written = [json.loads(line) for line in out.getvalue().splitlines()]
    assert batches == [2, 1]
    assert counts.written == 3 and counts.read == counts.written + counts.skipped
    assert written[1] == {
        "id": "b",
        "line": 3,
        "context": ["Do you like tea?", "Yes."],
        "responses": ["re: Yes."],
    }
