from __future__ import annotations

import gzip
import json
import random
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import yaml

from convcli.data import prepare as prepare_module
from convcli.data.examples import lay_out, sliding_windows
from convcli.data.prepare import PrepareSettings, prepare
from convcli.data.shards import Shards
from convcli.errors import ConvcliError, InputError, UsageError
from convcli.outputs import MARKER
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED, ConversationTokenizer, layout
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


# prepare's output does not depend on the worker count or on how the input is chunked.


def write_inputs(folder):
    """Every format, with bad lines, duplicates, weights, long dialogues and a .gz."""
    rng = random.Random(0)
    words = ["tea", "rain", "town", "hello", "こんにちは", "元気", "music", "walk"]

    def turn(longest=12):
        return " ".join(rng.choice(words) for _ in range(rng.randint(1, longest)))

    lines = []
    for i in range(300):
        dialogue = [turn(40 if i % 25 == 0 else 12) for _ in range(rng.randint(2, 9))]
        line = json.dumps(dialogue, ensure_ascii=False)
        if i % 37 == 3:
            line = line[:-1]  # malformed JSON
        if i % 41 == 5:
            line = json.dumps(DIALOGUES[0])  # a duplicate
        lines.append(line)
    (folder / "a.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    tsv = [
        " EOS ".join(f"{rng.choice(['0.0', '1.0'])} {turn()}" for _ in range(3)) + f"\t1.0 {turn()}"
        for _ in range(120)
    ]
    tsv[7] = "no tab"
    (folder / "b.tsv").write_text("\n".join(tsv) + "\n", encoding="utf-8")
    blocks = ["\n".join(turn() for _ in range(rng.randint(1, 4))) for _ in range(120)]
    (folder / "c.txt").write_text("\n\n".join(blocks) + "\n", encoding="utf-8")
    with gzip.open(folder / "d.jsonl.gz", "wt", encoding="utf-8") as f:
        f.writelines(json.dumps(d, ensure_ascii=False) + "\n" for d in DIALOGUES)
    return [folder / name for name in ("a.jsonl", "b.tsv", "c.txt", "d.jsonl.gz")]


def test_one_and_two_workers_write_identical_files(tmp_path, tiny_tokenizer_dir, monkeypatch):
    inputs = write_inputs(tmp_path)
    # Small chunks: dozens of tasks in flight across both workers.
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 2000)
    assert sum(p.stat().st_size for p in inputs) > 20 * 2000
    results = {}
    for workers in (1, 2):
        settings = PrepareSettings(
            inputs=[str(p) for p in inputs],
            output=tmp_path / f"out{workers}",
            tokenizer=str(tiny_tokenizer_dir),
            workers=workers,
            on_error="skip",
            dedupe=True,
            max_length=40,
            valid_fraction=0.3,
        )
        results[workers] = prepare(settings)
    one, two = (results[w].output for w in (1, 2))
    # The run went through every path: windows, truncation, duplicates, bad lines.
    manifest = results[1].manifest
    assert manifest["examples"] > manifest["dialogues_written"] > 400
    assert results[1].truncated_turns > 0
    assert manifest["skipped"]["duplicate"] >= 7 and manifest["skipped"]["malformed-json"] >= 8
    assert manifest["skipped"]["one-turn"] > 0 and manifest["skipped"]["no-tab"] == 1
    files = sorted(p.relative_to(one) for p in one.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(two) for p in two.rglob("*") if p.is_file())
    assert len([f for f in files if f.suffix == ".bin"]) == 8
    for name in files:
        if name.name in ("manifest.json", "prepare.yaml", MARKER):  # the marker: pid, time
            continue
        assert (one / name).read_bytes() == (two / name).read_bytes(), name
    # The manifest and settings differ only where the settings do: workers and output.
    manifests = [json.loads((d / "manifest.json").read_text()) for d in (one, two)]
    configs = [yaml.safe_load((d / "prepare.yaml").read_text()) for d in (one, two)]
    for m in (*manifests, *configs):
        settings = m.get("settings", m)
        del settings["workers"], settings["output"]
    assert manifests[0] == manifests[1] and configs[0] == configs[1]


