"""Shard directories: the output of `prepare` and the input of `train`.

    DIR/manifest.json            format, counts, sources, tokenizer fingerprint, shard list
    DIR/tokenizer/               the tokenizer the ids were made with
    DIR/train-00000.ids.bin      token ids, flat (uint16 when the vocabulary fits, else uint32)
    DIR/train-00000.types.bin    token type ids (uint8)
    DIR/train-00000.mask.bin     loss flags (uint8, LOSS_* bits of convcli.tokenizer)
    DIR/train-00000.offsets.bin  int64 start of each example, plus the end (examples + 1)
    DIR/valid-00000.*            the same for the validation split

Like nanoGPT's `.bin` files the arrays are raw and memory-mapped, so a reader
touches only the examples it reads; unlike them, example boundaries, turn types
and which tokens are trained on are kept.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from convcli.errors import ConvcliError

FORMAT = "convcli-shards"
VERSION = 1
MANIFEST = "manifest.json"
TOKENIZER_DIR = "tokenizer"
SPLITS = ("train", "valid")
ARRAYS = {"ids": None, "types": np.uint8, "mask": np.uint8, "offsets": np.int64}


def ids_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def _file(directory: Path, shard: str, array: str) -> Path:
    return directory / f"{shard}.{array}.bin"


@dataclass(frozen=True)
class Example:
    """One training example: a laid-out conversation (views into the memory map)."""

    ids: np.ndarray
    types: np.ndarray
    mask: np.ndarray

    def __len__(self) -> int:
        return len(self.ids)


class ShardWriter:
    """Streams the examples of one split into numbered shard files.

    Memory stays bounded by `buffer_tokens`; a new shard starts after `shard_tokens`.
    """

    def __init__(
        self,
        directory: Path,
        split: str,
        dtype: np.dtype,
        shard_tokens: int = 2**28,
        buffer_tokens: int = 2**20,
    ) -> None:
        self.directory, self.split, self.dtype = Path(directory), split, np.dtype(dtype)
        self.shard_tokens, self.buffer_tokens = shard_tokens, buffer_tokens
        self.shards: list[dict[str, Any]] = []
        self._files: dict[str, Any] = {}
        self._buffers: dict[str, list[np.ndarray]] = {}
        self._buffered = 0
        self._offset = 0  # tokens in the current shard
        self._examples = 0  # examples in the current shard

    def add(self, ids: Sequence[int], types: Sequence[int], mask: Sequence[int]) -> None:
        if not len(ids) == len(types) == len(mask):
            raise ValueError("ids, types and mask must have the same length")
        if not self._files:
            self._open()
        self._offset += len(ids)
        self._examples += 1
        for array, values in (("ids", ids), ("types", types), ("mask", mask)):
            self._buffers[array].append(np.asarray(values, dtype=ARRAYS[array] or self.dtype))
        self._buffers["offsets"].append(np.array([self._offset], dtype=np.int64))
        self._buffered += len(ids)
        if self._buffered >= self.buffer_tokens:
            self._flush()
        if self._offset >= self.shard_tokens:
            self._close_shard()

    def add_many(
        self, ids: np.ndarray, types: np.ndarray, mask: np.ndarray, lengths: np.ndarray
    ) -> None:
        """Append several examples given as flat arrays and their lengths (same as `add`
        for each, but without a Python call per example)."""
        if not len(ids) == len(types) == len(mask) == int(np.sum(lengths)):
            raise ValueError("ids, types and mask must have the same length, sum(lengths)")
        lengths = np.asarray(lengths, dtype=np.int64)
        start = 0
        while len(lengths):
            if not self._files:
                self._open()
            ends = self._offset + np.cumsum(lengths)
            # As `add`: the shard closes after the example that reaches shard_tokens.
            full = int(np.searchsorted(ends, self.shard_tokens, side="left"))
            count = min(full + 1, len(lengths))
            stop = start + int(ends[count - 1] - self._offset)
            for array, values in (("ids", ids), ("types", types), ("mask", mask)):
                dtype = ARRAYS[array] or self.dtype
                self._buffers[array].append(np.asarray(values[start:stop], dtype=dtype))
            self._buffers["offsets"].append(ends[:count])
            self._buffered += stop - start
            self._offset = int(ends[count - 1])
            self._examples += count
            start, lengths = stop, lengths[count:]
            if self._buffered >= self.buffer_tokens:
                self._flush()
            if self._offset >= self.shard_tokens:
                self._close_shard()

    def close(self) -> list[dict[str, Any]]:
        """Finish the last shard; returns the shard entries for the manifest."""
        if self._files:
            self._close_shard()
        return self.shards

    @property
    def name(self) -> str:
        return f"{self.split}-{len(self.shards):05d}"

    def _open(self) -> None:
        # Open across add() calls; closed by _close_shard.
        self._files = {a: open(_file(self.directory, self.name, a), "wb") for a in ARRAYS}  # noqa: SIM115
        self._buffers = {a: [] for a in ARRAYS}
        self._buffers["offsets"].append(np.zeros(1, dtype=np.int64))
        self._offset = self._examples = 0

    def _flush(self) -> None:
        for array, chunks in self._buffers.items():
            if chunks:
                np.concatenate(chunks).tofile(self._files[array])
                chunks.clear()
        self._buffered = 0

    def _close_shard(self) -> None:
        self._flush()
        for handle in self._files.values():
            handle.close()
        self.shards.append({"name": self.name, "examples": self._examples, "tokens": self._offset})
        self._files = {}


class ShardSplit(Sequence[Example]):
    """Random access to the examples of one split, across its shards, via memory maps."""

    def __init__(self, directory: Path, shards: list[dict[str, Any]], dtype: np.dtype) -> None:
        self._maps = [
            {a: np.memmap(_file(directory, s["name"], a), dtype=ARRAYS[a] or dtype, mode="r")
             for a in ARRAYS}
            for s in shards if s["examples"]
        ]  # fmt: skip
        counts = [len(m["offsets"]) - 1 for m in self._maps]
        self._starts = np.cumsum([0, *counts])
        self.tokens = sum(int(m["offsets"][-1]) for m in self._maps)

    def __len__(self) -> int:
        return int(self._starts[-1])

    def __getitem__(self, index: int) -> Example:  # type: ignore[override]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        shard = int(np.searchsorted(self._starts, index, side="right")) - 1
        maps, local = self._maps[shard], index - int(self._starts[shard])
        start, end = int(maps["offsets"][local]), int(maps["offsets"][local + 1])
        return Example(maps["ids"][start:end], maps["types"][start:end], maps["mask"][start:end])

    def __iter__(self) -> Iterator[Example]:
        return (self[i] for i in range(len(self)))

    def lengths(self) -> np.ndarray:
        """The token length of every example (int32), for bucketing by length."""
        if not self._maps:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([np.diff(m["offsets"]).astype(np.int32) for m in self._maps])


class Shards:
    """An opened, validated shard directory."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.manifest = read_manifest(self.path)
        self.dtype = np.dtype(self.manifest["dtype"])
        self._splits: dict[str, ShardSplit] = {}

    @property
    def tokenizer_path(self) -> Path:
        return self.path / TOKENIZER_DIR

    def split(self, name: str) -> ShardSplit:
        if name not in self.manifest["splits"]:
            raise ConvcliError(
                f"{self.path}: no split {name!r} (have {', '.join(self.manifest['splits'])})"
            )
        if name not in self._splits:
            shards = self.manifest["splits"][name]["shards"]
            self._splits[name] = ShardSplit(self.path, shards, self.dtype)
        return self._splits[name]


