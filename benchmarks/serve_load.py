"""`convcli serve` under load: 8 concurrent clients against the same 8 requests in turn.

One server (`python -m convcli serve`, a subprocess) holds two randomly initialised
GPT-2 small-shaped models (forward and reverse: 12 layers, 768 wide, 50257 tokens, 1024
positions). Every request asks for 32 new tokens (random weights almost never end a
reply early; the completion tokens are printed to show it). In one run:

- load: the same 8 requests (distinct contexts and seeds, no MMI) sent one after
  another, then all at once from 8 threads; total wall time ratio (target <= 0.5x),
  p50/p95 latency of each, failed requests (target 0);
- MMI: one request with 8 candidates through the server against the same turn through
  `convcli generate`'s path in this process (`load_models` + `MMIReranker.respond`, same
  sampling: top-k 50, 32 tokens); ratio (target <= 1.1x).

Prints medians of `--repeats` interleaved rounds. `--backend ctranslate2` serves (and runs
the generate path) through CTranslate2 in int8: there, requests without a seed that share
their options are decoded in one engine call, and a seeded one gets a call of its own
(`--no-seed` sends the 8 requests without seeds).
Usage: python benchmarks/serve_load.py [--threads N] [--repeats 3] [--layers 12]
[--backend torch|ctranslate2] [--no-seed]
(on a busy machine keep threads at or below the free cores: oversubscribed OpenMP
threads spin and slow both sides unevenly)
"""

from __future__ import annotations

import argparse
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

NEW_TOKENS = 32
CONTEXTS = [
    ["Hello, how are you doing today?"],
    ["I just got back from a long walk in the park by the river."],
    ["Do you like tea?", "Yes, green tea mostly.", "Where do you buy it?"],
    ["What did you think of the film last night?"],
    ["My cat knocked a glass off the table again."],
    ["Is it going to rain tomorrow?", "The forecast says it might.", "Then I'll stay in."],
    ["Can you recommend a good book?"],
    ["We are moving to a new town next month."],
]


