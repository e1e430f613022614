"""`convcli demo`: the whole pipeline on the bundled sample data, in a few minutes of CPU.

prepare (training a tokenizer) -> train a forward model -> train a reverse model ->
an MMI chat on held-out contexts. Each step is the core function behind a real
command, and is announced with that command, so the demo teaches the CLI. Finished
steps are reused on a rerun (a killed training resumes from its checkpoint).
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
from collections.abc import Iterator, Sequence
from contextlib import ExitStack
from dataclasses import dataclass, field, fields, replace
from importlib.resources import as_file, files
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from convcli.errors import ConvcliError

if TYPE_CHECKING:
    from convcli.training.fit import Progress, TrainResult
    from convcli.training.settings import TrainSettings

MARKER = "demo.json"
# The sample corpus ships inside the package (package data), so an ordinary install has it.
# sample_data/make_sample_data.py in the source tree writes it.
BUNDLED = "bundled"
CORPUS, CONTEXTS = "dialogues.jsonl", "contexts.jsonl"


@dataclass
class DemoSettings:
    """Options of `convcli demo`."""

    output: Path = Path("runs/demo")
    """Where everything goes: shards/, forward/, reverse/."""
    data: Path | None = None
    """A folder with dialogues.jsonl (to train on) and contexts.jsonl (held-out contexts);
    None: the sample corpus bundled with convcli."""
    steps: int = 700
    """Optimizer steps for each of the two models."""
    seed: int = 0
    """Seed of training and of the chat's sampling."""
    num_candidates: int = 8
    """MMI candidates per reply."""
    fresh: bool = False
    """Start over instead of reusing finished steps."""
    device: str | None = None
    """Device of the chat (training uses Lightning's automatic choice)."""
    progress: Literal["bar", "lines", "off"] = "bar"
    """Training progress on stderr: a bar (a terminal), a line every few seconds, or none."""


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

    @property
    def matches(self) -> bool:
        """Whether the reply is exactly the one the sample data implies."""
        return bool(self.expected) and self.reply.strip() == self.expected.strip()


@dataclass
class Finished:
    """The end: how many replies matched the sample data, and how to chat yourself."""

    matched: int
    expected: int
    chat_command: str


Event = Step | StepDone | Exchange | Finished
STEPS = 4
# Candidate sampling of the chat step: `convcli chat`'s defaults (top-k 50, top-p 0.95)
# at a lower temperature, which keeps a tiny model's candidates on the patterns it learnt.
CHAT_TEMPERATURE = 0.5


