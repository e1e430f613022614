"""Reply latency on CPU: the rows of issue 13's table, as ratios measured in one run.

Two randomly initialised GPT-2 small-shaped models (forward and reverse: 12 layers,
768 wide, 50257 tokens) answer the same context. Every job generates exactly
`--new-tokens` tokens per sequence (random weights would otherwise stop at random
lengths). The jobs run interleaved, `--repeats` times; the figures are medians.

- MMI turn: `MMIReranker.respond` (one batched `generate` of 8 candidates with top-k 50,
  one reverse forward) against the seed 001 tutorial's `generate_message`, faithfully:
  one forward over the context, then each candidate in turn with the KV cache at batch
  size 1 (top-k by hand, a `.item()` per token), then one reverse forward per candidate.
  The tutorial and the bare `generate` below run on untouched copies of the models.
- ms/token at batch 1: `ConversationModel.generate` (greedy) against a bare Hugging
  Face `generate` on the same inputs.
- a batch-8 decode step against a batch-1 decode step: `generate` with 8 samples of
  one context and with 1, each timed at `--new-tokens` and at 1 new token; a step is
  the difference over the extra tokens (the prefill cancels out).
- start-up: a fresh process imports convcli, loads two model folders
  (`load_models`, as generate/chat do) and answers one MMI turn, then a second one.
- the profile's top five (torch.profiler, self CPU time) of one MMI turn.
- with ctranslate2 installed, the first three rows again with `backend="ctranslate2"`
  (int8; the models are saved to a temp folder and converted into a temp cache, once,
  before timing), against the same tutorial and bare `generate` runs, and its start-up.

`convert` (the table's last row) is `benchmarks/convert_memory.py`. Torch threads are
what the commands use (`default_threads()`, OMP_NUM_THREADS) unless `--threads`.
Usage: python benchmarks/mmi_turn.py [--layers 12] [--repeats 3] [--new-tokens 32]
[--backend torch|ctranslate2|both]
"""

from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

CONTEXT = [
    "Hello, how are you doing today?",
    "I'm fine, thanks. I just got back from a long walk in the park by the river.",
    "That sounds lovely. Was it busy, or did you have the place to yourself?",
]


def startup_child(forward_dir: str, reverse_dir: str, k: int, n: int, backend: str) -> None:
    """In a fresh process: imports, loading both folders, then two MMI turns (JSON out)."""
    t0 = time.perf_counter()
    from convcli.inference.loading import load_models
    from convcli.inference.settings import EngineSettings, MMISettings

    t1 = time.perf_counter()
    _, reranker, _ = load_models(
        forward_dir,
        MMISettings(reverse_model=Path(reverse_dir), num_candidates=k),
        EngineSettings(backend=backend),  # type: ignore[arg-type]
    )
    t2 = time.perf_counter()
    sampling = {"do_sample": True, "top_k": 50, "max_new_tokens": n, "min_new_tokens": n}
    reranker.respond(CONTEXT, seed=0, **sampling)
    t3 = time.perf_counter()
    reranker.respond(CONTEXT, seed=1, **sampling)
    t4 = time.perf_counter()
    print(json.dumps({"imports": t1 - t0, "load": t2 - t1, "first": t3 - t2, "next": t4 - t3,
                      "torch imported": "torch" in sys.modules}))  # fmt: skip


if __name__ == "__main__" and sys.argv[1:2] == ["--startup-child"]:
    # A fresh process that imports only what `generate` does (no torch at this point).
    fwd_dir, rev_dir, k, n, backend = sys.argv[2:7]
    startup_child(fwd_dir, rev_dir, int(k), int(n), backend)
    sys.exit(0)

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from convcli.inference.mmi import MMIReranker  # noqa: E402
from convcli.inference.model import ConversationModel  # noqa: E402
from convcli.modelfolder import ModelMeta  # noqa: E402
from convcli.tokenizer import ConversationTokenizer  # noqa: E402


def tokenizer() -> ConversationTokenizer:
    shared = REPO.parent / "shared" / "gpt2-tokenizer"
    if (shared / "vocab.json").is_file():
        return ConversationTokenizer.from_pretrained(shared)
    from convcli.data.vocab import train_bpe_tokenizer  # no GPT-2 files: a small BPE

    texts = CONTEXT * 50
    return ConversationTokenizer(train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1))


def random_gpt2(tok: ConversationTokenizer, layers: int, seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=max(50257, len(tok)))
    return GPT2LMHeadModel(config).eval()


def conversation_model(model, tok: ConversationTokenizer, reverse: bool) -> ConversationModel:
    # No token types: as converted DialoGPT models (and what CTranslate2 can run).
    meta = ModelMeta(token_types=False, sep_token_id=tok.sep_token_id, reverse=reverse)
    return ConversationModel(model, tok, meta, path=f"random-{'reverse' if reverse else 'forward'}")


