"""Generation, MMI and runtime settings shared by generate, chat, eval, demo and serve.

Light on purpose (no torch): the CLI builds its options from these dataclasses, and
their defaults are the one definition every front end uses.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

MMISource = Literal["last", "history"]


@dataclass
class SamplingSettings:
    """How the forward model decodes; None leaves transformers' generation default."""

    max_new_tokens: int | None = None
    """Tokens to generate at most (default 64, capped to fit the model)."""
    min_new_tokens: int | None = None
    """Tokens to generate at least."""
    do_sample: bool | None = None
    """Sample instead of decoding greedily (default: greedy; MMI candidates: sampled)."""
    temperature: float | None = None
    """Sampling temperature."""
    top_k: int | None = None
    """Sample from the k likeliest tokens."""
    top_p: float | None = None
    """Nucleus sampling: sample from the likeliest tokens holding this much probability."""
    num_beams: int | None = None
    """Beam search width."""
    repetition_penalty: float | None = None
    """Penalty for repeated tokens (1.0: none)."""
    no_repeat_ngram_size: int | None = None
    """Never repeat an n-gram of this size."""
    num_return_sequences: int | None = None
    """Responses per context (one per line)."""
    seed: int | None = None
    """Random seed: the same seed gives the same output."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        least = {"max_new_tokens": 1, "min_new_tokens": 0, "top_k": 0, "num_beams": 1,
                 "no_repeat_ngram_size": 0, "num_return_sequences": 1}  # fmt: skip
        for name, low in least.items():
            value = getattr(self, name)
            if value is not None and value < low:
                raise UsageError(f"`{name}` must be at least {low}, got {value}", param=name)
        for name in ("temperature", "repetition_penalty"):
            value = getattr(self, name)
            if value is not None and value < 0:
                raise UsageError(f"`{name}` must be >= 0, got {value}", param=name)
        if self.top_p is not None and not 0 <= self.top_p <= 1:
            raise UsageError(f"`top_p` must be in [0, 1], got {self.top_p}", param="top_p")

    def generate_kwargs(self) -> dict[str, Any]:
        """The transformers `generate` options that are set (the seed is not one)."""
        values = ((f.name, getattr(self, f.name)) for f in fields(self) if f.name != "seed")
        return {name: value for name, value in values if value is not None}


# Chat (and a server's chat turns) sample: these are their defaults.
CHAT_SAMPLING = SamplingSettings(do_sample=True, top_k=50, top_p=0.95)
# MMI candidates are sampled unless the caller says otherwise (the tutorial's top-k).
MMI_CANDIDATE_SAMPLING = SamplingSettings(do_sample=True, top_k=50)


@dataclass
class MMISettings:
    """Maximum Mutual Information reranking by a reverse model."""

    reverse_model: Path | None = None
    """A reverse model folder: rerank sampled candidates by MMI (none: no reranking)."""
    num_candidates: int = 8
    """Candidates sampled for MMI."""
    mmi_temperature: float = 0.5
    """Pick the reply from softmax(score / T) with this T."""
    mmi_argmax: bool = False
    """Pick the best-scored candidate instead of sampling one."""
    mmi_source: MMISource = "last"
    """Score candidates against the last message or the whole history (newest first)."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        if self.num_candidates < 1:
            raise UsageError(
                f"`num_candidates` must be at least 1, got {self.num_candidates}",
                param="num_candidates",
            )
        if not self.mmi_argmax and self.mmi_temperature <= 0:
            raise UsageError(
                f"`mmi_temperature` must be positive, got {self.mmi_temperature}",
                param="mmi_temperature",
            )
        if self.mmi_source not in ("last", "history"):
            raise UsageError(
                f"`mmi_source` must be last or history, got {self.mmi_source!r}", param="mmi_source"
            )


def default_threads() -> int:
    """Intra-op threads when none are asked for: OMP_NUM_THREADS if set, else half the
    CPUs this process may use (at most 8). Other jobs on a busy machine keep the rest, and
    small models gain little from more threads."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) > 0:
        return int(env)
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    return max(1, min(8, cpus // 2))


@dataclass
class RuntimeSettings:
    """Where and how hard the model runs."""

    device: str | None = None
    """cpu, cuda, cuda:1, mps... (default: CUDA when present, else CPU)."""
    threads: int | None = None
    """CPU threads for torch (intra-op). Default: OMP_NUM_THREADS if set, else half of this
    machine's CPUs, at most 8."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        if self.threads is not None and self.threads < 1:
            raise UsageError(f"`threads` must be at least 1, got {self.threads}", param="threads")


Backend = Literal["torch", "ctranslate2"]
ComputeType = Literal["int8", "int8_float32", "float32", "int8_float16", "int8_bfloat16",
                      "float16", "bfloat16"]  # fmt: skip


@dataclass
class EngineSettings(RuntimeSettings):
    """Where and how hard the model runs, and which engine decodes (generate and chat)."""

    backend: Backend = "torch"
    """Decode with torch (float32, the default) or CTranslate2 (int8 on CPU, about 2.5x
    faster per token on two cores; needs the ctranslate2 package)."""
    compute_type: ComputeType | None = None
    """CTranslate2's weights and arithmetic (default int8)."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        super().__post_init__()
        if self.compute_type is not None and self.backend != "ctranslate2":
            raise UsageError("`compute_type` is for `backend` ctranslate2", param="compute_type")


@dataclass
class ChatSettings:
    """A chat's conversation: its opening, memory and record."""

    context: Path | None = None
    """Opening turns always kept (persona): a JSON array, or one turn per line."""
    max_history_tokens: int | None = None
    """Keep the history within this many tokens, oldest turns dropped (default: what fits
    the model)."""
    transcript: Path | None = None
    """Append every turn to this JSONL file as it happens."""
    resume_transcript: bool = False
    """Continue the last conversation in `transcript`."""
    show_candidates: bool = False
    """Show the MMI candidates and their scores every turn (stderr)."""
    verbose: bool = False
    """Report time and tokens/s per turn (stderr)."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        if self.max_history_tokens is not None and self.max_history_tokens < 8:
            raise UsageError(
                f"`max_history_tokens` must be at least 8, got {self.max_history_tokens}",
                param="max_history_tokens",
            )


@dataclass
class BatchSettings:
    """Answering many contexts from a JSONL file."""

    input: Path | None = None
    """JSONL of contexts (arrays of turns, or objects with 'turns'); - for stdin."""
    output: Path | None = None
    """Where to write the JSONL answers (default: stdout)."""
    batch_size: int = 8
    """Contexts per generate call."""
    on_error: Literal["strict", "skip"] = "strict"
    """A bad input line: stop at it (strict), or count and skip it."""
    overwrite: bool = False
    """Replace an existing `output` file (it is replaced only once all answers are written)."""

    def __post_init__(self) -> None:
        from convcli.errors import UsageError

        if self.batch_size < 1:
            raise UsageError(
                f"`batch_size` must be at least 1, got {self.batch_size}", param="batch_size"
            )
