"""`convcli eval`: held-out loss and perplexity on shards, and response metrics.

Loss uses the very pieces training uses (labels from the stored loss flags, the same
re-layout for reverse models, the same summed token loss), so an eval perplexity is
comparable with the validation perplexity logged by `train`. Response metrics
generate a reply per context and compare it with a reference (`response_metrics` below);
with a reverse model, plain sampling and MMI are measured in the same run.

Response metrics: distinct-n, unigram F1, length; pure functions on text. Words are
runs of non-space letters/digits; kana and CJK ideographs count as one word per
character (Japanese has no spaces), so the metrics mean the same in both. Punctuation
is ignored and case folded, as in ParlAI's F1.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convcli.errors import ConvcliError, InputError, UsageError
from convcli.inference.settings import SamplingSettings

if TYPE_CHECKING:
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

Progress = Callable[[int], None]
"""Called with the number of examples (or contexts) just processed."""


@dataclass
class EvalSettings:
    """What `eval` measures: loss on shards and/or responses to contexts."""

    data: Path | None = None
    """A shard directory: report loss and perplexity on one of its splits."""
    split: str = "valid"
    """The shard split to score."""
    train_on: Literal["responses", "all", "weights"] = "responses"
    """Which tokens count, as in training's `train_on`."""
    batch_tokens: int = 4096
    """Tokens per batch (loss)."""
    input: Path | None = None
    """JSONL contexts to answer: arrays of turns or objects with 'turns'."""
    references: Path | None = None
    """JSONL references, one per context (default: a 'reference' or 'expected' key, else
    each line's last turn)."""
    batch_size: int = 16
    """Contexts per generate call."""
    output: Path | None = None
    """Also write the report as JSON to this file, and the resolved settings beside it
    (same name, .yaml)."""

    def __post_init__(self) -> None:
        for name in ("batch_tokens", "batch_size"):
            if getattr(self, name) < 1:
                raise UsageError(f"`{name}` must be at least 1, got {getattr(self, name)}",
                                 param=name)  # fmt: skip

    def check(self) -> None:
        """Refuse settings with nothing to evaluate (once every source is merged)."""
        if self.data is None and self.input is None:
            raise UsageError(
                "give `data` SHARDS (loss) and/or `input` CONTEXTS.jsonl (responses)",
                param=("data", "input"),
            )
        if self.references is not None and self.input is None:
            raise UsageError("`references` needs `input`", param=("references", "input"))


# Plain answers and MMI candidates are sampled with a fixed seed, so runs compare.
EVAL_SAMPLING = SamplingSettings(seed=0)


def save_report(path: str | Path, report: dict[str, Any], *settings: Any) -> Path:
    """Write the report as JSON and the settings that made it beside it (.yaml)."""
    from convcli.settings import to_yaml

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    header = "convcli eval: the resolved settings of this report"
    texts = [to_yaml(s, header=header if i == 0 else "") for i, s in enumerate(settings)]
    config = path.with_suffix(".yaml")
    config.write_text("\n".join(texts), encoding="utf-8")
    return config


@dataclass
class LossReport:
    """Per-token loss of a model on one split of a shard directory."""

    split: str
    train_on: str
    reverse: bool
    examples: int
    tokens: int
    """Tokens that carry loss under `train_on` (the denominator)."""
    loss: float
    perplexity: float


