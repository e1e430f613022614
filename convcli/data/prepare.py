"""The prepare pipeline: dialogue corpora in, a shard directory out.

Records stream from `formats.Corpus`; the main process checks them, splits them into
train/valid by a hash of their turns and (optionally) drops exact duplicates; chunks of
dialogues go to worker processes that tokenize them in one batched call each and lay
them out (`convcli.tokenizer.layout`); results come back in order and are appended to
the shard files. Nothing holds more than a few chunks, so memory stays flat however
large the corpus. Everything is written into a temporary sibling of the output and
renamed into place at the end (`write_atomically`).
"""

from __future__ import annotations

import hashlib
import multiprocessing
import os
import time
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from convcli import __version__
from convcli.data.formats import BadRecord, Corpus, Dialogue
from convcli.data.prepare_settings import PrepareSettings
from convcli.data.shards import SPLITS, TOKENIZER_DIR, ShardWriter, ids_dtype, write_manifest
from convcli.errors import ConvcliError, UsageError
from convcli.modelfolder import write_atomically
from convcli.settings import to_dict, to_yaml
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED, ConversationTokenizer, layout

__all__ = ["PrepareResult", "PrepareSettings", "prepare", "sliding_windows"]

CONFIG_FILE = "prepare.yaml"
CHUNK_TURNS = 4096  # turns per batched tokenizer call / per task sent to a worker

# (stage, bytes read, bytes in all) where stage is "tokenizer" (training pass) or "prepare".
Progress = Callable[[str, int, int], None]


@dataclass
class PrepareResult:
    """What `prepare` wrote (the same counts as the manifest)."""

    output: Path
    dialogues_read: int
    dialogues_written: int
    examples: int
    tokens: int
    skipped: dict[str, int]
    truncated_turns: int
    splits: dict[str, dict[str, int]]
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


def prepare(settings: PrepareSettings, progress: Progress | None = None) -> PrepareResult:
    """Read the corpora in `settings.inputs`, tokenize them and write a shard directory."""
    _check(settings)
    assert settings.output is not None
    output = Path(settings.output)
    if output.exists() and not settings.overwrite:
        raise ConvcliError(f"{output} already exists (pass --overwrite to replace it)")
    started = time.perf_counter()
    results: list[PrepareResult] = []
    write_atomically(
        output,
        lambda tmp: results.append(_prepare_into(tmp, settings, progress or _no_progress)),
        overwrite=settings.overwrite,
    )
    result = results[0]
    result.output = output
    result.seconds = time.perf_counter() - started
    return result


def _no_progress(stage: str, done: int, total: int) -> None:
    pass


def _check(settings: PrepareSettings) -> None:
    if not settings.inputs:
        raise UsageError("no input files given")
    if settings.output is None:
        raise UsageError("--output: the shard directory to write is required")
    if settings.tokenizer and settings.train_tokenizer:
        raise UsageError("give either --tokenizer or --train-tokenizer, not both")
    if not settings.tokenizer and not settings.train_tokenizer:
        raise UsageError("give --tokenizer NAME_OR_PATH, or --train-tokenizer --vocab-size N")
    if settings.train_tokenizer and settings.vocab_size < 258:
        raise UsageError(f"--vocab-size: {settings.vocab_size} is too small (at least 258)")
    if settings.max_length < 4:
        raise UsageError(f"--max-length: {settings.max_length} cannot hold two turns (min 4)")
    if not 0.0 <= settings.valid_fraction < 1.0:
        raise UsageError(f"--valid-fraction: {settings.valid_fraction} is not in [0, 1)")
    if settings.workers < 1:
        raise UsageError(f"--workers: {settings.workers} must be at least 1")
    if settings.shard_tokens < 1:
        raise UsageError(f"shard_tokens: {settings.shard_tokens} must be at least 1")


# -- splitting and windows ------------------------------------------------------------------


