"""Whole `prepare` tokens/s against raw `tokenizers` encode_batch, and peak memory at 1x/10x.

    python benchmarks/prepare_throughput.py [--turns 200000] [--scale 10] [--tokenizer DIR]
        [--only tokenize|formats|memory|parquet-memory]

On a generated corpus (JSONL, deterministic), measured in this process:
  baseline: the backend `tokenizers.Tokenizer.encode_batch` over every turn (its own threads);
            also `encode_batch_fast` (no character offsets), which prepare itself uses where
            tokenizers has it: the stricter baseline.
  prepare:  the whole pipeline (read, check, split, tokenize, lay out, write shards), 2 workers.
Both are divided into the same count of text tokens; the ratio is prepare / baseline
(target >= 0.8). Each repeat times the baselines and prepare back to back; the machine is
shared, so the ratio of each repeat is printed as well as the best times' ratio. Peak
memory is measured in child processes (ru_maxrss of the process and of its tokenizer
workers) on the corpus and on one `--scale` times larger.

Formats: the same dialogues as chat-messages JSONL (user/assistant in turn) against the
JSONL of turns, whole prepare each, back to back (ratio messages/jsonl, target >= 0.9);
and peak memory of prepare on a Parquet file of them (a `messages` list-of-structs column,
the heaviest shape) against one `--scale` times larger (target <= 1.2).
"""

from __future__ import annotations

import argparse
import json
import random
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GPT2 = REPO.parent / "shared" / "gpt2-tokenizer"

_TEXT = """i you we they it is are was like love want have tea coffee rice bread music movies
the a an this that today tomorrow yesterday very really quite good nice fine great hello hi
thanks sure maybe no yes where when what how why who name town city weather sunny rainy cold
warm walk read cook play work study sleep friend family dog cat"""
WORDS = _TEXT.split()


def write_corpus(path: Path, turns: int, seed: int = 0) -> list[str]:
    """A JSONL corpus of about `turns` turns (2-6 per dialogue); returns every turn."""
    rng = random.Random(seed)
    all_turns: list[str] = []
    with open(path, "w", encoding="utf-8") as f:
        while len(all_turns) < turns:
            dialogue = [
                " ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 16))).capitalize() + "."
                for _ in range(rng.randint(2, 6))
            ]
            all_turns += dialogue
            f.write(json.dumps(dialogue) + "\n")
    return all_turns


def _peak_rss_mib() -> float:
    # ru_maxrss survives exec on Linux (it would report this benchmark's own peak, as the
    # parent of the child); the kernel's VmHWM is the child's own.
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(corpus: str, output: str, tokenizer: str) -> None:
    """Run prepare and print peak RSS (MiB) of this process and of its workers."""
    from convcli.data.prepare import PrepareSettings, prepare

    prepare(PrepareSettings(inputs=[corpus], output=Path(output), tokenizer=tokenizer))
    me = _peak_rss_mib()
    workers = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024
    print(json.dumps({"main_mib": me, "worker_mib": workers}))


def peak_memory(corpus: Path, output: Path, tokenizer: str) -> dict[str, float]:
    code = "import sys; sys.path.insert(0, sys.argv[1]); from benchmarks.prepare_throughput import child; child(*sys.argv[2:])"  # noqa: E501
    args = [sys.executable, "-c", code, str(REPO), str(corpus), str(output), tokenizer]
    out = subprocess.run(args, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--turns", type=int, default=200_000)
    parser.add_argument(
        "--scale", type=int, default=10, help="memory run at this many times (0: none)"
    )
    parser.add_argument("--tokenizer", default=str(GPT2) if GPT2.is_dir() else None)
    parser.add_argument("--repeats", type=int, default=3, help="best of this many timings")
    parser.add_argument(
        "--only", choices=("tokenize", "formats", "memory", "parquet-memory"), default=None
    )
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="convcli-bench-") as tmp:
        run(args, Path(tmp))


