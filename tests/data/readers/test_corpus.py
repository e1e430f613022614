from __future__ import annotations

import gzip
import json

import pytest

from convcli.data.readers import BadRecord, Corpus, Dialogue, detect_format


def records(*paths, format="auto"):
    return list(Corpus([str(p) for p in paths], format))


def dialogues(*paths, format="auto"):
    out = records(*paths, format=format)
    assert all(isinstance(r, Dialogue) for r in out), out
    return out


def test_jsonl_both_forms_with_lines_and_stripped_turns(tmp_path):
    path = tmp_path / "a.jsonl"
    lines = [json.dumps(["Hello", " Hi there "]), "", json.dumps({"turns": ["こんにちは", "はい"]})]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    got = dialogues(path)
    assert [d.turns for d in got] == [["Hello", "Hi there"], ["こんにちは", "はい"]]
    assert [d.line for d in got] == [1, 3]
    assert got[0].weights is None and got[0].source == str(path)


def test_tsv_weighted_and_raw(tmp_path):
    weighted = tmp_path / "w.tsv"
    weighted.write_text("0.0 a b EOS 1.0 c d\t1.0 e f\n0.0 x\t0.0 y\n", encoding="utf-8")
    got = dialogues(weighted)
    assert [d.turns for d in got] == [["a b", "c d", "e f"], ["x", "y"]]
    assert [d.weights for d in got] == [[0.0, 1.0, 1.0], [0.0, 0.0]]
    raw = tmp_path / "r.tsv"  # a reply starting with a number is text, not a weight
    raw.write_text("how old are you ?\t20 years old .\nhi EOS hello\t1.5 million\n")
    got = dialogues(raw)
    assert [d.turns for d in got] == [
        ["how old are you ?", "20 years old ."],
        ["hi", "hello", "1.5 million"],
    ]
    assert [d.weights for d in got] == [[0.0, 1.0], [0.0, 0.0, 1.0]]


def test_the_real_dialogpt_tsv(tmp_path):
    from tests.conftest import DIALOGPT_DATA

    if not (DIALOGPT_DATA / "train_raw.tsv").is_file():
        pytest.skip(f"the DialoGPT sample data is not at {DIALOGPT_DATA} (../shared is absent)")
    got = records(DIALOGPT_DATA / "train_raw.tsv")
    assert len(got) == 10000 and all(isinstance(d, Dialogue) for d in got)
    assert got[0].turns == ["what are you doing for a living ?", "i am a admin ."]


def test_plain_text_blocks(tmp_path):
    path = tmp_path / "t.txt"
    path.write_text("\nHello\nHi\n\n\n  \nA\nB\nC\n", encoding="utf-8")
    got = dialogues(path)
    assert [(d.turns, d.line) for d in got] == [(["Hello", "Hi"], 2), (["A", "B", "C"], 7)]


def test_gzip_globs_several_files_and_format_override(tmp_path):
    with gzip.open(tmp_path / "a.jsonl.gz", "wt", encoding="utf-8") as f:
        f.write(json.dumps(["one", "two"]) + "\n")
    (tmp_path / "b.data").write_text("x\ty\n")  # unknown extension: sniffed as TSV
    (tmp_path / "c.jsonl").write_text(json.dumps(["p", "q"]) + "\n")
    corpus = Corpus([str(tmp_path / "*.jsonl*"), str(tmp_path / "b.data")])
    got = list(corpus)
    assert [d.turns for d in got] == [["one", "two"], ["p", "q"], ["x", "y"]]
    assert corpus.bytes_read == corpus.total_bytes > 0
    assert list(corpus.formats.values()) == ["jsonl", "jsonl", "tsv"]
    text = tmp_path / "d.tsv"
    text.write_text("x\ty\nz\tw\n")
    assert [d.turns for d in dialogues(text, format="text")] == [["x\ty", "z\tw"]]


def test_detect_format():
    from pathlib import Path

    assert detect_format(Path("a.TSV.gz")) == "tsv"
    assert detect_format(Path("a"), '{"turns": []}') == "jsonl"
    assert detect_format(Path("a.dat"), "hello") is None  # no format fits