def dialogue_key(turns: Sequence[str]) -> bytes:
    """A digest of a dialogue's turns: the same turns always give the same key."""
    # NUL cannot occur in a turn (readers reject it), so the join is unambiguous.
    return hashlib.blake2b("\0".join(turns).encode("utf-8"), digest_size=16).digest()


def is_valid(key: bytes, valid_fraction: float) -> bool:
    """Whether a dialogue goes to the validation split: a pure function of its key."""
    return int.from_bytes(key[:8], "big") < valid_fraction * 2**64


def sliding_windows(lengths: Sequence[int], max_length: int) -> list[tuple[int, int]]:
    """Cut a dialogue with turns of these token lengths into windows of whole turns.

    Returns (start, stop) turn ranges whose layouts fit in `max_length`; together they
    cover every turn as a new (trained) turn exactly once. Each window starts with as
    much earlier context as fits in half of `max_length`. Every turn must fit alone
    (length + 2 <= max_length).
    """
    n = len(lengths)
    if sum(lengths) + n + 1 <= max_length:
        return [(0, n)]
    windows = []
    new = 0  # the first turn no window has covered yet
    while new < n:
        start, cost, context = new, lengths[new] + 2, 0
        while start > 0:
            extra = lengths[start - 1] + 1
            if context + extra > max_length // 2 or cost + extra > max_length:
                break
            start, cost, context = start - 1, cost + extra, context + extra
        stop = new + 1
        while stop < n and cost + lengths[stop] + 1 <= max_length:
            cost += lengths[stop] + 1
            stop += 1
        windows.append((start, stop))
        new = stop
    return windows


def window_flags(
    lengths: Sequence[int], start: int, new: int, weighted: Sequence[bool] | None
) -> list[int]:
    """Loss flags of the window of turns `start..` of a dialogue (turn lengths given).

    Turns before `new` were trained in an earlier window: here they are context only.
    Flags follow the dialogue, not the window: its turn 0 is the only non-response.
    """
    flags = [0]
    for offset, length in enumerate(lengths):
        turn = start + offset
        value = 0
        if turn >= new:
            value = (LOSS_RESPONSE if turn else 0) | (
                LOSS_WEIGHTED if weighted is None or weighted[turn] else 0
            )
        flags.extend([value] * (length + 1))
    return flags


# -- the work done per chunk (in worker processes) -----------------------------------------

Task = list[tuple[list[str], list[bool] | None, bool]]  # (turns, weighted, is_valid)


@dataclass
class Encoded:
    """The examples of one chunk, per split, as flat arrays; plus what happened."""

    arrays: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    written: dict[str, int]
    too_long: int  # dialogues skipped for a turn over max_length
    truncated_turns: int


class Encoder:
    """Tokenizes and lays out chunks of dialogues (picklable; one per worker)."""

    def __init__(self, tokenizer: ConversationTokenizer, max_length: int, long_turn: str):
        self.tokenizer, self.max_length, self.long_turn = tokenizer, max_length, long_turn
        self.sep = tokenizer.sep_token_id
        self.dtype = ids_dtype(len(tokenizer))

    def __call__(self, task: Task) -> Encoded:
        encoded = iter(self.tokenizer.encode_turns([t for turns, _, _ in task for t in turns]))
        out: dict[str, tuple[list[int], list[int], list[int], list[int]]] = {
            s: ([], [], [], []) for s in SPLITS
        }
        written = dict.fromkeys(SPLITS, 0)
        too_long = truncated = 0
        limit = self.max_length - 2  # a turn alone: sep, tokens, sep
        for turns, weighted, valid in task:
            turn_ids = [next(encoded) for _ in turns]
            lengths = [len(t) for t in turn_ids]
            if max(lengths) > limit:
                if self.long_turn == "skip":
                    too_long += 1
                    continue
                truncated += sum(length > limit for length in lengths)
                turn_ids = [t[:limit] for t in turn_ids]
                lengths = [len(t) for t in turn_ids]
            ids_out, types_out, mask_out, lengths_out = out["valid" if valid else "train"]
            windows = sliding_windows(lengths, self.max_length)
            new = 0
            for start, stop in windows:
                part = None if weighted is None else weighted[start:stop]
                ids, types, flags = layout(turn_ids[start:stop], self.sep, part)
                if len(windows) > 1:
                    flags = window_flags(lengths[start:stop], start, new, weighted)
                new = stop
                ids_out.extend(ids)
                types_out.extend(types)
                mask_out.extend(flags)
                lengths_out.append(len(ids))
            written["valid" if valid else "train"] += 1
        arrays = {
            s: (
                np.array(ids, dtype=self.dtype),
                np.array(types, dtype=np.uint8),
                np.array(mask, dtype=np.uint8),
                np.array(lengths, dtype=np.int64),
            )
            for s, (ids, types, mask, lengths) in out.items()
        }
        return Encoded(arrays, written, too_long, truncated)


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _work(task: Task) -> Encoded:
    assert _WORKER is not None
    return _WORKER(task)