def test_strict_mode_stops_at_the_first_bad_line_with_workers(
    tmp_path, tiny_tokenizer_dir, monkeypatch
):
    lines = [json.dumps([f"question {i}", f"answer {i}"]) for i in range(2000)]
    lines[1500] = '["only one turn"]'
    lines[1800] = '["broken"'
    source = tmp_path / "d.jsonl"
    source.write_text("\n".join(lines) + "\n")
    settings = PrepareSettings(
        inputs=[str(source)], output=tmp_path / "out", tokenizer=str(tiny_tokenizer_dir)
    )
    for chunk_bytes in (2000, 1 << 20):  # dozens of chunks in flight, or one
        monkeypatch.setattr(prepare_module, "CHUNK_BYTES", chunk_bytes)
        with pytest.raises(InputError) as error:
            prepare(settings)
        message = "a dialogue needs at least 2 turns, this one has 1"
        assert str(error.value) == f"{source}:1501: {message}"
        assert not (tmp_path / "out").exists()


def test_progress_counts_bytes_done_up_to_the_total(tmp_path, tiny_tokenizer_dir, monkeypatch):
    inputs = write_inputs(tmp_path)
    monkeypatch.setattr(prepare_module, "CHUNK_BYTES", 4000)
    calls = []
    settings = PrepareSettings(
        inputs=[str(p) for p in inputs],
        output=tmp_path / "out",
        tokenizer=str(tiny_tokenizer_dir),
        on_error="skip",
    )
    prepare(settings, lambda stage, done, total: calls.append((stage, done, total)))
    total = sum(p.stat().st_size for p in inputs)
    done = [d for stage, d, t in calls if stage == "prepare" and t == total]
    assert len(done) == len(calls) > 10
    assert done == sorted(done) and done[-1] == total and done[0] < total / 4


def reference(turns, weighted, windows, sep):
    """The examples of one dialogue, built with `layout` turn by turn (the contract)."""
    examples = []
    new = 0
    for start, stop in windows:
        ids, types, flags = layout(turns[start:stop], sep, weighted[start:stop])
        mask = [0]
        for t in range(start, stop):
            flag = 0
            if t >= new:  # turns before `new` were trained in an earlier window
                flag = (LOSS_RESPONSE if t else 0) | (LOSS_WEIGHTED if weighted[t] else 0)
            mask += [flag] * (len(turns[t]) + 1)
        if len(windows) == 1:
            assert mask == flags
        examples.append((ids, types, mask))
        new = stop
    return examples


@pytest.mark.parametrize("max_length", [7, 16, 1000])
@pytest.mark.parametrize("skip_long", [False, True])
def test_lay_out_gives_the_layout_of_every_window(max_length, skip_long):
    rng = random.Random(max_length)
    sep = 3
    dialogues = [
        [[rng.randint(4, 60) for _ in range(rng.randint(1, 9))] for _ in range(rng.randint(2, 7))]
        for _ in range(200)
    ]
    weighted = [[rng.random() < 0.7 for _ in d] for d in dialogues]
    valid = np.array([rng.random() < 0.3 for _ in dialogues])
    turns = [t for d in dialogues for t in d]
    examples, too_long, truncated, arrays = lay_out(
        np.array([i for t in turns for i in t], dtype=np.uint16),
        np.array([len(t) for t in turns]),
        np.array([len(d) for d in dialogues]),
        np.array([w for ws in weighted for w in ws]),
        valid,
        sep=sep,
        max_length=max_length,
        skip_long=skip_long,
    )
    expected = {"train": [], "valid": []}
    limit = max_length - 2
    for i, (d, w) in enumerate(zip(dialogues, weighted, strict=True)):
        long = sum(len(t) > limit for t in d)
        assert truncated[i] == (0 if skip_long else long)
        assert too_long[i] == (skip_long and long > 0)
        if skip_long and long:
            assert examples[i] == 0
            continue
        d = [t[:limit] for t in d]
        mine = reference(d, w, sliding_windows([len(t) for t in d], max_length), sep)
        assert examples[i] == len(mine)
        expected["valid" if valid[i] else "train"] += mine
    assert max(examples) > 1 or max_length == 1000  # windows were made
    for split, (ids, types, mask, lengths) in arrays.items():
        want = expected[split]
        assert lengths.tolist() == [len(e[0]) for e in want]
        assert ids.dtype == np.uint16 and types.dtype == mask.dtype == np.uint8
        assert ids.tolist() == [i for e in want for i in e[0]]
        assert types.tolist() == [i for e in want for i in e[1]]
        assert mask.tolist() == [i for e in want for i in e[2]]
