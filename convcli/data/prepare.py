"""The prepare pipeline: dialogue corpora in, a shard directory out.

The main process only reads: `readers.Corpus.chunks` cuts the files into raw chunks of
whole lines. Worker processes do the rest of the work per chunk (`Encoder`): parse and
check the lines, split dialogues into train/valid by a hash of their turns, tokenize
every turn in one batched call and lay the examples out with numpy (`examples.lay_out`). Results
come back in file order as flat arrays; the main process raises on the first bad line
(strict), drops exact duplicates (`dedupe`: it needs every key seen so far) and appends
to the shard files. So the output does not depend on the number of workers. Nothing
holds more than a few chunks, so memory stays flat however large the corpus (except the
keys kept by `dedupe`). Everything is written into a temporary sibling of the output and
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
from convcli.data.examples import Arrays, lay_out
from convcli.data.prepare_settings import PrepareSettings
from convcli.data.readers import (
    CHUNK_BYTES,
    BadRecord,
    Chunk,
    Corpus,
    Dialogue,
    ReadOptions,
    parse_chunk,
)
from convcli.data.readers.corpus import input_bytes
from convcli.data.shards import SPLITS, TOKENIZER_DIR, ShardWriter, ids_dtype, write_manifest
from convcli.errors import ConvcliError, UsageError
from convcli.outputs import (
    check_output,
    hold_output,
    recover_leftovers,
    refuse_to_replace_inputs,
    write_atomically,
)
from convcli.settings import to_dict, to_yaml
from convcli.tokenizer import ConversationTokenizer

__all__ = ["PrepareResult", "PrepareSettings", "prepare"]

CONFIG_FILE = "prepare.yaml"

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
    formats: dict[str, str] = field(default_factory=dict)  # each input: the format read
    same_role_turns: int = 0  # turns after a turn of the same role (joined or kept apart)
    seconds: float = 0.0
    manifest: dict[str, Any] = field(default_factory=dict, repr=False)


def prepare(settings: PrepareSettings, progress: Progress | None = None) -> PrepareResult:
    """Read the corpora in `settings.inputs`, tokenize them and write a shard directory."""
    _check(settings)
    assert settings.output is not None
    output = Path(settings.output)
    started = time.perf_counter()
    # Every input's format is found (or refused) before any work.
    corpus = Corpus(settings.inputs, settings.format, read_options(settings))
    results: list[PrepareResult] = []
    with hold_output(output):  # for the whole run: a second prepare here fails at once
        recover_leftovers(output)
        check_output(output, "prepare", overwrite=settings.overwrite, inputs=settings.inputs)
        write_atomically(
            output,
            lambda tmp: results.append(
                _prepare_into(tmp, settings, corpus, progress or _no_progress)
            ),
            overwrite=settings.overwrite,
            command="prepare",
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
        raise UsageError("`output`: the shard directory to write is required", param="output")
    tokenizers = ("tokenizer", "train_tokenizer")
    if settings.tokenizer and settings.train_tokenizer:
        raise UsageError("give either `tokenizer` or `train_tokenizer`, not both", param=tokenizers)
    if not settings.tokenizer and not settings.train_tokenizer:
        raise UsageError("give `tokenizer` NAME_OR_PATH, or `train_tokenizer` `vocab_size` N",
                         param=(*tokenizers, "vocab_size"))  # fmt: skip
    if settings.train_tokenizer and settings.vocab_size < 258:
        raise UsageError(f"`vocab_size`: {settings.vocab_size} is too small (at least 258)",
                         param="vocab_size")  # fmt: skip
    if settings.max_length < 4:
        raise UsageError(f"`max_length`: {settings.max_length} cannot hold two turns (min 4)",
                         param="max_length")  # fmt: skip
    if not 0.0 <= settings.valid_fraction < 1.0:
        raise UsageError(f"`valid_fraction`: {settings.valid_fraction} is not in [0, 1)",
                         param="valid_fraction")  # fmt: skip
    if settings.max_depth is not None and settings.max_depth < 2:
        raise UsageError(f"`max_depth`: {settings.max_depth} cannot hold two turns (min 2)",
                         param="max_depth")  # fmt: skip
    if settings.workers < 1:
        raise UsageError(f"`workers`: {settings.workers} must be at least 1", param="workers")
    if settings.shard_tokens < 1:
        raise UsageError(f"`shard_tokens`: {settings.shard_tokens} must be at least 1",
                         param="shard_tokens")  # fmt: skip
    refuse_to_replace_inputs(settings.output, settings.inputs)


def read_options(settings: PrepareSettings) -> ReadOptions:
    """The settings that say how to read records (they travel to the workers)."""
    return ReadOptions(
        field=settings.field,
        split=settings.split,
        same_role=settings.same_role,
        tree_paths=settings.tree_paths,
        max_depth=settings.max_depth,
    )


# -- splitting and windows ------------------------------------------------------------------


def dialogue_key(turns: Sequence[str]) -> bytes:
    """A digest of a dialogue's turns: the same turns always give the same key."""
    # NUL cannot occur in a turn (readers reject it), so the join is unambiguous.
    return hashlib.blake2b("\0".join(turns).encode("utf-8"), digest_size=16).digest()