@contextmanager
def _parallel(encoder: Encoder, workers: int) -> Iterator[Callable[[Iterable[Task]], Iterator]]:
    """A map over tasks, in order, in `workers` processes with a few tasks in flight."""
    if workers <= 1:
        yield lambda tasks: map(encoder, tasks)
        return
    methods = multiprocessing.get_all_start_methods()
    context = multiprocessing.get_context("fork" if "fork" in methods else "spawn")
    # Each worker tokenizes on one core; the Rust thread pool would oversubscribe the cores
    # (and warns after a fork). The variable is only set while the workers start.
    saved = os.environ.get("TOKENIZERS_PARALLELISM")
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    try:
        pool = context.Pool(workers, initializer=_init_worker, initargs=(encoder,))
    finally:
        if saved is None:
            del os.environ["TOKENIZERS_PARALLELISM"]
        else:
            os.environ["TOKENIZERS_PARALLELISM"] = saved

    def ordered(tasks: Iterable[Task]) -> Iterator[Encoded]:
        pending: deque = deque()
        for task in tasks:
            pending.append(pool.apply_async(_work, (task,)))
            if len(pending) >= 2 * workers:  # bounded: memory stays flat
                yield pending.popleft().get()
        while pending:
            yield pending.popleft().get()

    try:
        yield ordered
    except BaseException:
        pool.terminate()
        raise
    else:
        pool.close()
    finally:
        pool.join()


# -- the pipeline ---------------------------------------------------------------------------


@dataclass
class Tally:
    """Records read (a bad line, an empty or missing file count as one each) and skipped."""

    read: int = 0
    skipped: Counter[str] = field(default_factory=Counter)


def _records(corpus: Corpus, strict: bool, tally: Tally) -> Iterator[Dialogue]:
    """The dialogues of a corpus; bad records raise (strict) or are counted."""
    for record in corpus:
        tally.read += 1
        if isinstance(record, BadRecord):
            if strict:
                raise record.error()
            tally.skipped[record.reason] += 1
        else:
            yield record