def run(args: argparse.Namespace, work: Path) -> None:
    corpus = work / "corpus.jsonl"
    turns = write_corpus(corpus, args.turns)
    if args.tokenizer is None:  # no GPT-2 vocabulary around: train one (not timed)
        from convcli.data.vocab import train_bpe_tokenizer

        args.tokenizer = str(work / "tokenizer")
        train_bpe_tokenizer(turns, vocab_size=8000).save_pretrained(args.tokenizer)
    if args.only in (None, "tokenize"):
        tokenize(args, work, corpus, turns)
    if args.only in (None, "memory"):
        memory(args, work, corpus)
    if args.only in (None, "formats"):
        formats(args, work, corpus)
    if args.only in (None, "parquet-memory"):
        parquet_memory(args, work, corpus)


def tokenize(args: argparse.Namespace, work: Path, corpus: Path, turns: list[str]) -> None:
    from convcli.data.prepare import PrepareSettings, prepare
    from convcli.tokenizer import ConversationTokenizer

    tokenizer = ConversationTokenizer.from_pretrained(args.tokenizer)
    backend = tokenizer.tokenizer.backend_tokenizer
    backend.encode_special_tokens = True  # as encode_turns does

    baselines = {"encode_batch": backend.encode_batch}
    if hasattr(backend, "encode_batch_fast"):
        baselines["encode_batch_fast"] = backend.encode_batch_fast
    base: dict[str, list[float]] = {name: [] for name in baselines}
    whole: list[float] = []
    for i in range(args.repeats):
        for name, encode in baselines.items():
            start = time.perf_counter()
            tokens = sum(len(e) for e in encode(turns, add_special_tokens=False))
            base[name].append(time.perf_counter() - start)
        settings = PrepareSettings(
            inputs=[str(corpus)], output=work / f"out{i}", tokenizer=args.tokenizer
        )
        start = time.perf_counter()
        result = prepare(settings)
        whole.append(time.perf_counter() - start)
    mib = corpus.stat().st_size / 2**20
    print(
        f"corpus: {len(turns)} turns, {result.dialogues_written} dialogues, {mib:.1f} MiB, "
        f"{tokens} text tokens ({result.tokens} with seps); tokenizer {args.tokenizer}"
    )

    def spread(times: list[float]) -> str:
        return f"best {min(times):.2f}s, worst {max(times):.2f}s of {len(times)}"

    for name, times in base.items():
        print(f"raw {name + ':':18} {tokens / min(times):10,.0f} tokens/s ({spread(times)})")
    print(f"whole prepare:         {tokens / min(whole):10,.0f} tokens/s ({spread(whole)})")
    for name, times in base.items():
        each = " ".join(f"{b / w:.2f}" for b, w in zip(times, whole, strict=True))
        print(
            f"ratio prepare/{name}: {min(times) / min(whole):.2f} (best times; per repeat "
            f"{each}) (target >= 0.8)"
        )


def memory(args: argparse.Namespace, work: Path, corpus: Path) -> None:
    if args.scale < 2:
        return
    big = work / "big.jsonl"
    with open(big, "w", encoding="utf-8") as f:
        text = corpus.read_text(encoding="utf-8")
        for _ in range(args.scale):
            f.write(text)
    small_mem = peak_memory(corpus, work / "mem1", args.tokenizer)
    big_mem = peak_memory(big, work / "mem10", args.tokenizer)
    for label, mem in ((" 1x", small_mem), (f"{args.scale}x", big_mem)):
        main_mib, worker_mib = mem["main_mib"], mem["worker_mib"]
        print(f"peak RSS {label}: main {main_mib:.0f} MiB, each worker {worker_mib:.0f} MiB")
    total = [m["main_mib"] + 2 * m["worker_mib"] for m in (small_mem, big_mem)]
    print(f"peak memory ratio {args.scale}x/1x: {total[1] / total[0]:.2f} (target <= 1.2)")


def as_messages(dialogue: list[str]) -> list[dict[str, str]]:
    roles = ("user", "assistant")
    return [{"role": roles[i % 2], "content": turn} for i, turn in enumerate(dialogue)]


