"""Settings of `convcli prepare` (a light module: the CLI imports it without torch)."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from convcli.data.readers.registry import FORMATS

# The choices of `format`: one per reader in the registry (a new reader adds its own).
FORMAT_CHOICES = ("auto", *FORMATS)


@dataclass
class PrepareSettings:
    """How `prepare` turns dialogue corpora into a shard directory."""

    inputs: list[str] = field(default_factory=list)
    """Input files, globs, or folders (a dataset saved to disk, a ConvoKit corpus); .gz works
    too."""

    output: Path | None = None
    """The shard directory to write."""

    tokenizer: str | None = None
    """Tokenizer folder or Hugging Face name (e.g. a model folder). Or use `train_tokenizer`."""

    train_tokenizer: bool = False
    """Train a byte-level BPE tokenizer on the inputs instead of loading one."""

    vocab_size: int = 8000
    """Vocabulary size of the trained tokenizer (with `train_tokenizer`)."""

    format: Literal[FORMAT_CHOICES] = "auto"  # type: ignore[valid-type]
    """Input format; auto finds it per file from the extension and first lines, and refuses
    a file that fits none."""

    field: str | None = None
    """The column (Parquet, Arrow, dataset folders) or key (JSONL objects: turns, chat
    messages, ShareGPT) that holds the turns, where it is not the usual one."""

    split: str | None = None
    """The split to read from a dataset folder of several (default: train)."""

    same_role: Literal["join", "split"] = "join"
    """Two turns in a row of one role (chat messages, transcripts): join them into one turn
    (with a newline between) or keep them as two turns. Counted either way."""

    tree_paths: Literal["leaves", "all"] = "leaves"
    """Reply trees (ConvoKit): a dialogue per root-to-leaf path, or per node (its path from
    the root, as DialoGPT trains on)."""

    max_depth: int | None = None
    """Reply trees: drop replies deeper than this many turns (none: keep all). Bounds the
    turns a deep thread makes."""

    max_length: int = 1024
    """Most tokens per example; longer dialogues become several examples by whole turns."""

    long_turn: Literal["truncate", "skip"] = "truncate"
    """A single turn longer than `max_length`: truncate it (keeps its start) or skip its
    dialogue."""

    valid_fraction: float = 0.05
    """Fraction of dialogues for the validation split, chosen by a hash of each dialogue."""

    dedupe: bool = False
    """Drop exact duplicate dialogues (same turns), keeping the first. Keeps one 16-byte key
    per distinct dialogue in memory (about 100 MB per million), so memory grows with the
    corpus."""

    on_error: Literal["strict", "skip"] = "strict"
    """A bad input line: stop with file:line (strict) or skip it and count it by reason."""

    workers: int = 2
    """Processes that tokenize in parallel (the output does not depend on it)."""

    shard_tokens: int = 2**28
    """Tokens per shard file before a new one starts."""

    overwrite: bool = False
    """Replace the output directory if it exists."""