def random_model(tok: ConversationTokenizer, layers: int, seed: int, reverse: bool):
    return conversation_model(random_gpt2(tok, layers, seed), tok, reverse)


# -- the tutorial's loop (seed 001), with a fixed length --------------------------------------


def seed_get_response(model, output_token, past, new_tokens: int, top_k: int = 50):
    out = torch.tensor([[]], dtype=torch.long)
    for _ in range(new_tokens):  # the tutorial loops until the end token
        util = model.forward(output_token, cache=past)  # transformers 5's name
        output_token, past = util["logits"], util["cache"]
        output_token = output_token[:, -1, :].float()
        indices_to_remove = output_token < torch.topk(output_token, top_k)[0][..., -1, None]
        output_token[indices_to_remove] = -float("Inf")
        output_token = torch.multinomial(F.softmax(output_token, dim=-1), num_samples=1)
        out = torch.cat((out, output_token), dim=1)
        if output_token.item() == -1:  # the tutorial's per-token end check (never true here)
            break
    return out, past


def seed_score_response(reverse_model, output_token, correct_token):
    inputs = torch.cat((output_token, correct_token), dim=1)
    mask = torch.full_like(output_token, -100, dtype=torch.long)
    labels = torch.cat((mask, correct_token), dim=1)
    return -reverse_model(inputs, labels=labels)["loss"].float()


@torch.inference_mode()
def seed_generate_message(model, reverse_model, message_list, num_samples, new_tokens, temp, end):
    total_input = torch.cat(message_list, dim=1)
    total_input_reversed = message_list[-1]
    prefix = total_input.shape[1] - 1
    past = model(total_input[:, :-1])["cache"]
    results = []
    for _ in range(num_samples):
        # transformers 5 caches grow in place; the tutorial's tuple caches did not.
        if past.get_seq_length() > prefix:
            past.crop(prefix - past.get_seq_length())
        result = seed_get_response(model, total_input[:, -1:], past, new_tokens)
        # The tutorial's candidates end with the end token (its loop stops after it).
        candidate = torch.cat((result[0], end), dim=1)
        score = seed_score_response(reverse_model, candidate, total_input_reversed)
        results.append((*result, score))
    scores = torch.stack([x[2] for x in results], dim=0)
    winner = torch.multinomial(F.softmax(scores / temp, dim=0), num_samples=1).item()
    return results[winner][0]


def timed(fn) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def save_pair(forward, reverse, root: Path) -> list[str]:
    """The two models as model folders under `root` (forward, reverse)."""
    from convcli.modelfolder import save_model_folder

    folders = []
    for model in (forward, reverse):
        folder = root / ("reverse" if model.meta.reverse else "forward")
        if not folder.exists():
            save_model_folder(model.model, model.tokenizer, model.meta, folder)
        folders.append(str(folder))
    return folders


def startup_split(folders: list[str], k: int, n: int, threads: int, backend: str) -> dict:
    started = time.perf_counter()
    cmd = [sys.executable, __file__, "--startup-child", *folders, str(k), str(n), backend]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    result = subprocess.run(cmd, capture_output=True, text=True, check=False, env=env)
    wall = time.perf_counter() - started
    if result.returncode:
        sys.exit(f"start-up child failed:\n{result.stderr[-2000:]}")
    split = json.loads(result.stdout.strip().splitlines()[-1])
    # The interpreter and what `import convcli.inference.loading` left for later.
    split["process"] = wall - sum(v for v in split.values() if not isinstance(v, bool))
    return split


# Where an op's time goes, by its name (and, for products, by their output width).
SAMPLING_OPS = ("topk", "sort", "softmax", "multinomial", "exponential", "argmax", "isin",
                "masked_fill", "where", "cumsum", "lt", "ge", "any", "all", "max")  # fmt: skip
CACHE_OPS = ("cat", "index_copy", "copy", "slice_scatter", "repeat_interleave", "index_select")
PRODUCTS = ("linear", "addmm", "mm", "matmul")


def category(key: str, shapes: str, vocab: int) -> str:
    name = key.split("::")[-1].strip("_")  # aten::_softmax, aten::exponential_
    if any(p in name for p in PRODUCTS) and str(vocab) in shapes:
        return "output layer"
    if name in CACHE_OPS:
        return "cache handling"
    if name in SAMPLING_OPS:
        return "sampling and logits processors"
    return "forward body"