def formats(args: argparse.Namespace, work: Path, corpus: Path) -> None:
    """Chat-messages JSONL against the JSONL of turns: the same dialogues, whole prepare."""
    from convcli.data.prepare import PrepareSettings, prepare

    messages = work / "messages.jsonl"
    with open(corpus, encoding="utf-8") as f, open(messages, "w", encoding="utf-8") as out:
        for line in f:
            out.write(json.dumps({"messages": as_messages(json.loads(line))}) + "\n")
    times: dict[str, list[float]] = {"jsonl": [], "messages": []}
    cpu: dict[str, list[float]] = {"jsonl": [], "messages": []}  # main + workers, user + sys
    tokens = {}
    for i in range(args.repeats):
        for name, path in (("jsonl", corpus), ("messages", messages)):
            settings = PrepareSettings(
                inputs=[str(path)], output=work / f"fmt-{name}{i}", tokenizer=args.tokenizer
            )
            start, cpu_start = time.perf_counter(), _cpu_seconds()
            result = prepare(settings)
            times[name].append(time.perf_counter() - start)
            cpu[name].append(_cpu_seconds() - cpu_start)
            tokens[name] = result.tokens
            assert result.formats == {str(path): name}, result.formats
    assert tokens["jsonl"] == tokens["messages"], tokens  # the same dialogues, the same tokens
    sizes = {n: p.stat().st_size / 2**20 for n, p in (("jsonl", corpus), ("messages", messages))}
    for name, spent in times.items():
        print(
            f"prepare {name:9} {sizes[name]:6.1f} MiB: {tokens[name] / min(spent):10,.0f} "
            f"tokens/s (best {min(spent):.2f}s, worst {max(spent):.2f}s of {len(spent)})"
        )
    pairs = sorted(j / m for j, m in zip(times["jsonl"], times["messages"], strict=True))
    each = " ".join(f"{r:.2f}" for r in pairs)
    ratio = min(times["jsonl"]) / min(times["messages"])
    print(f"ratio messages/jsonl throughput: {ratio:.2f} (best times); median of the back-to-back "
          f"pairs {pairs[len(pairs) // 2]:.2f} (sorted: {each}) (target >= 0.9)")  # fmt: skip
    # CPU time barely depends on what else the machine runs: the steadier comparison here.
    cpu_ratio = min(cpu["jsonl"]) / min(cpu["messages"])
    print(
        f"CPU seconds (main + workers): jsonl best {min(cpu['jsonl']):.2f}, messages best "
        f"{min(cpu['messages']):.2f}; ratio messages/jsonl throughput by CPU: {cpu_ratio:.2f} "
        "(target >= 0.9)"
    )


def _cpu_seconds() -> float:
    """User + system time of this process and of its finished children (prepare's workers)."""
    me, children = (resource.getrusage(w) for w in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))
    return me.ru_utime + me.ru_stime + children.ru_utime + children.ru_stime


def parquet_memory(args: argparse.Namespace, work: Path, corpus: Path) -> None:
    """Peak memory of prepare on a Parquet file and on one `scale` times larger."""
    if args.scale < 2:
        return
    import pyarrow as pa
    import pyarrow.parquet as pq

    with open(corpus, encoding="utf-8") as f:
        table = pa.table({"messages": [as_messages(json.loads(line)) for line in f]})
    small, big = work / "corpus.parquet", work / "big.parquet"
    pq.write_table(table, small)  # pyarrow's default row groups (up to 1M rows)
    with pq.ParquetWriter(big, table.schema) as writer:
        for _ in range(args.scale):
            writer.write_table(table)
    sizes = [p.stat().st_size / 2**20 for p in (small, big)]
    mems = [peak_memory(p, work / f"pq-mem{i}", args.tokenizer) for i, p in enumerate((small, big))]
    for label, size, mem in zip((" 1x", f"{args.scale}x"), sizes, mems, strict=True):
        print(
            f"parquet {label} ({size:.1f} MiB, {len(table) * int(label.strip()[:-1])} rows): "
            f"peak RSS main {mem['main_mib']:.0f} MiB, each worker {mem['worker_mib']:.0f} MiB"
        )
    total = [m["main_mib"] + 2 * m["worker_mib"] for m in mems]
    print(f"parquet peak memory ratio {args.scale}x/1x: {total[1] / total[0]:.2f} (target <= 1.2)")


if __name__ == "__main__":
    main()