def read_manifest(path: Path) -> dict[str, Any]:
    """Read and check a shard directory's manifest against its files (cheap: sizes only)."""
    manifest_path = path / MANIFEST
    if not path.is_dir():
        raise ConvcliError(f"shard directory not found: {path}")
    if not manifest_path.is_file():
        raise ConvcliError(f"{path}: not a shard directory (no {MANIFEST}; run `convcli prepare`)")
    try:
        manifest = json.loads(manifest_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise ConvcliError(f"{manifest_path}: not valid JSON: {exc}") from exc
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ConvcliError(f"{manifest_path}: not a convcli shard manifest")
    if manifest.get("version", 0) > VERSION:
        raise ConvcliError(
            f"{manifest_path}: shard format {manifest['version']} is newer than this convcli "
            f"reads ({VERSION}); upgrade convcli"
        )
    check_manifest(manifest, manifest_path)
    dtype = np.dtype(manifest["dtype"])
    for split in manifest["splits"].values():
        for shard in split["shards"]:
            for array, count in (
                ("ids", shard["tokens"]), ("types", shard["tokens"]),
                ("mask", shard["tokens"]), ("offsets", shard["examples"] + 1),
            ):  # fmt: skip
                file = _file(path, shard["name"], array)
                expected = count * (np.dtype(ARRAYS[array] or dtype).itemsize)
                actual = file.stat().st_size if file.is_file() else None
                if actual != expected:
                    found = "missing" if actual is None else f"{actual} bytes"
                    raise ConvcliError(
                        f"{path}: manifest does not match its files: {file.name} is {found}, "
                        f"expected {expected} bytes"
                    )
    if not (path / TOKENIZER_DIR).is_dir():
        raise ConvcliError(f"{path}: the tokenizer folder is missing")
    return manifest


IDS_DTYPES = ("uint16", "uint32")
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*")


def check_manifest(manifest: dict[str, Any], where: Path) -> None:
    """The manifest's schema: the keys, types and values `Shards` relies on.

    A hand-edited or corrupt manifest is refused in one line instead of a KeyError deep in
    training; a shard name is a plain file name, so no path from the manifest reads
    outside its folder.
    """

    def bad(what: str) -> ConvcliError:
        return ConvcliError(f"{where}: {what}; run `convcli prepare` again")

    if manifest.get("dtype") not in IDS_DTYPES:
        raise bad(f"`dtype` is {manifest.get('dtype')!r}, not one of {', '.join(IDS_DTYPES)}")
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or not splits:
        raise bad("`splits` is missing or empty")
    for split, entry in splits.items():
        if split not in SPLITS or not isinstance(entry, dict):
            raise bad(f"`splits` holds {split!r}, not one of {', '.join(SPLITS)}")
        shards = entry.get("shards")
        if not isinstance(shards, list):
            raise bad(f"`splits.{split}.shards` is missing or not a list")
        for shard in shards:
            if not isinstance(shard, dict):
                raise bad(f"`splits.{split}.shards` holds {shard!r}, not a shard entry")
            name = shard.get("name")
            if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name):
                raise bad(f"shard name {name!r} is not a plain file name")
            for key in ("examples", "tokens"):
                value = shard.get(key)
                if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                    raise bad(f"shard {name}: `{key}` is {value!r}, not a count")
    tokenizer = manifest.get("tokenizer", {})
    if not isinstance(tokenizer, dict) or not isinstance(tokenizer.get("fingerprint", ""), str):
        raise bad("`tokenizer` is not a {fingerprint: ...} object")