def profile_split(fn, vocab: int, rows: int = 5) -> tuple[list, dict[str, float], float]:
    """One call under torch.profiler: its `rows` costliest ops (op, self ms, share), the
    self CPU time by category (ms), and the wall time (ms); wall minus ops is Python."""
    from torch.profiler import ProfilerActivity, profile

    started = time.perf_counter()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        fn()
    wall = 1000 * (time.perf_counter() - started)
    split: dict[str, float] = {}
    for e in prof.key_averages(group_by_input_shape=True):
        kind = category(e.key, str(e.input_shapes), vocab)
        split[kind] = split.get(kind, 0.0) + e.self_cpu_time_total / 1000
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    total = sum(e.self_cpu_time_total for e in events) or 1.0
    top = [(e.key, e.self_cpu_time_total / 1000, e.self_cpu_time_total / total) for e in events]
    return top[:rows], split, wall


def print_profile(title: str, fn, vocab: int) -> None:
    top, split, wall = profile_split(fn, vocab)
    ops = sum(split.values())
    split["Python and framework overhead (wall - ops)"] = max(0.0, wall - ops)
    print(f"profile of {title}: {wall:.0f} ms wall under the profiler")
    for kind, ms in sorted(split.items(), key=lambda kv: -kv[1]):
        print(f"  {kind:<48}{ms:>10.0f} ms{100 * ms / wall:>7.1f}%")
    print("  top five ops by self CPU time:")
    for op, ms, share in top:
        print(f"    {op:<46}{ms:>10.0f} ms{100 * share:>7.1f}%")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="layers of both models")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per candidate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as the CLI)")
    parser.add_argument("--skip-startup", action="store_true", help="no start-up split")
    parser.add_argument(
        "--backend", choices=("torch", "ctranslate2", "both"), default="both",
        help="which backend's rows (both: ctranslate2's too when it is installed)",
    )  # fmt: skip
    args = parser.parse_args()
    from transformers.utils import logging as hf_logging

    from convcli.inference.loading import set_threads

    threads = set_threads(args.threads or None)
    hf_logging.set_verbosity_error()

    tok = tokenizer()
    plain_forward, plain_reverse = (random_gpt2(tok, args.layers, seed) for seed in (0, 1))
    # convcli's side wraps copies: the tutorial and bare generate run on untouched models.
    forward = conversation_model(copy.deepcopy(plain_forward), tok, reverse=False)
    reverse = conversation_model(copy.deepcopy(plain_reverse), tok, reverse=True)
    n, k = args.new_tokens, args.candidates
    sep = torch.tensor([[tok.sep_token_id]])
    # The tutorial's message list: each turn's ids followed by the end token.
    messages = [torch.cat((torch.tensor([ids]), sep), dim=1) for ids in tok.encode_turns(CONTEXT)]
    _, tensors, _ = forward.prepare([CONTEXT], max_new_tokens=n)
    fixed = {"max_new_tokens": n, "min_new_tokens": n}

    backends = ["torch", "ctranslate2"] if args.backend == "both" else [args.backend]
    if "ctranslate2" in backends and importlib.util.find_spec("ctranslate2") is None:
        if args.backend == "ctranslate2":
            sys.exit("the ctranslate2 rows need: pip install 'convcli[ctranslate2]'")
        backends.remove("ctranslate2")
    tmp = Path(tempfile.mkdtemp(prefix="mmi-turn-"))
    os.environ["CONVCLI_CACHE"] = str(tmp / "cache")  # conversions stay in the temp folder
    folders = save_pair(forward, reverse, tmp)
    pairs = {}
    for backend in backends:
        if backend == "torch":
            pairs[backend] = (forward, reverse)
        else:  # loaded (and converted, once) from the saved folders, as the CLI does
            from convcli.inference.model import ConversationModel

            pairs[backend] = tuple(
                ConversationModel.from_pretrained(f, device="cpu", backend=backend) for f in folders
            )

    def tutorial() -> None:
        out = seed_generate_message(plain_forward, plain_reverse, messages, k, n, 0.5, sep)
        assert out.shape[1] == n

    def bare_b1() -> None:
        with torch.inference_mode():
            plain_forward.generate(
                **tensors, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, **fixed
            )

    def backend_jobs(fwd: ConversationModel, rev: ConversationModel) -> dict:
        reranker = MMIReranker(fwd, rev, num_candidates=k, temperature=0.5)
        sampling = {"do_sample": True, "top_k": 50, **fixed}

        def mmi() -> None:
            result = reranker.respond(CONTEXT, **sampling)
            assert sum(c.count for c in result.candidates) == k
            assert all(len(c.token_ids) == n for c in result.candidates)

        def steps(rows: int, tokens: int):
            def job() -> None:
                fwd.generate(
                    CONTEXT, do_sample=True, top_k=50, num_return_sequences=rows,
                    max_new_tokens=tokens, min_new_tokens=tokens,
                )  # fmt: skip

            return job

        return {
            "mmi": mmi,
            "b1": lambda: fwd.generate(CONTEXT, **fixed),
            "b8_n": steps(k, n),
            "b8_1": steps(k, 1),
            "b1_n": steps(1, n),
            "b1_1": steps(1, 1),
        }

    jobs = {"tutorial": tutorial, "bare_b1": bare_b1}
    for backend, (fwd, rev) in pairs.items():
        jobs |= {f"{backend}:{name}": fn for name, fn in backend_jobs(fwd, rev).items()}
    print(
        f"models: 2 x GPT-2 ({args.layers} layers, 768 wide, "
        f"vocab {forward.model.config.vocab_size}), "
        f"context {tensors['input_ids'].shape[1]} tokens, {k} candidates x {n} new tokens, "
        f"{threads} torch threads, {args.repeats} interleaved repeats (medians)",
        file=sys.stderr,
    )
    for fn in jobs.values():  # warm-up (and the packed weights are made here)
        fn()
    times: dict[str, list[float]] = {name: [] for name in jobs}
    for r in range(args.repeats):
        for name, fn in jobs.items():
            times[name].append(timed(fn))
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {name: statistics.median(values) for name, values in times.items()}
    print(f"{'row':<62}{'measured':>24}{'ratio':>8}  target")
    for backend in pairs:
        m = {name.partition(":")[2]: v for name, v in med.items() if name.startswith(backend)}
        step8 = (m["b8_n"] - m["b8_1"]) / (n - 1)
        step1 = (m["b1_n"] - m["b1_1"]) / (n - 1)
        rows = [
            (
                f"MMI turn, {k} candidates x {n} tokens, vs the tutorial's loop",
                f"{m['mmi']:.2f} s vs {med['tutorial']:.2f} s",
                m["mmi"] / med["tutorial"],
                "<= 0.25 (stretch 0.2)",
            ),
            (
                "ms/token at batch 1 vs bare transformers generate",
                f"{1000 * m['b1'] / n:.0f} vs {1000 * med['bare_b1'] / n:.0f} ms",
                m["b1"] / med["bare_b1"],
                "<= 0.7",
            ),
            (
                f"a batch-{k} decode step vs a batch-1 decode step",
                f"{1000 * step8:.0f} vs {1000 * step1:.0f} ms",
                step8 / step1,
                "<= 1.6",
            ),
        ]
        print(f"backend {backend}{' (int8)' if backend == 'ctranslate2' else ' (float32)'}:")
        for name, measured, ratio, target in rows:
            print(f"  {name:<60}{measured:>24}{ratio:>8.3f}  {target}")
    print("convert vs torch.load + safetensors save: see benchmarks/convert_memory.py")
    spread = {name: f"{min(v):.2f}-{max(v):.2f}" for name, v in times.items()}
    print(f"spread (s, min-max of the repeats): {spread}", file=sys.stderr)

    if not args.skip_startup:
        for backend in pairs:
            split = startup_split(folders, k, n, threads, backend)
            # What answering once costs beyond a warm turn: start-up and the first turn's
            # extra (weights paged in, packed weights made, first-call work in transformers).
            extra = (
                split["process"] + split["imports"] + split["load"] + split["first"]
                - split["next"]
            )  # fmt: skip
            print(
                f"start-up of an MMI generate ({backend}): interpreter and imports "
                f"{split['process'] + split['imports']:.2f} s, "
                f"loading two folders {split['load']:.2f} s, "
                f"first turn {split['first']:.2f} s, next turn {split['next']:.2f} s "
                f"(torch imported: {'yes' if split['torch imported'] else 'no'}); "
                f"(start-up + first turn - next turn) / next turn = {extra / split['next']:.2f} "
                "(target <= 1)"
            )

    if "torch" in pairs:  # (torch.profiler does not see inside CTranslate2)
        from convcli.inference.mmi import score_candidates

        fwd, rev = pairs["torch"]
        vocab = fwd.config.vocab_size
        print(f"profiles (torch, {threads} threads):")
        print_profile("one MMI turn", jobs["torch:mmi"], vocab)
        print_profile(f"one batch-1 reply of {n} tokens", jobs["torch:b1"], vocab)
        result = MMIReranker(fwd, rev, num_candidates=k).respond(CONTEXT, do_sample=True, **fixed)
        rows = [c.token_ids for c in result.candidates]
        sources = [[fwd.tokenizer.encode_turns(CONTEXT[-1:])[0]]] * len(rows)
        print_profile(
            "the MMI turn's reverse scoring", lambda: score_candidates(rev, rows, sources), vocab
        )
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