def _tokenizer(settings: PrepareSettings, progress: Progress) -> ConversationTokenizer:
    if settings.tokenizer:
        return ConversationTokenizer.from_pretrained(settings.tokenizer)
    from convcli.data.vocab import train_bpe_tokenizer

    corpus = Corpus(settings.inputs, settings.format)
    strict = settings.on_error == "strict"

    def texts() -> Iterator[str]:
        for i, dialogue in enumerate(_records(corpus, strict, Tally())):
            yield from dialogue.turns
            if i % 1024 == 0:
                progress("tokenizer", corpus.bytes_read, corpus.total_bytes)
        progress("tokenizer", corpus.total_bytes, corpus.total_bytes)

    return ConversationTokenizer(train_bpe_tokenizer(texts(), settings.vocab_size))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _prepare_into(tmp: Path, settings: PrepareSettings, progress: Progress) -> PrepareResult:
    umask = os.umask(0)
    os.umask(umask)
    tmp.chmod(0o777 & ~umask)  # mkdtemp made it private; the output is an ordinary folder
    tokenizer = _tokenizer(settings, progress)
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    encoder = Encoder(tokenizer, settings.max_length, settings.long_turn)
    writers = {
        s: ShardWriter(tmp, s, encoder.dtype, shard_tokens=settings.shard_tokens) for s in SPLITS
    }
    corpus = Corpus(settings.inputs, settings.format)
    tally = Tally()
    skipped = tally.skipped
    seen: set[bytes] = set()
    split_dialogues = dict.fromkeys(SPLITS, 0)
    truncated = 0

    def tasks() -> Iterator[Task]:
        task: Task = []
        turns_in_task = 0
        for dialogue in _records(corpus, settings.on_error == "strict", tally):
            key = dialogue_key(dialogue.turns)
            if settings.dedupe:
                if key in seen:
                    skipped["duplicate"] += 1
                    continue
                seen.add(key)
            weighted = None if dialogue.weights is None else [w != 0 for w in dialogue.weights]
            task.append((dialogue.turns, weighted, is_valid(key, settings.valid_fraction)))
            turns_in_task += len(dialogue.turns)
            if turns_in_task >= CHUNK_TURNS:
                yield task
                task, turns_in_task = [], 0
                progress("prepare", corpus.bytes_read, corpus.total_bytes)
        if task:
            yield task

    with _parallel(encoder, settings.workers) as parallel_map:
        for result in parallel_map(tasks()):
            for split, (ids, types, mask, lengths) in result.arrays.items():
                writers[split].add_many(ids, types, mask, lengths)
                split_dialogues[split] += result.written[split]
            skipped["turn-too-long"] += result.too_long
            truncated += result.truncated_turns
    progress("prepare", corpus.total_bytes, corpus.total_bytes)
    read = tally.read
    skipped = Counter({k: v for k, v in skipped.items() if v})

    splits = {}
    for split, writer in writers.items():
        shards = writer.close()
        splits[split] = {
            "shards": shards,
            "dialogues": split_dialogues[split],
            "examples": sum(s["examples"] for s in shards),
            "tokens": sum(s["tokens"] for s in shards),
        }
    written = sum(split_dialogues.values())
    if not written:
        reasons = ", ".join(f"{n} {r}" for r, n in sorted(skipped.items())) or "none"
        raise ConvcliError(f"no dialogue to write: {read} read, all skipped ({reasons})")
    assert read == written + sum(skipped.values()), "dialogues read != written + skipped"

    (tmp / CONFIG_FILE).write_text(
        to_yaml(settings, header=f"convcli {__version__} prepare: the resolved settings"),
        encoding="utf-8",
    )
    manifest = write_manifest(
        tmp,
        {
            "made_by": f"convcli {__version__} prepare",
            "dtype": encoder.dtype.name,
            "max_length": settings.max_length,
            "tokenizer": {
                "source": settings.tokenizer or f"trained byte-level BPE ({settings.vocab_size})",
                "fingerprint": tokenizer.fingerprint(),
                "sep_token": tokenizer.sep_token,
                "sep_token_id": tokenizer.sep_token_id,
                "vocab_size": len(tokenizer),
            },
            "sources": [
                {
                    "path": str(path),
                    "format": corpus.formats.get(str(path), settings.format),
                    "bytes": path.stat().st_size,
                    "sha256": _sha256(path),
                }
                for path in corpus.files
            ],
            "dialogues_read": read,
            "dialogues_written": written,
            "examples": sum(s["examples"] for s in splits.values()),
            "tokens": sum(s["tokens"] for s in splits.values()),
            "skipped": dict(sorted(skipped.items())),
            "truncated_turns": truncated,
            "splits": splits,
            "settings": to_dict(settings),
        },
    )
    return PrepareResult(
        output=tmp,
        dialogues_read=read,
        dialogues_written=written,
        examples=manifest["examples"],
        tokens=manifest["tokens"],
        skipped=manifest["skipped"],
        truncated_turns=truncated,
        splits={s: {k: v for k, v in d.items() if k != "shards"} for s, d in splits.items()},
        manifest=manifest,
    )