def _chat_sampling() -> dict[str, Any]:
    """`convcli chat`'s sampling defaults (defined once, in inference/settings.py), cooler."""
    from convcli.inference.settings import CHAT_SAMPLING

    return replace(CHAT_SAMPLING, temperature=CHAT_TEMPERATURE).generate_kwargs()


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
    """The tiny preset with a learning rate and batch that learn the sample data quickly:
    many small batches (512 tokens, ~17 dialogues) beat fewer large ones per CPU second."""
    from convcli.training.settings import TrainSettings

    return TrainSettings(
        data=shards, output=run, preset="tiny", max_steps=s.steps, learning_rate=3e-3,
        warmup_steps=20, batch_tokens=512, val_every=s.steps,
        save_every=max(s.steps // 3, 1), seed=s.seed, reverse=reverse,
    )  # fmt: skip


def _data_files(s: DemoSettings, stack: ExitStack) -> tuple[Path, Path]:
    """The corpus and the held-out contexts as files on disk, for as long as `stack` is open
    (a bundled file inside a zipped install is extracted to a temporary file)."""
    if s.data is None:
        bundled = files("convcli.apps") / "demo_data"
        paths = [stack.enter_context(as_file(bundled / name)) for name in (CORPUS, CONTEXTS)]
        for path in paths:
            if not path.is_file():  # a broken install, not a user mistake: say where
                raise ConvcliError(f"{path} not found: the bundled sample data is missing")
    else:
        paths = [s.data / name for name in (CORPUS, CONTEXTS)]
        for path in paths:
            if not path.is_file():
                raise ConvcliError(f"{path} not found (data needs {path.name})")
    return paths[0], paths[1]


def _start(s: DemoSettings) -> None:
    out = s.output
    if out.exists() and any(out.iterdir()) and not (out / MARKER).is_file():
        raise ConvcliError(f"{out} exists and is not a demo directory; choose another --output")
    # What the finished steps were made with: reusing them under other settings would lie.
    data = BUNDLED if s.data is None else str(s.data.resolve())
    made_with = {"data": data, "steps": s.steps, "seed": s.seed}
    if s.fresh and out.exists():
        shutil.rmtree(out)
    if (out / MARKER).is_file():
        before = {k: None for k in made_with} | json.loads((out / MARKER).read_text("utf-8"))
        changed = [
            f"{k} {before.get(k)} -> {v}" for k, v in made_with.items() if before.get(k) != v
        ]
        if changed:
            raise ConvcliError(
                f"{out} was made with other settings ({'; '.join(changed)}): "
                "pass --fresh to start over, or choose another --output"
            )
    out.mkdir(parents=True, exist_ok=True)
    (out / MARKER).write_text(json.dumps(made_with) + "\n", encoding="utf-8")


def run_demo(s: DemoSettings) -> Iterator[Event]:
    """Run (or resume) the demo, yielding what happens for the CLI to show."""
    with ExitStack() as stack:
        corpus, contexts = _data_files(s, stack)
        _start(s)
        yield from _run(s, corpus, contexts)


def _run(s: DemoSettings, corpus: Path, contexts: Path) -> Iterator[Event]:
    from convcli.data.prepare import PrepareSettings, prepare
    from convcli.data.shards import Shards

    shards, forward, reverse = s.output / "shards", s.output / "forward", s.output / "reverse"

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

    yield from _train_steps(s, shards, forward, reverse)

    chat = shlex.join([
        "convcli", "chat", str(forward / "final"), "--reverse-model", str(reverse / "final"),
        "--num-candidates", str(s.num_candidates), "--temperature", str(CHAT_TEMPERATURE),
        "--seed", str(s.seed),
    ])  # fmt: skip
    yield Step(4, "chat on held-out contexts, replies reranked by MMI", chat, reused=False)
    matched = expected = 0
    for exchange in _chat(s, forward / "final", reverse / "final", contexts):
        expected += bool(exchange.expected)
        matched += exchange.matches
        yield exchange
    yourself = shlex.join([
        "convcli", "chat", str(forward / "final"), "--reverse-model", str(reverse / "final"),
        "--temperature", str(CHAT_TEMPERATURE),
    ])  # fmt: skip
    yield Finished(matched, expected, yourself)


def _threads_each() -> int:
    """Torch threads of a training: half of the cores, as two run side by side (and when
    one runs alone, a tiny model gains little from more threads, while threads fighting
    over a core that is busy with other work slow it down several-fold)."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return max(1, (cores or 1) // 2)


def _fit(settings: TrainSettings, threads: int, progress: Progress | bool) -> TrainResult:
    """`train` with this many torch threads (also the target of the second process)."""
    from convcli.training.fit import train

    # A killed run resumes from its newest checkpoint; anything else starts over.
    resume = "auto" if any((settings.output / "checkpoints").glob("*.ckpt")) else None
    again = replace(settings, resume=resume, overwrite=resume is None, threads=threads)
    return train(again, progress=progress)


def _summary(what: str, result: TrainResult) -> StepDone:
    ppl = f"validation perplexity {result.val_ppl:.2f}" if result.val_ppl else "no validation"
    return StepDone(
        f"{what}: {result.steps} steps in {result.seconds:.0f} s, {ppl} -> {result.final}"
    )


def _train_steps(s: DemoSettings, shards: Path, forward: Path, reverse: Path) -> Iterator[Event]:
    """Steps 2 and 3. When both models need training, the reverse one trains in a second
    process at the same time as the forward one (each on half of the cores)."""
    todo = []
    for number, run, is_reverse in ((2, forward, False), (3, reverse, True)):
        settings = _train_settings(s, shards, run, is_reverse)
        done = (run / "final" / "convcli.json").is_file()
        title = "train a reverse model (response -> message) for MMI" if is_reverse else (
            "train the forward model"
        )  # fmt: skip
        if is_reverse and not done and todo:
            title += ", in a second process alongside step 2"
        yield Step(number, title, _command("train", settings), reused=done)
        if not done:
            todo.append(("reverse" if is_reverse else "forward", settings))
    if not todo:
        return
    threads = _threads_each()
    if len(todo) == 1:  # a rerun after one of the two was interrupted
        name, settings = todo[0]
        yield _summary(name, _fit(settings, threads, progress=s.progress))
        return
    import multiprocessing

    # spawn: a fresh interpreter, never a fork of a process that has started torch threads.
    context = multiprocessing.get_context("spawn")
    receive, send = context.Pipe(duplex=False)
    second = context.Process(target=_fit_and_send, args=(send, todo[1][1], threads))
    second.start()
    send.close()  # the child holds the sending end: EOF here if it dies
    try:
        yield _summary(todo[0][0], _fit(todo[0][1], threads, progress=s.progress))
        try:
            ok, value = receive.recv()
        except EOFError:
            second.join()
            raise ConvcliError(
                f"training the {todo[1][0]} model stopped (exit code {second.exitcode}); "
                "run the demo again to resume it"
            ) from None
        if not ok:
            raise value
        yield _summary(todo[1][0], value)
    finally:
        if second.is_alive():
            # The first one failed or was stopped. (Lightning would answer SIGTERM only at
            # its next step.) The newest checkpoint remains for a rerun.
            second.kill()
        second.join()


def _fit_and_send(send: Any, settings: TrainSettings, threads: int) -> None:
    """The second process: train, then send (True, result) or (False, the error)."""
    import signal

    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    try:
        send.send((True, _fit(settings, threads, progress=False)))
    except ConvcliError as exc:  # anything else is a bug: its traceback goes to stderr
        send.send((False, exc))


def _chat(
    s: DemoSettings, forward_dir: Path, reverse_dir: Path, contexts: Path
) -> Iterator[Exchange]:
    from convcli.evaluation import read_samples
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

    forward = ConversationModel.from_pretrained(forward_dir, device=s.device)
    reverse = ConversationModel.from_pretrained(reverse_dir, device=s.device)
    reranker = MMIReranker(forward, reverse, num_candidates=s.num_candidates)
    samples = read_samples(contexts)
    results = reranker.respond_batch([x.context for x in samples], seed=s.seed, **_chat_sampling())
    for sample, result in zip(samples, results, strict=True):
        candidates = [(c.text, c.score) for c in result.candidates]
        yield Exchange(sample.context, result.response, sample.reference, candidates)
