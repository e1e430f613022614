"""Several input files (and dataset folders) read as one stream of records.

Reading and parsing are two steps so that parsing can run in other processes:
`Corpus.chunks` reads the inputs as `Chunk`s (cheap: no decoding) and `parse_chunk` turns
a chunk into records. Iterating a `Corpus` does both, in order. Each input's format is
found when the corpus is made (`formats`), before any work.
"""

from __future__ import annotations

import glob
import gzip
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import BinaryIO

from convcli.data.readers.base import (
    CHUNK_BYTES,
    HEAD_BYTES,
    REASONS,
    BadRecord,
    Chunk,
    Head,
    ReadOptions,
    Record,
)
from convcli.data.readers.registry import READERS, detect_format, unknown_format
from convcli.errors import InputError

DEFAULT_OPTIONS = ReadOptions()


def parse_chunk(chunk: Chunk, options: ReadOptions = DEFAULT_OPTIONS) -> Iterator[Record]:
    """The records of a chunk, in order (the same as reading them as part of its file)."""
    return READERS[chunk.format].records(chunk, options)


def expand_inputs(
    patterns: Iterable[str | Path], folder: Callable[[Path], bool] = lambda p: False
) -> tuple[list[Path], list[str]]:
    """Files (and folders that `folder` takes as one input) named by paths and globs, in
    order, each once; and the patterns that name none."""
    files: list[Path] = []
    missing: list[str] = []
    seen: set[Path] = set()

    def wanted(p: Path) -> bool:
        return p.is_file() or (p.is_dir() and folder(p))

    for pattern in patterns:
        text = str(pattern)
        path = Path(text).expanduser()
        if path.exists() or not glob.has_magic(text):
            matches = [path] if wanted(path) else []
        else:
            matches = [Path(p) for p in sorted(glob.glob(str(path), recursive=True))]  # ~ too
            matches = [p for p in matches if wanted(p)]
        if not matches:
            missing.append(text)
        for match in matches:
            key = match.resolve()
            if key not in seen:
                seen.add(key)
                files.append(match)
    return files, missing


def read_head(path: Path) -> Head:
    """The first bytes of a file (uncompressed), for sniffing; what can be read of them."""
    data = b""
    if path.is_file():
        try:
            with open(path, "rb") as raw:
                gzipped = raw.read(2) == b"\x1f\x8b"
                raw.seek(0)
                stream = gzip.GzipFile(fileobj=raw) if gzipped else raw
                while len(data) < HEAD_BYTES and (piece := stream.read1(HEAD_BYTES - len(data))):
                    data += piece
        except (OSError, EOFError):
            pass  # a corrupt .gz: its reader reports it where it breaks
    return Head(path, data.decode("utf-8", "replace"), complete=len(data) < HEAD_BYTES)


def input_bytes(path: Path) -> int:
    if path.is_dir():
        return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())
    return path.stat().st_size


class Corpus:
    """The records of several inputs, read lazily, with a byte count for progress.

    `format` is "auto" (found per input) or one of `registry.FORMATS` for every input.
    """

    def __init__(
        self,
        inputs: Sequence[str | Path],
        format: str = "auto",
        options: ReadOptions = DEFAULT_OPTIONS,
    ) -> None:
        if format != "auto" and format not in READERS:
            raise ValueError(f"unknown format {format!r}")
        self.format, self.options = format, options
        folder = _claimed_folder if format == "auto" else READERS[format].claims
        self.files, self.missing = expand_inputs(inputs, folder)
        self.total_bytes = sum(input_bytes(f) for f in self.files)
        self.formats: dict[str, str] = {str(f): self._format(f) for f in self.files}
        for name in set(self.formats.values()):
            READERS[name].check()  # a missing extra: one line saying what to install
        for path in self.files:
            READERS[self.formats[str(path)]].check_input(path, options)
        self._done_bytes = 0
        self._handle: BinaryIO | None = None

    def _format(self, path: Path) -> str:
        if self.format != "auto":
            return self.format
        head = read_head(path)
        found = detect_format(path, head)
        if found:
            return found
        if not head.text.strip():  # nothing to tell by: the text reader counts it as empty
            return "text"
        raise InputError(unknown_format(path), path=str(path), param="format")

    @property
    def bytes_read(self) -> int:
        """Bytes of the input files (as stored, compressed or not) consumed so far."""
        current = self._handle.tell() if self._handle is not None else 0
        return self._done_bytes + current

    def __iter__(self) -> Iterator[Record]:
        for item in self.chunks():
            if isinstance(item, BadRecord):
                yield item
            else:
                yield from parse_chunk(item, self.options)

    def chunks(self, size: int = CHUNK_BYTES) -> Iterator[Chunk | BadRecord]:
        """The inputs as chunks of about `size` bytes, in order, with a `BadRecord` for
        each missing, empty or unreadable file where its records would be."""
        self._done_bytes = 0  # a corpus may be read twice (a tokenizer is trained first)
        for pattern in self.missing:
            what = "no file matches" if glob.has_magic(pattern) else REASONS["missing-file"]
            if Path(pattern).is_dir():
                what = "is a directory, not a file"
            yield BadRecord("missing-file", what, pattern)
        for path in self.files:
            reader = READERS[self.formats[str(path)]]
            yield from reader.chunks(path, self.open, size, self.options)

    @contextmanager
    def open(self, path: Path) -> Iterator[BinaryIO]:
        """A file of an input, uncompressed if it is a .gz; counted for `bytes_read`."""
        with open(path, "rb") as raw:
            self._handle = raw
            try:
                gzipped = raw.read(2) == b"\x1f\x8b"
                raw.seek(0)
                yield gzip.GzipFile(fileobj=raw) if gzipped else raw  # type: ignore[misc]
            finally:
                self._handle = None
                self._done_bytes += path.stat().st_size


def _claimed_folder(path: Path) -> bool:
    return any(r.directories and r.claims(path) for r in READERS.values())
