"""Training throughput of `convcli train` (Lightning) against a plain PyTorch loop.

Both train the same tiny preset model on the same bucketed batches of a synthetic
corpus, in this process, with the same optimizer, schedule and clipping. Only steady
state is timed (after `--warmup` steps). Prints the time-per-token ratio (target <= 1.05)
and the padding fraction of length bucketing against random batching.

    python benchmarks/train_throughput.py [--steps 40] [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pytorch_lightning as pl
import torch

from convcli.data.shards import ShardWriter, ids_dtype, write_manifest
from convcli.data.vocab import train_bpe_tokenizer
from convcli.tokenizer import ConversationTokenizer, layout
from convcli.training.batching import BatchPlan, BucketBatchSampler, epoch_batches, padding_fraction
from convcli.training.datamodule import Collate, TrainingExamples
from convcli.training.fit import PRESETS, train
from convcli.training.module import token_loss
from convcli.training.schedule import choose_schedule, lr_factor
from convcli.training.settings import TrainSettings

BATCH_TOKENS = 2048
SEED = 0


def make_corpus(root: Path, dialogues: int = 2000) -> Path:
    """Synthetic dialogues with a long-tailed turn length, written as shards."""
    rng = np.random.default_rng(SEED)
    words = [
        "".join(rng.choice(list("abcdefghijklmnop"), size=rng.integers(2, 8))) for _ in range(600)
    ]
    convs = [
        [" ".join(rng.choice(words, size=min(80, int(rng.lognormal(2.0, 0.8)) + 1)))
         for _ in range(rng.integers(2, 6))]
        for _ in range(dialogues)
    ]  # fmt: skip
    hf = train_bpe_tokenizer([t for c in convs[:500] for t in c], vocab_size=1000)
    tokenizer = ConversationTokenizer(hf)
    out = root / "shards"
    out.mkdir()
    tokenizer.save_pretrained(out / "tokenizer")
    dtype = ids_dtype(len(tokenizer))
    writer = ShardWriter(out, "train", dtype)
    for conv in convs:
        writer.add(*layout(tokenizer.encode_turns(conv), tokenizer.sep_token_id))
    manifest = {"dtype": dtype.name, "splits": {"train": {"shards": writer.close()}}}
    write_manifest(out, {**manifest, "tokenizer": {"fingerprint": tokenizer.fingerprint()}})
    return out


class Timer(pl.Callback):
    """Times the steady state: from batch `warm` to the end of training."""

    def __init__(self, warm: int) -> None:
        self.warm, self.tokens, self.start, self.seconds = warm, 0, 0.0, 0.0

    def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
        if trainer.fit_loop.epoch_loop.total_batch_idx == self.warm:
            self.start = time.perf_counter()
        if trainer.fit_loop.epoch_loop.total_batch_idx >= self.warm:
            self.tokens += int(batch["attention_mask"].sum())

    def on_train_end(self, trainer, module) -> None:
        self.seconds = time.perf_counter() - self.start


def settings(shards: Path, output: Path, steps: int) -> TrainSettings:
    return TrainSettings(
        data=shards, output=output, preset="tiny", max_steps=steps, batch_tokens=BATCH_TOKENS,
        warmup_steps=10, val_every=10**9, save_every=10**9, accelerator="cpu", devices="1",
        seed=SEED, overwrite=True,
    )  # fmt: skip


def lightning_run(shards: Path, output: Path, steps: int, warm: int) -> tuple[int, float]:
    timer = Timer(warm)
    train(settings(shards, output, steps), callbacks=[timer], progress=False)
    return timer.tokens, timer.seconds


def plain_run(shards: Path, steps: int, warm: int) -> tuple[int, float]:
    """The same model, batches, optimizer and schedule in a hand-written loop."""
    from transformers import GPT2Config, GPT2LMHeadModel

    s = settings(shards, Path("unused"), steps)
    tokenizer = ConversationTokenizer.from_pretrained(shards / "tokenizer")
    pl.seed_everything(SEED, verbose=False)
    sep = tokenizer.sep_token_id
    config = GPT2Config(
        vocab_size=len(tokenizer), bos_token_id=sep, eos_token_id=sep, **PRESETS["tiny"]
    )
    model = GPT2LMHeadModel(config).train()
    params = list(model.parameters())
    groups = [
        {"params": [p for p in params if p.ndim >= 2], "weight_decay": s.weight_decay},
        {"params": [p for p in params if p.ndim < 2], "weight_decay": 0.0},
    ]
    chosen = choose_schedule(s.learning_rate, s.warmup_steps, s.preset, steps)
    optimizer = torch.optim.AdamW(groups, lr=chosen.learning_rate)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda i: lr_factor(i, chosen.warmup_steps, steps, s.schedule)
    )
    dataset = TrainingExamples(shards, "train", tokenizer.sep_token_id, max_length=512)
    sampler = BucketBatchSampler(dataset.lengths(), BatchPlan(batch_tokens=BATCH_TOKENS), seed=SEED)
    loader = torch.utils.data.DataLoader(
        dataset, batch_sampler=sampler, collate_fn=Collate(tokenizer.pad_token_id, True)
    )
    step, tokens, start, epoch = 0, 0, 0.0, 0
    while step < steps:
        sampler.set_epoch(epoch)
        for batch in loader:
            if step == warm:
                start = time.perf_counter()
            if step >= warm:
                tokens += int(batch["attention_mask"].sum())
            logits = model(
                input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                token_type_ids=batch["token_type_ids"],
            ).logits  # fmt: skip
            total, count = token_loss(logits, batch["labels"])
            (total / count.clamp(min=1)).backward()
            torch.nn.utils.clip_grad_norm_(params, s.grad_clip)
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            if step == steps:
                break
        epoch += 1
    return tokens, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="convcli-bench-"))
    try:
        shards = make_corpus(root)
        lengths = TrainingExamples(shards, "train", 0, max_length=512).lengths()
        plan = BatchPlan(batch_tokens=BATCH_TOKENS)
        bucketed = padding_fraction(epoch_batches(lengths, plan, SEED, 0), lengths)
        random = BatchPlan(batch_tokens=BATCH_TOKENS, bucket=False)
        unsorted = padding_fraction(epoch_batches(lengths, random, SEED, 0), lengths)
        print(f"corpus: {len(lengths)} examples, {int(lengths.sum())} tokens, "
              f"length {int(lengths.min())}-{int(lengths.max())}")  # fmt: skip
        print(f"padding: bucketed {bucketed:.1%} vs random batches {unsorted:.1%}")

        best_plain = best_lightning = float("inf")
        for r in range(args.repeats):  # interleaved, best of each: the machine is shared
            tokens, seconds = plain_run(shards, args.steps, args.warmup)
            best_plain = min(best_plain, seconds / tokens)
            tokens, seconds = lightning_run(shards, root / f"run{r}", args.steps, args.warmup)
            best_lightning = min(best_lightning, seconds / tokens)
        print(f"plain loop: {1 / best_plain:,.0f} tokens/s")
        print(f"convcli (Lightning): {1 / best_lightning:,.0f} tokens/s")
        print(
            f"time per token, convcli / plain: {best_lightning / best_plain:.3f}x (target <= 1.05)"
        )
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