def evaluate_loss(
    model: ConversationModel,
    shards: str | Path,
    *,
    split: str = "valid",
    train_on: str = "responses",
    batch_tokens: int = 4096,
    progress: Progress | None = None,
) -> LossReport:
    """Summed token loss / labelled tokens over a whole split (not a mean of batch means)."""
    import torch

    model.require_torch("evaluating the loss")

    from convcli.data.shards import Shards
    from convcli.training.batching import BatchPlan, BucketBatchSampler
    from convcli.training.datamodule import Collate, TrainingExamples
    from convcli.training.module import token_loss

    opened = Shards(shards)
    recorded = opened.manifest.get("tokenizer", {}).get("fingerprint")
    if recorded and recorded != model.tokenizer.fingerprint():
        raise ConvcliError(
            f"{shards} was prepared with another tokenizer than the model's "
            "(fingerprints differ): prepare it with the model's tokenizer"
        )
    if len(opened.split(split)) == 0:
        raise ConvcliError(f"{shards}: the {split} split is empty")
    meta = model.meta
    examples = TrainingExamples(
        opened.path, split, model.sep_token_id,
        train_on=train_on, reverse=meta.reverse, max_length=model.n_positions,
    )  # fmt: skip
    sampler = BucketBatchSampler(examples.lengths(), BatchPlan(batch_tokens), shuffle=False)
    collate = Collate(model.tokenizer.pad_token_id, meta.token_types)
    total, count = 0.0, 0
    with torch.inference_mode():
        for batch in sampler:
            inputs = collate([examples[key] for key in batch])
            labels = inputs.pop("labels").to(model.device)
            inputs = {k: v.to(model.device) for k, v in inputs.items()}
            loss, n = token_loss(model.model(**inputs).logits, labels)
            total, count = total + float(loss), count + int(n)
            if progress:
                progress(len(batch))
    if count == 0:
        raise ConvcliError(f"{shards}: no token of the {split} split carries loss with {train_on}")
    loss = total / count
    return LossReport(
        split, train_on, meta.reverse, len(examples), count, loss, math.exp(min(loss, 50.0))
    )


@dataclass
class Sample:
    """A context and the reply a good model would give."""

    line: int
    context: list[str]
    reference: str


@dataclass
class ResponseReport:
    """Metrics of one way of answering (plain sampling, or MMI) over all samples."""

    system: str
    samples: int
    metrics: dict[str, float]
    examples: list[dict[str, Any]] = field(default_factory=list)
    """The first few (context, reference, response) triples, for a look."""


def read_samples(path: str | Path, references: str | Path | None = None) -> list[Sample]:
    """Contexts and references from JSONL.

    Each line of `path` is a context as `data.readers.contexts` reads it (a JSON array of
    turns, an object with `turns`, chat `messages` or ShareGPT `conversations`), its object
    optionally with `reference` or `expected`. Without a separate `references` file (one
    JSON string per line, or an object with `reference`), a line's reference is its
    `reference`/`expected` key, else its last turn (the context is the turns before).
    """
    from convcli.data.readers.contexts import parse_context

    path = Path(path)
    samples = []
    refs = iter(_read_references(Path(references))) if references else None
    for number, text in _lines(path):
        item = parse_context(text, path=str(path), line=number)
        turns, reference = item.turns, item.extra.get("reference", item.extra.get("expected"))
        if refs is not None:
            reference = next(refs, None)
            if reference is None:
                raise InputError(
                    f"no reference for this context in {references}", path=str(path), line=number
                )
        elif reference is None:
            if len(turns) < 2:
                raise InputError(
                    "needs a reference: a 'reference' key, `references`, or at least two "
                    "turns (the last one is the reference)",
                    path=str(path),
                    line=number,
                )
            turns, reference = turns[:-1], turns[-1]
        if not isinstance(reference, str):
            raise InputError("the reference must be a string", path=str(path), line=number)
        samples.append(Sample(number, turns, reference))
    if refs is not None and next(refs, None) is not None:
        raise ConvcliError(f"{references} has more references than {path} has contexts")
    if not samples:
        raise ConvcliError(f"{path}: no contexts to evaluate")
    return samples


def _lines(path: Path) -> Iterator[tuple[int, str]]:
    try:
        with open(path, encoding="utf-8-sig") as f:
            for number, text in enumerate(f, 1):
                if text.strip():
                    yield number, text
    except FileNotFoundError:
        raise ConvcliError(f"file not found: {path}") from None
    except UnicodeDecodeError as exc:
        raise ConvcliError(f"{path}: not UTF-8 text ({exc.reason})") from None


