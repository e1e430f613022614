"""Tables: Parquet files, Arrow files (IPC file or stream format), and Hugging Face
dataset folders (`Dataset.save_to_disk`: Arrow stream files plus state.json, or a
`DatasetDict` of such folders, one per split).

Read with pyarrow (the `arrow` extra), one record batch at a time and only the column of
turns, so memory holds a few batches however large the table. The turns of a row are a
list of strings, or of `{role, content}` / `{from, value}` structs (then roles count as in
chat messages). The column is `field`, else the first of `COLUMNS` the table has. Rows
are counted from 1 in each file: errors say `file:row N`.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from convcli.data.readers.base import (
    BadRecord,
    Chunk,
    Head,
    Opener,
    Reader,
    ReadOptions,
    Record,
    check_turns,
)
from convcli.data.readers.roles import role_turns
from convcli.data.readers.sharegpt import ROLES
from convcli.errors import ConvcliError, InputError, first_line

COLUMNS = ("messages", "conversations", "dialog", "dialogue", "turns", "conversation")
INSTALL = "reading Parquet and Arrow needs pyarrow: pip install 'convcli[arrow]'"
_ROW_BYTES = 256  # a guess at a row's size, to turn a chunk size in bytes into rows


def _pyarrow() -> Any:
    try:
        import pyarrow
        import pyarrow.ipc
        import pyarrow.parquet
    except ImportError:
        raise ConvcliError(INSTALL) from None
    return pyarrow


class Table(Reader):
    """What the table formats share: a column of turns per row, read batch by batch."""

    def check(self) -> None:
        _pyarrow()

    def batches(self, path: Path, open: Opener, rows: int, options: ReadOptions) -> Iterator[Any]:
        """(source file, record batch, column names) of the input's batches, in order."""
        raise NotImplementedError

    def chunks(
        self, path: Path, open: Opener, size: int, options: ReadOptions
    ) -> Iterator[Chunk | BadRecord]:
        pa = _pyarrow()
        rows = max(1, size // _ROW_BYTES)
        sources: dict[str, int] = {}  # rows read so far, per file
        empty = True
        batches = self.batches(path, open, rows, options)
        while True:
            try:
                source, batch, names = next(batches)
            except StopIteration:
                break
            except (pa.ArrowException, OSError) as exc:  # not a table, or a damaged one
                what = f"cannot read as {self.name}: {first_line(exc)}"
                yield BadRecord("unreadable", what, str(path))
                return
            column = _column(names, options.field)
            if column is None:
                yield BadRecord("no-field", _no_column(names, options.field), source)
                return
            start = sources.get(source, 0)
            sources[source] = start + batch.num_rows
            if batch.num_rows:
                empty = False
                # Only the column of turns travels to the workers.
                yield Chunk(source, self.name, start + 1, batch.select([column]))
        if empty:
            yield BadRecord("empty-file", "empty table (no rows)", str(path))

    def records(self, chunk: Chunk, options: ReadOptions) -> Iterator[Record]:
        for row, value in enumerate(chunk.data.column(0).to_pylist(), chunk.line):
            yield _row(value, chunk.source, row, options)


def _column(names: list[str], field: str | None) -> str | None:
    if field is not None:
        return field if field in names else None
    return next((c for c in COLUMNS if c in names), None)


def _no_column(names: list[str], field: str | None) -> str:
    have = ", ".join(names) or "none"
    if field is not None:
        return f"no column {field!r} (columns: {have})"
    return (
        f"no column of turns (looked for {', '.join(COLUMNS)}; columns: {have}); "
        "name it with `field`"
    )


def _row(value: Any, source: str, row: int, options: ReadOptions) -> Record:
    """A row's turns: strings, or role-tagged structs."""
    if isinstance(value, list) and value and all(isinstance(t, dict) for t in value):
        keys = ("role", "content") if "role" in value[0] else ("from", "value")
        return role_turns(
            value, key=options.field or "turns", role_key=keys[0], text_key=keys[1],
            roles=ROLES, source=source, line=row, options=options, unit="row",
        )  # fmt: skip
    if not isinstance(value, list) or not all(isinstance(t, str) for t in value):
        message = "expected a list of strings or of {role, content} / {from, value} items"
        return BadRecord("not-turns", message, source, row, "row")
    return check_turns(value, None, source, row, unit="row")


class Parquet(Table):
    name = "parquet"
    extensions = (".parquet", ".pq")
    example = "a column `messages` of [{role, content}], or `dialog` of [string]"

    def sniff(self, head: Head) -> int:
        return 3 if head.text.startswith("PAR1") else 0

    def batches(self, path: Path, open: Opener, rows: int, options: ReadOptions) -> Iterator[Any]:
        pa = _pyarrow()
        with open(path) as stream:
            # pre_buffer (pyarrow's default) keeps every column chunk read until the file is
            # closed: memory would grow with the file. Buffered reads of 1 MiB keep it flat.
            table = pa.parquet.ParquetFile(stream, pre_buffer=False, buffer_size=1 << 20)
            names = table.schema_arrow.names
            column = _column(names, options.field)
            columns = [column] if column else names[:1]
            for batch in table.iter_batches(batch_size=rows, columns=columns):
                yield str(path), batch, names


class Arrow(Table):
    name = "arrow"
    extensions = (".arrow", ".feather", ".ipc")
    example = "as parquet, in the Arrow IPC file or stream format"

    def sniff(self, head: Head) -> int:
        return 3 if head.text.startswith("ARROW1") else 0

    def batches(self, path: Path, open: Opener, rows: int, options: ReadOptions) -> Iterator[Any]:
        yield from _ipc_batches(path, open)


def _ipc_batches(path: Path, open: Opener) -> Iterator[Any]:
    """The record batches of an Arrow IPC file (random access) or stream, one at a time."""
    pa = _pyarrow()
    with open(path) as stream:
        is_file = stream.read(6) == b"ARROW1"
        stream.seek(0)
        if is_file:
            reader = pa.ipc.open_file(stream)
            for i in range(reader.num_record_batches):
                yield str(path), reader.get_batch(i), reader.schema.names
        else:
            for batch in pa.ipc.open_stream(stream):
                yield str(path), batch, batch.schema.names


class DatasetFolder(Table):
    name = "hf-dataset"
    example = "a folder from datasets' save_to_disk (state.json + data-*.arrow)"
    directories = True

    def claims(self, folder: Path) -> bool:
        return (folder / "state.json").is_file() or (folder / "dataset_dict.json").is_file()

    def check_input(self, path: Path, options: ReadOptions) -> None:
        _data_files(_split_folder(path, options.split))

    def batches(self, path: Path, open: Opener, rows: int, options: ReadOptions) -> Iterator[Any]:
        for file in _data_files(_split_folder(path, options.split)):
            yield from _ipc_batches(file, open)


def _data_files(folder: Path) -> list[Path]:
    """The Arrow files of a saved dataset, in order, as its state.json lists them."""
    try:
        state = json.loads((folder / "state.json").read_text(encoding="utf-8"))
        return [folder / f["filename"] for f in state["_data_files"]]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        what = first_line(exc) if not isinstance(exc, KeyError) else f"no key {exc}"
        raise InputError(f"not a saved dataset: state.json: {what}", path=str(folder)) from None


def _split_folder(path: Path, split: str | None) -> Path:
    """The folder of the split to read: a `DatasetDict` holds one per split."""
    listing = path / "dataset_dict.json"
    if not listing.is_file():
        return path
    try:
        splits = json.loads(listing.read_text(encoding="utf-8"))["splits"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InputError(f"dataset_dict.json: {exc}", path=str(path)) from None
    chosen = split or ("train" if "train" in splits else None)
    if chosen not in splits:
        what = f"no split {split!r}" if split else "no train split"
        raise InputError(
            f"{what}; its splits: {', '.join(splits)} (choose one with `split`)",
            path=str(path),
            param="split",
        )
    return path / chosen
