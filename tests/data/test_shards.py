from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from typer.testing import CliRunner

from convcli.cli.app import app
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


# Corrupt shard directories are refused by `train` before the first step, in one line
# (issue 11.8): the manifest against its schema, shard names, offsets, ids below the vocabulary.


runner = CliRunner()


def edit_manifest(change: Callable[[dict[str, Any]], None]) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        manifest = json.loads((path / "manifest.json").read_text())
        change(manifest)
        (path / "manifest.json").write_text(json.dumps(manifest))

    return edit


def edit_array(array: str, dtype: Any, index: int, value: int) -> Callable[[Path], None]:
    def edit(path: Path) -> None:
        values = np.memmap(path / f"train-00000.{array}.bin", dtype=dtype, mode="r+")
        values[index] = value
        values.flush()

    return edit


def first_shard(manifest: dict[str, Any]) -> dict[str, Any]:
    return manifest["splits"]["train"]["shards"][0]


CORRUPTIONS: dict[str, tuple[Callable[[Path], None], str]] = {
    "id outside the vocabulary": (
        edit_array("ids", np.uint16, 3, 65000),
        "shard train-00000: token id 65000 is outside the tokenizer's",
    ),
    "offset past the arrays": (
        edit_array("offsets", np.int64, -1, 10**9),
        "shard train-00000: offsets run from 0 to 1000000000, not 0 to",
    ),
    "offsets going back": (
        edit_array("offsets", np.int64, 2, 1),
        "shard train-00000: offsets go back at example 2",
    ),
    "token type out of range": (
        edit_array("types", np.uint8, 0, 7),
        "shard train-00000: token type 7 (types are 0 and 1)",
    ),
    "dtype float16": (
        edit_manifest(lambda m: m.update(dtype="float16")),
        "`dtype` is 'float16', not one of uint16, uint32",
    ),
    "dtype nonsense": (
        edit_manifest(lambda m: m.update(dtype="int7")),
        "`dtype` is 'int7', not one of uint16, uint32",
    ),
    "no splits": (edit_manifest(lambda m: m.pop("splits")), "`splits` is missing or empty"),
    "no dtype": (edit_manifest(lambda m: m.pop("dtype")), "`dtype` is None"),
    "shard without a token count": (
        edit_manifest(lambda m: first_shard(m).pop("tokens")),
        "shard train-00000: `tokens` is None, not a count",
    ),
    "shard name outside the folder": (
        edit_manifest(lambda m: first_shard(m).update(name="../../x")),
        "shard name '../../x' is not a plain file name",
    ),
    "swapped tokenizer without a fingerprint": (
        edit_manifest(lambda m: m.pop("tokenizer")),
        "the manifest records no tokenizer fingerprint",
    ),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupt_shard_directory_is_refused_before_training(corruption, make_shards, tmp_path):
    shards = make_shards()
    corrupt, message = CORRUPTIONS[corruption]
    corrupt(shards)
    run = tmp_path / "run"

    result = runner.invoke(
        app, ["train", "-d", str(shards), "--preset", "tiny", "-o", str(run), "--max-steps", "1"]
    )

    assert result.exit_code == 1, result.output
    line = result.stderr.strip()
    assert "\n" not in line and "Traceback" not in result.output
    assert line.startswith(f"error: {shards}") and message in line, line
    assert not (run / "checkpoints").exists()  # refused before any step