def _read_references(path: Path) -> Iterable[str]:
    from convcli.data.readers.lines import json_error

    for number, text in _lines(path):
        try:
            value = json.loads(text)
        except ValueError as exc:
            raise InputError(json_error(exc), path=str(path), line=number) from None
        if isinstance(value, dict):
            value = value.get("reference")
        if not isinstance(value, str):
            raise InputError(
                "expected a JSON string (or an object with 'reference')",
                path=str(path),
                line=number,
            )
        yield value


def evaluate_responses(
    model: ConversationModel,
    samples: list[Sample],
    *,
    reranker: MMIReranker | None = None,
    batch_size: int = 16,
    seed: int | None = 0,
    show: int = 3,
    progress: Progress | None = None,
    **generate_kwargs: Any,
) -> list[ResponseReport]:
    """Answer every sample and score the answers; with a reranker, MMI too, in the same run.

    Plain answers are sampled like MMI's candidates (top-k 50 unless `generate_kwargs`
    say otherwise), so the two differ only by the reranking.
    """
    from convcli.inference.mmi import DEFAULT_SAMPLING

    options = {**DEFAULT_SAMPLING, **generate_kwargs}
    systems: dict[str, Callable[[list[list[str]], int | None], list[str]]] = {
        "sampling": lambda batch, s: model.generate(batch, seed=s, **options).responses
    }
    if reranker is not None:
        systems["mmi"] = lambda batch, s: [
            r.response for r in reranker.respond_batch(batch, seed=s, **options)
        ]
    references = [s.reference for s in samples]
    reports = []
    for name, answer in systems.items():
        responses: list[str] = []
        for start in range(0, len(samples), batch_size):
            chunk = samples[start : start + batch_size]
            responses += answer([s.context for s in chunk], None if seed is None else seed + start)
            if progress:
                progress(len(chunk))
        shown = [
            {"context": s.context, "reference": s.reference, "response": r}
            for s, r in zip(samples[:show], responses, strict=False)
        ]
        metrics = response_metrics(responses, references)
        reports.append(ResponseReport(name, len(samples), metrics, shown))
    return reports


# Response metrics (see the module docstring).

_CJK = "\u3040-\u30ff\u3400-\u4dbf\u4e00-\u9fff\uf900-\ufaff"
_WORD = re.compile(rf"[{_CJK}]|[^\W{_CJK}]+")


def words(text: str) -> list[str]:
    """Normalised words of a text (see module docstring)."""
    return _WORD.findall(text.casefold())


def distinct_n(texts: Sequence[str], n: int) -> float:
    """Distinct n-grams / all n-grams over the whole set of texts (Li et al., 2016)."""
    total = 0
    seen: set[tuple[str, ...]] = set()
    for text in texts:
        tokens = words(text)
        grams = [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]
        total += len(grams)
        seen.update(grams)
    return len(seen) / total if total else 0.0


def unigram_f1(hypothesis: str, reference: str) -> float:
    """Bag-of-words F1 between a response and its reference."""
    hyp, ref = Counter(words(hypothesis)), Counter(words(reference))
    common = sum((hyp & ref).values())
    if common == 0:
        return 0.0
    precision, recall = common / sum(hyp.values()), common / sum(ref.values())
    return 2 * precision * recall / (precision + recall)


def response_metrics(
    responses: Sequence[str], references: Sequence[str] | None
) -> dict[str, float]:
    """distinct-1/2, average length in words, and mean unigram F1 when references are given."""
    result = {
        "distinct_1": distinct_n(responses, 1),
        "distinct_2": distinct_n(responses, 2),
        "avg_length": sum(len(words(r)) for r in responses) / len(responses) if responses else 0.0,
    }
    if references is not None:
        if len(references) != len(responses):
            raise ValueError(f"{len(responses)} responses but {len(references)} references")
        scores = [unigram_f1(h, r) for h, r in zip(responses, references, strict=True)]
        result["f1"] = sum(scores) / len(scores) if scores else 0.0
    return result