def is_valid(key: bytes, valid_fraction: float) -> bool:
    """Whether a dialogue goes to the validation split: a pure function of its key."""
    return int.from_bytes(key[:8], "big") < valid_fraction * 2**64


# -- the work done per chunk (in worker processes) -----------------------------------------


@dataclass
class Encoded:
    """What a worker made of one chunk: bad records, and its dialogues laid out per split.

    Per-dialogue arrays are in file order, so the main process can drop duplicates
    (which needs every key seen so far) without a second pass over the text.
    """

    bad: list[BadRecord]
    keys: list[bytes] | None  # each dialogue's `dialogue_key` (only with dedupe)
    valid: np.ndarray  # bool: the dialogue is in the valid split
    examples: np.ndarray  # examples made of the dialogue (0: skipped, a turn too long)
    too_long: np.ndarray  # bool: skipped for a turn over max_length
    truncated: np.ndarray  # turns of the dialogue truncated to max_length
    arrays: dict[str, Arrays]  # per split: the examples as flat arrays
    same_role: int = 0  # turns that followed a turn of the same role (joined or kept apart)

    @property
    def dialogues(self) -> int:
        return len(self.valid)


class Encoder:
    """Parses, checks, splits, tokenizes and lays out chunks (picklable; one per worker)."""

    def __init__(self, tokenizer: ConversationTokenizer, settings: PrepareSettings) -> None:
        self.tokenizer = tokenizer
        self.max_length, self.long_turn = settings.max_length, settings.long_turn
        self.valid_fraction, self.dedupe = settings.valid_fraction, settings.dedupe
        self.sep = tokenizer.sep_token_id
        self.dtype = ids_dtype(len(tokenizer))
        self.options = read_options(settings)

    def __call__(self, chunk: Chunk) -> Encoded:
        bad: list[BadRecord] = []
        keys: list[bytes] = []
        texts: list[str] = []  # every turn of every dialogue, for one batched tokenizer call
        turn_counts: list[int] = []
        unweighted: list[int] = []  # turns (indices into texts) of weight 0
        context: list[int] = []  # turns that are no reply: a dialogue's first, or by role
        same_role = 0
        for record in parse_chunk(chunk, self.options):
            if isinstance(record, BadRecord):
                bad.append(record)
                continue
            keys.append(dialogue_key(record.turns))
            if record.weights is not None:
                unweighted += [len(texts) + i for i, w in enumerate(record.weights) if w == 0]
            if record.roles is None:
                context.append(len(texts))
            else:  # with roles known, the replies are the assistant's turns
                context += [len(texts) + i for i, r in enumerate(record.roles) if r != "assistant"]
            same_role += record.joined
            texts += record.turns
            turn_counts.append(len(record.turns))
        ids, lengths = self.tokenizer.encode_turns_flat(texts)
        weighted = np.ones(len(texts), dtype=bool)
        weighted[unweighted] = False
        responses = np.ones(len(texts), dtype=bool)
        responses[context] = False
        valid = np.array([is_valid(k, self.valid_fraction) for k in keys], dtype=bool)
        laid = lay_out(
            np.array(ids, dtype=self.dtype),
            np.array(lengths, dtype=np.int64),
            np.array(turn_counts, dtype=np.int64),
            weighted,
            valid,
            responses=responses,
            sep=self.sep,
            max_length=self.max_length,
            skip_long=self.long_turn == "skip",
        )
        return Encoded(bad, keys if self.dedupe else None, valid, *laid, same_role=same_role)


_WORKER: Encoder | None = None


def _init_worker(encoder: Encoder) -> None:
    global _WORKER
    _WORKER = encoder


def _work(chunk: Chunk) -> Encoded:
    assert _WORKER is not None
    return _WORKER(chunk)


class _Ready:
    """A result already at hand (a bad file needs no worker), with AsyncResult's `get`."""

    def __init__(self, value: Any) -> None:
        self.value = value

    def get(self) -> Any:
        return self.value