def write_models(root: Path, layers: int) -> tuple[Path, Path]:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer

    tok = ConversationTokenizer.from_pretrained(REPO.parent / "shared" / "gpt2-tokenizer")
    paths = []
    for seed, reverse in ((0, False), (1, True)):
        torch.manual_seed(seed)
        config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=len(tok))
        meta = ModelMeta(token_types=not reverse, sep_token_id=tok.sep_token_id, reverse=reverse)
        name = "reverse" if reverse else "forward"
        paths.append(save_model_folder(GPT2LMHeadModel(config).eval(), tok, meta, root / name))
    return paths[0], paths[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


SEEDED = True


def body(i: int, **extra: object) -> dict[str, object]:
    roles = ("user", "assistant")
    turns = CONTEXTS[i % len(CONTEXTS)]
    messages = [{"role": roles[j % 2], "content": t} for j, t in enumerate(turns[::-1])][::-1]
    return {"model": "bench", "messages": messages, "max_tokens": NEW_TOKENS,
            "temperature": 1.0, "top_k": 50, "top_p": 1.0, "mmi": False,
            **({"seed": i} if SEEDED else {}), **extra}  # fmt: skip


def post(url: str, payload: dict[str, object]) -> tuple[float, int | None]:
    """(seconds, completion tokens or None on failure)."""
    import httpx

    started = time.perf_counter()
    try:
        reply = httpx.post(f"{url}/v1/chat/completions", json=payload, timeout=600)
        tokens = reply.json()["usage"]["completion_tokens"] if reply.status_code == 200 else None
    except Exception:
        tokens = None
    return time.perf_counter() - started, tokens


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None, help="default: convcli's")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=12)
    parser.add_argument("--backend", choices=("torch", "ctranslate2"), default="torch")
    parser.add_argument("--no-seed", action="store_true", help="requests without seeds")
    args = parser.parse_args()
    global SEEDED
    SEEDED = not args.no_seed

    import httpx

    from convcli.inference.loading import load_models
    from convcli.inference.settings import EngineSettings, MMISettings, default_threads

    threads = args.threads or default_threads()  # both sides get the same
    tmp = Path(tempfile.mkdtemp(prefix="serve-load-"))
    forward, reverse = write_models(tmp, args.layers)
    log(f"models written to {tmp}; starting the server")
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    os.environ["CONVCLI_CACHE"] = str(tmp / "cache")  # conversions stay in the temp folder
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    server = subprocess.Popen(
        [sys.executable, "-m", "convcli", "serve", str(forward), "--reverse-model", str(reverse),
         "--model-name", "bench", "--port", str(port), "--threads", str(threads),
         "--backend", args.backend],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        while True:
            try:
                if httpx.get(f"{url}/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if server.poll() is not None:
                raise SystemExit("the server did not start")
            time.sleep(0.2)
        log("server up; loading the generate path's models here")
        mmi = MMISettings(reverse_model=reverse, num_candidates=8)
        runtime = EngineSettings("cpu", threads, backend=args.backend)
        _, reranker, _ = load_models(forward, mmi, runtime)
        assert reranker is not None
        post(url, body(0))  # warm up both sides
        reranker.respond(CONTEXTS[0], max_new_tokens=NEW_TOKENS, seed=0)

        totals: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        latencies: dict[str, list[float]] = {"sequential": [], "concurrent": []}
        mmi_times: dict[str, list[float]] = {"server": [], "generate path": []}
        failures, tokens = 0, []
        for round in range(args.repeats):
            log(f"round {round + 1}/{args.repeats}")
            started = time.perf_counter()
            seq = [post(url, body(i)) for i in range(8)]
            totals["sequential"].append(time.perf_counter() - started)
            started = time.perf_counter()
            with ThreadPoolExecutor(8) as pool:
                con = list(pool.map(lambda i: post(url, body(i)), range(8)))
            totals["concurrent"].append(time.perf_counter() - started)
            for name, runs in (("sequential", seq), ("concurrent", con)):
                latencies[name] += [s for s, _ in runs]
                failures += sum(t is None for _, t in runs)
                tokens += [t for _, t in runs if t is not None]

            seconds, got = post(url, body(1, mmi={"num_candidates": 8}))
            failures += got is None
            mmi_times["server"].append(seconds)
            started = time.perf_counter()
            reranker.respond(CONTEXTS[1], max_new_tokens=NEW_TOKENS, seed=1)
            mmi_times["generate path"].append(time.perf_counter() - started)
    finally:
        server.terminate()
        server.wait(timeout=60)
        shutil.rmtree(tmp, ignore_errors=True)  # two models: about 1 GB

    med = {k: statistics.median(v) for k, v in totals.items()}
    load = os.getloadavg()[0]
    print(f"serve_load: GPT-2 small shape ({args.layers} layers), {NEW_TOKENS} new tokens, "
          f"--backend {args.backend}, requests {'seeded' if SEEDED else 'without seeds'}, "
          f"--threads {threads}, {args.repeats} rounds, load avg {load:.1f}")  # fmt: skip
    print(f"completion tokens per request: min {min(tokens)}, max {max(tokens)}")
    for name in ("sequential", "concurrent"):
        lat = latencies[name]
        print(f"  8 requests {name:<10}  total {med[name]:6.2f} s   "
              f"p50 {pct(lat, 0.5):5.2f} s  p95 {pct(lat, 0.95):5.2f} s")  # fmt: skip
    print(f"  concurrent / sequential: {med['concurrent'] / med['sequential']:.2f}x "
          f"(target <= 0.5x); failed requests: {failures}")  # fmt: skip
    m = {k: statistics.median(v) for k, v in mmi_times.items()}
    print(f"  MMI, 8 candidates: server {m['server']:.2f} s, generate path "
          f"{m['generate path']:.2f} s: {m['server'] / m['generate path']:.2f}x "
          f"(target <= 1.1x)")  # fmt: skip


if __name__ == "__main__":
    main()
