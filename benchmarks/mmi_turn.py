"""One MMI turn: convcli's batched reranker against the seed 001 tutorial's loop.

Two randomly initialised GPT-2 small-shaped models (forward and reverse: 12 layers,
768 wide, 50257 tokens) answer the same context. Both sides generate exactly
`--new-tokens` tokens per candidate (random weights would otherwise stop at random
lengths), sample with top-k 50, and score with the reverse model:

- baseline: the tutorial's `generate_message`, faithfully: one forward over the
  context, then each candidate in turn with the KV cache at batch size 1 (top-k by
  hand, a `.item()` per token), then one reverse forward per candidate with labels;
- convcli: `MMIReranker.respond`: one batched `generate`, one reverse forward.

Also: `ConversationModel.generate`'s ms/token against a bare Hugging Face `generate`
on the same model and inputs (the wrapper's overhead).

Prints medians of `--repeats` interleaved runs and the ratios (targets: MMI <= 0.35,
generate <= 1.05). Usage: python benchmarks/mmi_turn.py [--layers 12] [--repeats 3]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from convcli.inference.mmi import MMIReranker  # noqa: E402
from convcli.inference.model import ConversationModel  # noqa: E402
from convcli.modelfolder import ModelMeta  # noqa: E402
from convcli.tokenizer import ConversationTokenizer  # noqa: E402

CONTEXT = [
    "Hello, how are you doing today?",
    "I'm fine, thanks. I just got back from a long walk in the park by the river.",
    "That sounds lovely. Was it busy, or did you have the place to yourself?",
]


def tokenizer() -> ConversationTokenizer:
    shared = REPO.parent / "shared" / "gpt2-tokenizer"
    if (shared / "vocab.json").is_file():
        return ConversationTokenizer.from_pretrained(shared)
    from convcli.data.vocab import train_bpe_tokenizer  # no GPT-2 files: a small BPE

    texts = CONTEXT * 50
    return ConversationTokenizer(train_bpe_tokenizer(texts, vocab_size=300, min_frequency=1))


def random_model(tok: ConversationTokenizer, layers: int, seed: int, reverse: bool):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(n_layer=layers, n_embd=768, n_head=12, vocab_size=max(50257, len(tok)))
    model = GPT2LMHeadModel(config).eval()
    meta = ModelMeta(token_types=not reverse, sep_token_id=tok.sep_token_id, reverse=reverse)
    return ConversationModel(model, tok, meta, path=f"random-{'reverse' if reverse else 'forward'}")


# -- the tutorial's loop (seed 001), with a fixed length --------------------------------------


def seed_get_response(model, output_token, past, new_tokens: int, top_k: int = 50):
    out = torch.tensor([[]], dtype=torch.long)
    for _ in range(new_tokens):  # the tutorial loops until the end token
        util = model.forward(output_token, past_key_values=past)
        output_token, past = util["logits"], util["past_key_values"]
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
    past = model(total_input[:, :-1])["past_key_values"]
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=12, help="layers of both models")
    parser.add_argument("--candidates", type=int, default=8)
    parser.add_argument("--new-tokens", type=int, default=32, help="tokens per candidate")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()

    tok = tokenizer()
    forward = random_model(tok, args.layers, seed=0, reverse=False)
    reverse = random_model(tok, args.layers, seed=1, reverse=True)
    n, k = args.new_tokens, args.candidates
    sep = torch.tensor([[tok.sep_token_id]])
    # The tutorial's message list: each turn's ids followed by the end token.
    messages = [torch.cat((torch.tensor([ids]), sep), dim=1) for ids in tok.encode_turns(CONTEXT)]
    reranker = MMIReranker(forward, reverse, num_candidates=k, temperature=0.5)
    sampling = {"do_sample": True, "top_k": 50, "max_new_tokens": n, "min_new_tokens": n}

    def ours() -> None:
        result = reranker.respond(CONTEXT, **sampling)
        assert all(len(c.token_ids) == n for c in result.candidates)

    def baseline() -> None:
        out = seed_generate_message(forward.model, reverse.model, messages, k, n, 0.5, sep)
        assert out.shape[1] == n

    # generate vs bare transformers generate, greedy, same prepared inputs.
    _, tensors, _ = forward.prepare([CONTEXT], max_new_tokens=n)
    fixed = {"max_new_tokens": n, "min_new_tokens": n}

    def wrapped() -> None:
        forward.generate(CONTEXT, **fixed)

    def bare() -> None:
        with torch.inference_mode():
            forward.model.generate(
                **tensors, pad_token_id=tok.pad_token_id, eos_token_id=tok.sep_token_id, **fixed
            )

    print(
        f"models: 2 x GPT-2 ({args.layers} layers, 768 wide, "
        f"vocab {forward.model.config.vocab_size}), "
        f"context {tensors['input_ids'].shape[1]} tokens, {k} candidates x {n} new tokens, "
        f"{torch.get_num_threads()} threads",
        file=sys.stderr,
    )
    for fn in (ours, baseline, wrapped, bare):  # warm-up
        fn()
    times: dict[str, list[float]] = {"ours": [], "baseline": [], "wrapped": [], "bare": []}
    for r in range(args.repeats):
        for name, fn in (
            ("ours", ours),
            ("baseline", baseline),
            ("wrapped", wrapped),
            ("bare", bare),
        ):
            times[name].append(timed(fn))
        print(f"  repeat {r + 1}/{args.repeats} done", file=sys.stderr)
    med = {name: statistics.median(values) for name, values in times.items()}
    mmi_ratio = med["ours"] / med["baseline"]
    gen_ratio = med["wrapped"] / med["bare"]
    print(
        f"MMI turn ({k} candidates x {n} tokens): convcli {med['ours']:.2f} s, "
        f"tutorial loop {med['baseline']:.2f} s, ratio {mmi_ratio:.3f} (target <= 0.35)"
    )
    print(
        f"generate: convcli {1000 * med['wrapped'] / n:.1f} ms/token, bare transformers "
        f"{1000 * med['bare'] / n:.1f} ms/token, ratio {gen_ratio:.3f} (target <= 1.05)"
    )


if __name__ == "__main__":
    main()