def check_contents(shards: Shards, vocab_size: int) -> None:
    """Every shard's arrays, checked in bulk before training: offsets start at 0, never go
    back and end at the token count; ids are below `vocab_size`; token types are 0 or 1;
    loss flags use known bits. One vectorised pass per array (cheap next to training)."""
    from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED

    flags = LOSS_RESPONSE | LOSS_WEIGHTED
    for split in shards.manifest["splits"]:
        for entry in shards.manifest["splits"][split]["shards"]:
            name = entry["name"]

            def arr(array: str, entry: dict[str, Any] = entry) -> np.ndarray:
                file = _file(shards.path, entry["name"], array)
                return np.memmap(file, dtype=ARRAYS[array] or shards.dtype, mode="r")

            def bad(what: str, name: str = name) -> ConvcliError:
                return ConvcliError(
                    f"{shards.path}: shard {name}: {what}; the shard directory is corrupt, "
                    "run `convcli prepare` again"
                )

            offsets = arr("offsets")
            if len(offsets) and (offsets[0] != 0 or offsets[-1] != entry["tokens"]):
                raise bad(f"offsets run from {offsets[0]} to {offsets[-1]}, not 0 to "
                          f"{entry['tokens']}")  # fmt: skip
            step = np.diff(offsets)
            if len(step) and int(step.min()) < 0:
                at = int(np.argmax(step < 0))
                raise bad(f"offsets go back at example {at + 1}")
            if not entry["tokens"]:
                continue
            top = int(arr("ids").max())
            if top >= vocab_size:
                raise bad(f"token id {top} is outside the tokenizer's {vocab_size} ids")
            if int(arr("types").max()) > 1:
                raise bad(f"token type {int(arr('types').max())} (types are 0 and 1)")
            if int(arr("mask").max()) > flags:
                raise bad(f"loss flag {int(arr('mask').max())} (flags are 0 to {flags})")


def write_manifest(directory: Path, manifest: dict[str, Any]) -> dict[str, Any]:
    """Write `manifest.json` (last, once every shard file is complete).

    `manifest` must hold at least `dtype`, `splits` ({split: {"shards": [...], ...}}).
    """
    full = {"format": FORMAT, "version": VERSION, **manifest}
    text = json.dumps(full, indent=2, ensure_ascii=False)
    (Path(directory) / MANIFEST).write_text(text + "\n", encoding="utf-8")
    return full
