from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from convcli.data.examples import sliding_windows
from convcli.data.prepare import PrepareSettings, prepare
from convcli.data.shards import Shards
from convcli.errors import ConvcliError, InputError, UsageError
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED, ConversationTokenizer
from tests.conftest import DIALOGPT_DATA, DIALOGUES, REPO


def write_jsonl(path, dialogues):
    path.write_text("".join(json.dumps(d, ensure_ascii=False) + "\n" for d in dialogues))
    return path


@pytest.fixture
def run(tmp_path, tiny_tokenizer_dir):
    """prepare(...) with the tiny tokenizer, one worker and tmp_path/out unless told."""

    def run(*inputs, **options):
        options.setdefault("output", tmp_path / "out")
        options.setdefault("tokenizer", str(tiny_tokenizer_dir))
        options.setdefault("workers", 1)
        return prepare(PrepareSettings(inputs=[str(p) for p in inputs], **options))

    return run


def decoded(path, split=None):
    shards = Shards(path)
    tokenizer = ConversationTokenizer.from_pretrained(shards.tokenizer_path)
    splits = [split] if split else ["train", "valid"]
    return [tokenizer.decode_turns(ex.ids) for s in splits for ex in shards.split(s)]


def test_round_trip_and_manifest(tmp_path, run):
    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES)
    result = run(source, valid_fraction=0.3)
    assert sorted(decoded(result.output)) == sorted(DIALOGUES)
    manifest = Shards(result.output).manifest
    assert manifest["dialogues_read"] == manifest["dialogues_written"] == len(DIALOGUES)
    assert manifest["examples"] == len(DIALOGUES) and manifest["skipped"] == {}
    assert manifest["tokens"] == sum(
        len(e) for s in ("train", "valid") for e in Shards(result.output).split(s)
    )
    assert manifest["splits"]["valid"]["examples"] > 0
    assert (
        manifest["sources"][0]["sha256"]
        and manifest["sources"][0]["bytes"] == source.stat().st_size
    )
    tokenizer = ConversationTokenizer.from_pretrained(result.output / "tokenizer")
    assert manifest["tokenizer"]["fingerprint"] == tokenizer.fingerprint()
    assert manifest["tokenizer"]["sep_token_id"] == tokenizer.sep_token_id
    assert "max_length: 1024" in (result.output / "prepare.yaml").read_text()
    assert result.dialogues_written == len(DIALOGUES) and result.tokens == manifest["tokens"]


def test_every_format_gives_the_same_examples(tmp_path, run):
    dialogues = DIALOGUES[:6]
    jsonl = write_jsonl(tmp_path / "d.jsonl", dialogues)
    (tmp_path / "d.txt").write_text("\n\n".join("\n".join(d) for d in dialogues))
    (tmp_path / "d.tsv").write_text(
        "".join(" EOS ".join(d[:-1]) + "\t" + d[-1] + "\n" for d in dialogues)
    )
    got = {
        p.suffix: sorted(decoded(run(p, output=tmp_path / p.suffix[1:]).output))
        for p in (jsonl, tmp_path / "d.txt", tmp_path / "d.tsv")
    }
    assert got[".jsonl"] == got[".txt"] == got[".tsv"] == sorted(dialogues)


def test_tsv_weights_become_loss_flags(tmp_path, run):
    (tmp_path / "w.tsv").write_text("0.0 Hello EOS 1.0 Hi there\t0.0 Me too\n")
    shards = Shards(run(tmp_path / "w.tsv").output)
    example = shards.split("train")[0]
    tokenizer = ConversationTokenizer.from_pretrained(shards.tokenizer_path)
    sep = tokenizer.sep_token_id
    hello, hi, me_too = (tokenizer.encode(t) for t in ("Hello", "Hi there", "Me too"))
    assert example.ids.tolist() == [sep, *hello, sep, *hi, sep, *me_too, sep]
    # Turn 0 (weight 0) is context; turn 1 (weight 1) is trained; turn 2 is a reply of
    # weight 0. Each sep carries the flags of the turn it closes (so a trained turn is
    # trained to end), and the opening sep closes nothing.
    context, trained, reply = 0, LOSS_RESPONSE | LOSS_WEIGHTED, LOSS_RESPONSE
    assert example.mask.tolist() == [
        0, *[context] * len(hello),
        context, *[trained] * len(hi),
        trained, *[reply] * len(me_too),
        reply,
    ]  # fmt: skip


def test_sliding_windows_cover_every_turn_once():
    assert sliding_windows([3, 3], 100) == [(0, 2)]
    lengths = [5, 6, 4, 7, 3, 5, 6]
    windows = sliding_windows(lengths, 20)
    for start, stop in windows:
        assert sum(lengths[start:stop]) + (stop - start) + 1 <= 20
    new = [stop for _, stop in windows]
    assert new == sorted(new) and new[-1] == len(lengths)
    assert windows[0][0] == 0 and all(s < e for s, e in windows)


