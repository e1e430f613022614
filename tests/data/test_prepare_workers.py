"""prepare's output does not depend on the worker count or on how the input is chunked."""

from __future__ import annotations

import gzip
import json
import random

import numpy as np
import pytest
import yaml

from convcli.data import prepare as prepare_module
from convcli.data.examples import lay_out, sliding_windows
from convcli.data.prepare import PrepareSettings, prepare
from convcli.errors import InputError
from convcli.outputs import MARKER
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED, layout
from tests.conftest import DIALOGUES


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
