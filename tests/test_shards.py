from __future__ import annotations

import json

import numpy as np
import pytest

from convcli.data.shards import Shards, ShardWriter, write_manifest
from convcli.errors import ConvcliError


def test_round_trip_across_several_shards(tmp_path):
    (tmp_path / "tokenizer").mkdir()
    writer = ShardWriter(tmp_path, "train", np.dtype(np.uint16), shard_tokens=10, buffer_tokens=4)
    examples = [list(range(n, n + 3 + n % 4)) for n in range(20)]
    for ex in examples:
        writer.add(ex, [n % 2 for n in ex], [1] * len(ex))
    shards = writer.close()
    assert len(shards) > 2 and sum(s["examples"] for s in shards) == 20
    write_manifest(tmp_path, {"dtype": "uint16", "splits": {"train": {"shards": shards}}})
    split = Shards(tmp_path).split("train")
    assert len(split) == 20
    assert [split[i].ids.tolist() for i in range(20)] == examples
    assert split[-1].types.tolist() == [n % 2 for n in examples[-1]]
    assert split.lengths().tolist() == [len(e) for e in examples]
    assert split.tokens == sum(map(len, examples))
    assert isinstance(split[0].ids, np.memmap)  # read from the map, not loaded


def test_add_many_equals_add_one_by_one(tmp_path):
    examples = [list(range(n, n + 3 + n % 4)) for n in range(30)]
    flat = np.array([t for ex in examples for t in ex])
    lengths = np.array([len(ex) for ex in examples])
    one, many = tmp_path / "one", tmp_path / "many"
    for path in (one, many):
        path.mkdir()
        writer = ShardWriter(path, "train", np.dtype(np.uint16), shard_tokens=25, buffer_tokens=7)
        if path == one:
            for ex in examples:
                writer.add(ex, ex, ex)
        else:
            cut = int(lengths[:8].sum())
            writer.add_many(flat[:cut], flat[:cut], flat[:cut], lengths[:8])
            writer.add_many(flat[cut:], flat[cut:], flat[cut:], lengths[8:])
        assert len(writer.close()) > 3
    assert sorted(p.name for p in one.iterdir()) == sorted(p.name for p in many.iterdir())
    for file in one.iterdir():
        assert file.read_bytes() == (many / file.name).read_bytes(), file.name


def test_manifest_that_does_not_match_its_files_is_refused(make_shards):
    path = make_shards()
    with open(path / "train-00000.ids.bin", "ab") as f:
        f.write(b"\0\0")
    with pytest.raises(ConvcliError, match=r"manifest does not match its files: train-00000\.ids"):
        Shards(path)


def test_foreign_or_missing_directories_are_refused(tmp_path):
    with pytest.raises(ConvcliError, match="shard directory not found"):
        Shards(tmp_path / "nope")
    with pytest.raises(ConvcliError, match=r"no manifest\.json"):
        Shards(tmp_path)
    (tmp_path / "manifest.json").write_text(json.dumps({"format": "other"}))
    with pytest.raises(ConvcliError, match="not a convcli shard manifest"):
        Shards(tmp_path)