BAD = [
    # (file name, content, reason, message after "file:line: ")
    ("a.jsonl", b'["ok", "fine"]\n[1, 2\n', "malformed-json", "2: malformed JSON"),
    ("a.jsonl", b'{"turns": [1, 2]}\n', "not-turns", "1: expected a JSON array of strings"),
    ("a.jsonl", b'"just text"\n', "not-turns", "1: expected a JSON array of strings"),
    ("a.jsonl", b'["hi", "  "]\n', "empty-turn", "1: turn 2 is empty"),
    ("a.jsonl", b'["alone"]\n', "one-turn", "1: a dialogue needs at least 2 turns"),
    ("a.tsv", b"a\tb\nno tab here\n", "no-tab", "2: expected `context<TAB>response`, found no tab"),
    ("a.tsv", b"a\tb\tc\n", "several-tabs", "1: expected `context<TAB>response`, found 2 tabs"),
    ("a.tsv", b"0.0 a\t1.0 b\na\t1.0 b\n", "bad-weight", "2: turn 1 has no weight"),
    ("a.tsv", b"a EOS \tb\n", "empty-turn", "1: turn 2 is empty"),
    ("a.txt", b"hi\nthere\n\nlonely\n", "one-turn", "4: a dialogue needs at least 2 turns"),
    ("a.jsonl", b'["caf\xe9", "x"]\n', "invalid-utf8", "1: invalid UTF-8 (byte 0xe9 at column 6)"),
    ("a.txt", b"ok\nnul\x00here\n", "nul-byte", "2: NUL byte at column 4"),
    ("a.tsv", b"", "empty-file", "empty file"),
    ("a.jsonl", b"\n \n", "empty-file", "empty file"),
]


@pytest.mark.parametrize(("name", "content", "reason", "message"), BAD)
def test_bad_input_names_file_line_and_reason(tmp_path, name, content, reason, message):
    path = tmp_path / name
    path.write_bytes(content)
    bad = [r for r in records(path) if isinstance(r, BadRecord)]
    assert len(bad) == 1 and bad[0].reason == reason
    separator = ":" if bad[0].line else ": "
    assert str(bad[0].error()).startswith(f"{path}{separator}{message}")


def test_missing_file_and_unmatched_glob(tmp_path):
    got = records(tmp_path / "nope.jsonl", tmp_path / "*.none")
    assert [(r.reason, str(r.error())) for r in got] == [
        ("missing-file", f"{tmp_path / 'nope.jsonl'}: file not found"),
        ("missing-file", f"{tmp_path / '*.none'}: no file matches"),
    ]


def test_a_bad_line_in_a_text_block_spoils_only_that_dialogue(tmp_path):
    path = tmp_path / "t.txt"
    path.write_bytes(b"a\nb\n\nc\n\xff\nd\n\ne\nf\n")
    got = records(path)
    assert [type(r).__name__ for r in got] == ["Dialogue", "BadRecord", "Dialogue"]
    assert got[1].line == 5 and got[2].turns == ["e", "f"]


def test_any_chunk_size_gives_the_same_records(tmp_path):
    from convcli.data.readers import parse_chunk

    (tmp_path / "t.txt").write_bytes(
        b"\xef\xbb\xbfhi\nthere\r\n\r\nx\n\xe3\x80\x80\ny\nz\n \t\n\n\xffbad\nw\n\nlast\none"
    )
    (tmp_path / "w.tsv").write_bytes(  # the first good line (4) decides: weights
        b"\n\xff\tbad utf-8\nno tab\n0.0 a EOS 1.0 b\t1.0 c\nd\t0.0 e\n0.0 f\t1.0 g\n"
    )
    lines = b"".join(json.dumps([f"q{i}", f"a{i}"]).encode() + b"\n" for i in range(400))
    (tmp_path / "cut.jsonl.gz").write_bytes(gzip.compress(lines)[:-40])  # truncated
    paths = [tmp_path / n for n in ("t.txt", "w.tsv", "cut.jsonl.gz")]
    expected = records(*paths)
    summary = [
        (r.turns if isinstance(r, Dialogue) else r.reason, r.line, getattr(r, "weights", None))
        for r in expected
    ]
    assert summary[:10] == [
        (["hi", "there"], 1, None), ("one-turn", 4, None), (["y", "z"], 6, None),
        ("invalid-utf8", 10, None), (["last", "one"], 13, None),
        ("invalid-utf8", 2, None), ("no-tab", 3, None), (["a", "b", "c"], 4, [0.0, 1.0, 1.0]),
        ("bad-weight", 5, None), (["f", "g"], 6, [0.0, 1.0]),
    ]  # fmt: skip
    read = len(summary) - 11  # JSONL lines before the damage: all kept
    assert 300 < read < 400 and summary[-1][:2] == ("unreadable", read + 1)
    for size in (1, 7, 100):
        chunks = list(Corpus([str(p) for p in paths]).chunks(size))
        assert len(chunks) > 10
        got = [r for c in chunks for r in ([c] if isinstance(c, BadRecord) else parse_chunk(c))]
        assert got == expected


def test_globs_expand_a_quoted_home_directory(tmp_path, monkeypatch):
    from convcli.data.readers import expand_inputs

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d").mkdir()
    for name in ("b.jsonl", "a.jsonl", "c.txt"):
        (tmp_path / "d" / name).write_text("[]\n")
    files, missing = expand_inputs(["~/d/*.jsonl", "~/d/none*.tsv"])
    assert [f.name for f in files] == ["a.jsonl", "b.jsonl"]
    assert missing == ["~/d/none*.tsv"]
