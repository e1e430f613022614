"""`convcli demo`: the whole pipeline on the embedded sample data, in a few minutes of CPU.

prepare (training a tokenizer) -> train a forward model -> train a reverse model ->
an MMI chat on held-out contexts. Each step is the core function behind a real
command, and is announced with that command, so the demo teaches the CLI. Finished
steps are reused on a rerun (a killed training resumes from its checkpoint).
"""

from __future__ import annotations

import json
import shlex
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.errors import ConvcliError

if TYPE_CHECKING:
    from convcli.training.settings import TrainSettings

SAMPLE_DATA = Path(__file__).resolve().parents[1] / "sample_data"
MARKER = "demo.json"


@dataclass
class DemoSettings:
    """Options of `convcli demo`."""

    output: Path = Path("runs/demo")
    """Where everything goes: shards/, forward/, reverse/."""
    data: Path = SAMPLE_DATA
    """A folder with dialogues.jsonl (to train on) and contexts.jsonl (held-out contexts)."""
    steps: int = 300
    """Optimizer steps for each of the two models."""
    seed: int = 0
    """Seed of training and of the chat's sampling."""
    num_candidates: int = 8
    """MMI candidates per reply."""
    fresh: bool = False
    """Start over instead of reusing finished steps."""
    device: str | None = None
    """Device of the chat (training uses Lightning's automatic choice)."""


@dataclass
class Step:
    """A step begins: what it does and the command that does the same."""

    number: int
    title: str
    command: str
    reused: bool


@dataclass
class StepDone:
    summary: str


@dataclass
class Exchange:
    """One held-out context and the demo model's MMI reply."""

    context: list[str]
    reply: str
    expected: str | None
    candidates: list[tuple[str, float]] = field(default_factory=list)


Event = Step | StepDone | Exchange
STEPS = 4


def _command(
    name: str, settings: Any, *, positional: Sequence[Any] = (), skip: tuple[str, ...] = ()
) -> str:
    """The `convcli NAME ...` line that runs with these settings: positional arguments,
    then a flag for every field that differs from its default."""
    defaults = type(settings)()
    args = [str(a) for a in positional]
    for f in fields(settings):
        value = getattr(settings, f.name)
        if f.name in skip or value == getattr(defaults, f.name):
            continue
        flag = "--" + f.name.replace("_", "-")
        if isinstance(value, bool):
            args.append(flag if value else f"--no-{flag[2:]}")
        else:
            args += [flag, str(value)]
    return " ".join(["convcli", name, *map(shlex.quote, args)])


def _train_settings(s: DemoSettings, shards: Path, run: Path, reverse: bool) -> TrainSettings:
    """The tiny preset with a learning rate and batch that learn the sample data quickly."""
    from convcli.training.settings import TrainSettings

    return TrainSettings(
        data=shards, output=run, preset="tiny", max_steps=s.steps, learning_rate=3e-3,
        warmup_steps=20, batch_tokens=2048, val_every=s.steps,
        save_every=max(s.steps // 3, 1), seed=s.seed, reverse=reverse,
    )  # fmt: skip


def _start(s: DemoSettings) -> None:
    out = s.output
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConvcliError(f"{out} exists and is not a demo directory; choose another --output")
    if s.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps({"data": str(s.data)}) + "\n", encoding="utf-8")
    for name in ("dialogues.jsonl", "contexts.jsonl"):
        if not (s.data / name).is_file():
            raise ConvcliError(f"{s.data / name} not found (--data needs {name})")


def run_demo(s: DemoSettings) -> Iterator[Event]:
    """Run (or resume) the demo, yielding what happens for the CLI to show."""
    from convcli.data.prepare import PrepareSettings, prepare
    from convcli.data.shards import Shards

    _start(s)
    shards, forward, reverse = s.output / "shards", s.output / "forward", s.output / "reverse"
    corpus = s.data / "dialogues.jsonl"

    try:
        Shards(shards)
        done = True
    except ConvcliError:
        done = False
    settings = PrepareSettings(
        inputs=[str(corpus)], output=shards, train_tokenizer=True, vocab_size=1000
    )
    yield Step(
        1, "tokenize the sample corpus into shards (training a byte-level BPE tokenizer)",
        _command("prepare", settings, positional=settings.inputs, skip=("inputs",)),
        reused=done,
    )  # fmt: skip
    if not done:
        result = prepare(replace(settings, overwrite=True))
        yield StepDone(
            f"{result.dialogues_read} dialogues -> {result.examples} examples, "
            f"{result.tokens:,} tokens"
        )

    for number, run, reverse_flag in ((2, forward, False), (3, reverse, True)):
        yield from _train_step(s, number, shards, run, reverse_flag)

    chat = shlex.join([
        "convcli", "chat", str(forward / "final"), "--reverse-model", str(reverse / "final"),
        "--num-candidates", str(s.num_candidates), "--seed", str(s.seed),
    ])  # fmt: skip
    yield Step(4, "chat on held-out contexts, replies reranked by MMI", chat, reused=False)
    yield from _chat(s, forward / "final", reverse / "final")


def _train_step(
    s: DemoSettings, number: int, shards: Path, run: Path, reverse: bool
) -> Iterator[Event]:
    from convcli.training.fit import train

    settings = _train_settings(s, shards, run, reverse)
    what = "a reverse model (response -> message) for MMI" if reverse else "the forward model"
    done = (run / "final" / "convcli.json").is_file()
    yield Step(number, f"train {what}", _command("train", settings), reused=done)
    if done:
        return
    # A killed run resumes from its newest checkpoint; anything else starts over.
    resume = "auto" if any((run / "checkpoints").glob("*.ckpt")) else None
    result = train(replace(settings, resume=resume, overwrite=resume is None))
    ppl = f"validation perplexity {result.val_ppl:.2f}" if result.val_ppl else "no validation"
    yield StepDone(f"{result.steps} steps in {result.seconds:.0f} s, {ppl} -> {result.final}")


def _chat(s: DemoSettings, forward_dir: Path, reverse_dir: Path) -> Iterator[Exchange]:
    from convcli.evaluation import read_samples
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

    forward = ConversationModel.from_pretrained(forward_dir, device=s.device)
    reverse = ConversationModel.from_pretrained(reverse_dir, device=s.device)
    reranker = MMIReranker(forward, reverse, num_candidates=s.num_candidates)
    samples = read_samples(s.data / "contexts.jsonl")
    results = reranker.respond_batch([x.context for x in samples], seed=s.seed)
    for sample, result in zip(samples, results, strict=True):
        candidates = [(c.text, c.score) for c in result.candidates]
        yield Exchange(sample.context, result.response, sample.reference, candidates)