@contextmanager
def _parallel(encoder: Encoder, workers: int) -> Iterator[Callable[[Iterable], Iterator]]:
    """A map over chunks, in order, in `workers` processes with a few chunks in flight.

    A `BadRecord` (a missing or empty file) passes through as it is, in its place.
    """
    if workers <= 1:
        yield lambda items: (i if isinstance(i, BadRecord) else encoder(i) for i in items)
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

    def ordered(items: Iterable[Chunk | BadRecord]) -> Iterator[Encoded | BadRecord]:
        pending: deque = deque()
        for item in items:
            bad = isinstance(item, BadRecord)
            pending.append(_Ready(item) if bad else pool.apply_async(_work, (item,)))
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


def _write(
    result: Encoded,
    writers: dict[str, ShardWriter],
    seen: set[bytes],
    tally: Tally,
    split_dialogues: dict[str, int],
) -> int:
    """Append a chunk's examples to the shards, less duplicates (when `result.keys`);
    count what happened. Returns the count of truncated turns written."""
    tally.read += result.dialogues
    keep = np.ones(result.dialogues, dtype=bool)
    if result.keys is not None:
        for i, key in enumerate(result.keys):
            if key in seen:
                keep[i] = False
            else:
                seen.add(key)
        tally.skipped["duplicate"] += int(np.count_nonzero(~keep))
    tally.skipped["turn-too-long"] += int(np.count_nonzero(keep & result.too_long))
    for split, (ids, types, mask, lengths) in result.arrays.items():
        in_split = result.valid == (split == "valid")
        kept = keep[in_split]
        if not kept.all():  # drop the examples (and their tokens) of duplicates
            examples = np.repeat(kept, result.examples[in_split])
            tokens = np.repeat(examples, lengths)
            ids, types, mask, lengths = ids[tokens], types[tokens], mask[tokens], lengths[examples]
        writers[split].add_many(ids, types, mask, lengths)
        split_dialogues[split] += int(np.count_nonzero(kept & ~result.too_long[in_split]))
    return int(result.truncated[keep].sum())


def _tokenizer(
    settings: PrepareSettings, corpus: Corpus, progress: Progress
) -> ConversationTokenizer:
    if settings.tokenizer:
        return ConversationTokenizer.from_pretrained(settings.tokenizer)
    from convcli.data.vocab import train_bpe_tokenizer

    strict = settings.on_error == "strict"

    def texts() -> Iterator[str]:
        for i, dialogue in enumerate(_records(corpus, strict, Tally())):
            yield from dialogue.turns
            if i % 1024 == 0:
                progress("tokenizer", corpus.bytes_read, corpus.total_bytes)
        progress("tokenizer", corpus.total_bytes, corpus.total_bytes)

    return ConversationTokenizer(train_bpe_tokenizer(texts(), settings.vocab_size))


def _sha256(path: Path) -> str:
    """A file's SHA-256; a folder's: of its files' relative paths and SHA-256s, sorted."""
    digest = hashlib.sha256()
    if path.is_dir():
        for file in sorted(p for p in path.rglob("*") if p.is_file()):
            digest.update(f"{file.relative_to(path).as_posix()}\0{_sha256(file)}\n".encode())
        return digest.hexdigest()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def _prepare_into(
    tmp: Path, settings: PrepareSettings, corpus: Corpus, progress: Progress
) -> PrepareResult:
    tokenizer = _tokenizer(settings, corpus, progress)
    tokenizer.save_pretrained(tmp / TOKENIZER_DIR)
    encoder = Encoder(tokenizer, settings)
    writers = {
        s: ShardWriter(tmp, s, encoder.dtype, shard_tokens=settings.shard_tokens) for s in SPLITS
    }
    strict = settings.on_error == "strict"
    tally = Tally()
    skipped = tally.skipped
    seen: set[bytes] = set()  # dedupe: one key per distinct dialogue (inherent to exact dedupe)
    split_dialogues = dict.fromkeys(SPLITS, 0)
    truncated = 0
    same_role = 0

    read_to: deque[int] = deque()  # input bytes read up to each chunk in flight

    def chunks() -> Iterator[Chunk | BadRecord]:
        for item in corpus.chunks(CHUNK_BYTES):
            read_to.append(corpus.bytes_read)
            yield item

    with _parallel(encoder, settings.workers) as parallel_map:
        for result in parallel_map(chunks()):
            bad = [result] if isinstance(result, BadRecord) else result.bad
            if bad and strict:
                raise bad[0].error()  # the first bad line of the corpus: results come in order
            tally.read += len(bad)
            for record in bad:
                skipped[record.reason] += 1
            if isinstance(result, Encoded):
                truncated += _write(result, writers, seen, tally, split_dialogues)
                same_role += result.same_role
            # Bytes done, not the bytes read ahead for the workers.
            progress("prepare", read_to.popleft(), corpus.total_bytes)
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
                    "bytes": input_bytes(path),
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
            "same_role_turns": same_role,
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
        formats=dict(corpus.formats),
        same_role_turns=same_role,
        manifest=manifest,
    )