def test_long_dialogues_become_several_examples_none_dropped(tmp_path, run, tiny_tokenizer):
    long = [f"Turn {i}: I like green tea and a small town." for i in range(12)]
    result = run(
        write_jsonl(tmp_path / "d.jsonl", [long, DIALOGUES[0]]), max_length=48, valid_fraction=0
    )
    split = Shards(result.output).split("train")
    assert result.dialogues_written == 2 and len(split) > 3
    assert max(split.lengths()) <= 48
    # Each turn after the first is trained (LOSS_RESPONSE) in exactly one example.
    trained = []
    for example in split:
        turns = tiny_tokenizer.decode_turns(example.ids)
        seps = [i for i, t in enumerate(example.ids.tolist()) if t == tiny_tokenizer.sep_token_id]
        for turn, sep in zip(turns, seps, strict=False):
            if example.mask[sep + 1] & LOSS_RESPONSE:
                trained.append(turn)
    assert sorted(trained) == sorted(long[1:] + DIALOGUES[0][1:])


def test_a_turn_over_max_length_is_truncated_or_skipped_and_counted(tmp_path, run):
    source = write_jsonl(tmp_path / "d.jsonl", [["hi", "tea " * 200], ["Hello", "Hi"]])
    truncated = run(source, max_length=20, output=tmp_path / "t")
    assert truncated.truncated_turns == 1 and truncated.dialogues_written == 2
    assert max(len(e) for s in ("train", "valid") for e in Shards(truncated.output).split(s)) <= 20
    skipped = run(source, max_length=20, long_turn="skip", output=tmp_path / "s")
    assert skipped.skipped == {"turn-too-long": 1} and skipped.dialogues_written == 1
    assert skipped.dialogues_read == 2


BAD_LINES = [
    b'["good", "one"]',
    b'["bad" "json"]',
    b'{"turns": "nope"}',
    b'["", "empty"]',
    b'["alone"]',
    b'["caf\xe9", "x"]',
    b'["nul\x00", "x"]',
    b'["good", "two"]',
]


def test_skip_mode_counts_each_reason_and_read_equals_written_plus_skipped(tmp_path, run):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    (tmp_path / "empty.jsonl").write_bytes(b"")
    (tmp_path / "bad.tsv").write_text("a\tb\nno tab\na\tb\tc\n")
    inputs = [
        tmp_path / "bad.jsonl",
        tmp_path / "empty.jsonl",
        tmp_path / "bad.tsv",
        tmp_path / "missing.txt",
    ]
    result = run(*inputs, on_error="skip")
    assert result.skipped == {
        "empty-file": 1,
        "empty-turn": 1,
        "invalid-utf8": 1,
        "malformed-json": 1,
        "missing-file": 1,
        "no-tab": 1,
        "not-turns": 1,
        "nul-byte": 1,
        "one-turn": 1,
        "several-tabs": 1,
    }
    assert result.dialogues_written == 3
    manifest = Shards(result.output).manifest
    assert (
        manifest["dialogues_read"]
        == 3 + 10
        == manifest["dialogues_written"] + sum(manifest["skipped"].values())
    )


def test_strict_mode_stops_at_the_first_bad_line_and_writes_nothing(tmp_path, run):
    (tmp_path / "bad.jsonl").write_bytes(b"\n".join(BAD_LINES) + b"\n")
    with pytest.raises(InputError) as error:
        run(tmp_path / "bad.jsonl")
    assert str(error.value).startswith(f"{tmp_path / 'bad.jsonl'}:2: malformed JSON")
    assert not (tmp_path / "out").exists() and list(tmp_path.iterdir()) == [tmp_path / "bad.jsonl"]


def test_dedupe_counts_duplicates(tmp_path, run):
    result = run(write_jsonl(tmp_path / "d.jsonl", DIALOGUES), dedupe=True)
    unique = len({tuple(d) for d in DIALOGUES})
    assert result.dialogues_written == unique
    assert result.skipped == {"duplicate": len(DIALOGUES) - unique}


def test_refuses_to_overwrite_unless_asked(tmp_path, run):
    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES)
    run(source)
    with pytest.raises(ConvcliError, match=r"already exists \(pass `overwrite`"):
        run(source)
    assert run(source, overwrite=True, max_length=64).output == tmp_path / "out"
    assert Shards(tmp_path / "out").manifest["max_length"] == 64


def test_a_crash_mid_write_leaves_nothing_and_a_rerun_succeeds(tmp_path, run, monkeypatch):
    from convcli.data import shards

    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES)
    calls = []

    def crash(self, *args):
        calls.append(1)
        if len(calls) > 1:  # the train split is on disk, valid is not
            raise KeyboardInterrupt
        return original(self, *args)

    original = shards.ShardWriter.add_many
    monkeypatch.setattr(shards.ShardWriter, "add_many", crash)
    with pytest.raises(KeyboardInterrupt):
        run(source)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d.jsonl"]
    monkeypatch.setattr(shards.ShardWriter, "add_many", original)
    assert len(decoded(run(source).output)) == len(DIALOGUES)


@pytest.mark.slow
def test_a_killed_run_leaves_no_directory_a_reader_accepts(tmp_path, tiny_tokenizer_dir):
    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES * 400)
    script = textwrap.dedent(f"""
        import os, signal
        from convcli.data.prepare import PrepareSettings, prepare
        def progress(stage, done, total):
            if stage == "prepare" and done > 0.7 * total:  # mid-run: shards begun
                os.kill(os.getpid(), signal.SIGKILL)
        prepare(PrepareSettings(inputs=[{str(source)!r}], output={str(tmp_path / "out")!r},
                tokenizer={str(tiny_tokenizer_dir)!r}, workers=2), progress)
    """)
    killed = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert killed.returncode == -9
    assert not (tmp_path / "out").exists()
    leftovers = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert leftovers and any(leftovers[0].glob("train-00000.*"))  # killed after writing began
    for leftover in leftovers:
        with pytest.raises(ConvcliError, match="not a shard directory"):
            Shards(leftover)
    settings = PrepareSettings(
        inputs=[str(source)], output=tmp_path / "out", tokenizer=str(tiny_tokenizer_dir)
    )
    assert prepare(settings).dialogues_written == len(DIALOGUES) * 400


def test_the_split_is_stable_across_runs_worker_counts_and_order(tmp_path, run):
    many = [[f"Question {i}?", f"Answer {i}."] for i in range(300)]
    source = write_jsonl(tmp_path / "d.jsonl", many)
    one = run(source, workers=1, output=tmp_path / "one", valid_fraction=0.2)
    two = run(source, workers=2, output=tmp_path / "two", valid_fraction=0.2)
    again = run(source, workers=2, output=tmp_path / "again", valid_fraction=0.2)
    for name in (
        "train-00000.ids.bin",
        "valid-00000.ids.bin",
        "train-00000.mask.bin",
        "valid-00000.offsets.bin",
    ):
        assert (
            (one.output / name).read_bytes()
            == (two.output / name).read_bytes()
            == (again.output / name).read_bytes()
        )
    assert 30 < one.splits["valid"]["dialogues"] < 90
    shuffled = write_jsonl(tmp_path / "r.jsonl", [*many[::-1], ["new", "one"]])
    other = run(shuffled, output=tmp_path / "rev", valid_fraction=0.2)
    valid = [d for d in decoded(other.output, "valid") if d != ["new", "one"]]
    assert sorted(valid) == sorted(decoded(one.output, "valid"))


def test_trains_its_own_tokenizer(tmp_path):
    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES)
    settings = PrepareSettings(
        inputs=[str(source)],
        output=tmp_path / "out",
        train_tokenizer=True,
        vocab_size=300,
        workers=1,
    )
    result = prepare(settings)
    assert sorted(decoded(result.output)) == sorted(DIALOGUES)
    manifest = Shards(result.output).manifest
    assert manifest["tokenizer"]["vocab_size"] <= 300 and manifest["dtype"] == "uint16"


def test_gpt2_vocabulary_on_dialogpt_data(tmp_path, gpt2_tokenizer_dir):
    lines = (DIALOGPT_DATA / "train_raw.tsv").read_text().splitlines()[:40]
    (tmp_path / "d.tsv").write_text("\n".join(lines) + "\n")
    settings = PrepareSettings(
        inputs=[str(tmp_path / "d.tsv")],
        output=tmp_path / "out",
        tokenizer=str(gpt2_tokenizer_dir),
        valid_fraction=0,
        workers=2,
    )
    result = prepare(settings)
    first = Shards(result.output).split("train")[0]
    tokenizer = ConversationTokenizer.from_pretrained(gpt2_tokenizer_dir)
    context, response = lines[0].split("\t")
    assert first.ids.tolist() == tokenizer([context, response])["input_ids"]
    assert first.ids[0] == first.ids[-1] == 50256 and first.ids.dtype.name == "uint16"
    # Raw DialoGPT lines: the context is not trained on, the response is.
    assert set(first.mask[: len(tokenizer.encode(context)) + 2].tolist()) == {0}
    assert set(first.mask[len(tokenizer.encode(context)) + 2 :].tolist()) == {
        LOSS_RESPONSE | LOSS_WEIGHTED
    }
    assert result.manifest["tokenizer"]["vocab_size"] == 50257


def test_option_errors_are_usage_errors(tmp_path, run):
    source = write_jsonl(tmp_path / "d.jsonl", DIALOGUES)
    with pytest.raises(UsageError, match="`tokenizer` or `train_tokenizer`, not both"):
        run(source, train_tokenizer=True)
    with pytest.raises(UsageError, match="`valid_fraction`"):
        run(source, valid_fraction=1.5)
    with pytest.raises(UsageError, match="`max_length`"):
        run(source, max_length=2)
