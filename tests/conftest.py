"""Shared fixtures: tiny tokenizers and models built on the fly; nothing is downloaded.

Every fixture that builds a model lives here, once, with session scope: the trained pair
(`trained`) costs a few seconds and every test module that needs it shares the same one.
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GPT2_TOKENIZER = SHARED / "gpt2-tokenizer"
DIALOGPT_DATA = SHARED / "dialogpt-data"

# Small, regular dialogues: enough for a tokenizer and a few training steps.
DIALOGUES = [
    ["Hello", "Hi, how are you?", "I am fine, thank you."],
    ["What is your name?", "My name is Tiny."],
    ["Do you like tea?", "Yes, I like green tea.", "Me too!"],
    ["こんにちは", "こんにちは、元気ですか?", "元気です。"],
    ["Good morning", "Good morning to you too."],
    ["Where do you live?", "I live in a small town.", "Is it nice?", "Yes, very quiet."],
] * 4


@pytest.fixture(scope="session")
def gpt2_tokenizer_dir() -> Path:
    if not (GPT2_TOKENIZER / "vocab.json").is_file():
        pytest.skip(f"the GPT-2 vocabulary is not at {GPT2_TOKENIZER} (../shared is absent)")
    return GPT2_TOKENIZER


@pytest.fixture(scope="session")
def tiny_tokenizer_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A byte-level BPE tokenizer trained on DIALOGUES, saved as a folder."""
    from convcli.data.vocab import train_bpe_tokenizer

    path = tmp_path_factory.mktemp("tiny-tokenizer")
    texts = [turn for dialogue in DIALOGUES for turn in dialogue]
    train_bpe_tokenizer(texts, vocab_size=400, min_frequency=1).save_pretrained(str(path))
    return path


@pytest.fixture
def tiny_tokenizer(tiny_tokenizer_dir: Path):
    from convcli.tokenizer import ConversationTokenizer

    return ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)


def tiny_gpt2(vocab_size: int, *, n_positions: int = 128, seed: int = 0):
    """A 2-layer, 64-wide GPT-2 with random weights."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(
        vocab_size=vocab_size,
        n_positions=n_positions,
        n_embd=64,
        n_layer=2,
        n_head=4,
        bos_token_id=None,
        eos_token_id=None,  # GPT-2's 50256 is outside a tiny vocabulary
    )
    return GPT2LMHeadModel(config).eval()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A complete convcli model folder: tiny random GPT-2 + the tiny tokenizer."""
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer

    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    model = tiny_gpt2(len(tokenizer))
    meta = ModelMeta(token_types=True, sep_token_id=tokenizer.sep_token_id, made_by="test")
    return save_model_folder(model, tokenizer, meta, tmp_path_factory.mktemp("m") / "model")


def train_tiny(
    tokenizer, dialogues: Sequence[Sequence[str]], *, token_types: bool, steps: int = 250
):
    """A tiny GPT-2 fitted on the dialogues' seed layout with plain torch (full batch)."""
    import torch

    from convcli.tokenizer import layout

    model = tiny_gpt2(len(tokenizer), seed=1).train()
    rows = [layout(tokenizer.encode_turns(d), tokenizer.sep_token_id) for d in dialogues]
    width = max(len(ids) for ids, _, _ in rows)
    ids = torch.tensor([r[0] + [0] * (width - len(r[0])) for r in rows])
    types = torch.tensor([r[1] + [0] * (width - len(r[1])) for r in rows])
    labels = torch.tensor([r[0] + [-100] * (width - len(r[0])) for r in rows])
    extra = {"token_type_ids": types} if token_types else {}
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    torch.manual_seed(0)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny steps: threads only fight over the shared cores
    try:
        for _ in range(steps):
            loss = model(input_ids=ids, labels=labels, **extra).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    finally:
        torch.set_num_threads(threads)
    return model.eval()


def reverse_pairs(dialogues: Sequence[Sequence[str]]) -> list[list[str]]:
    """(reply, message) pairs: what a reverse model learns, as DialoGPT's did."""
    return [[d[i + 1], d[i]] for d in dialogues for i in range(len(d) - 1)]


@pytest.fixture(scope="session")
def trained(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> tuple[Path, Path]:
    """Tiny models that have learnt DIALOGUES, trained in seconds: (forward folder with
    token types, reverse folder without), built once per session."""
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer

    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    root = tmp_path_factory.mktemp("trained")
    unique = [list(d) for d in dict.fromkeys(tuple(d) for d in DIALOGUES)]
    forward = train_tiny(tokenizer, unique, token_types=True)
    reverse = train_tiny(tokenizer, reverse_pairs(unique), token_types=False)
    sep = tokenizer.sep_token_id
    forward_dir = save_model_folder(
        forward, tokenizer, ModelMeta(token_types=True, sep_token_id=sep), root / "forward"
    )
    reverse_meta = ModelMeta(token_types=False, sep_token_id=sep, reverse=True)
    reverse_dir = save_model_folder(reverse, tokenizer, reverse_meta, root / "reverse")
    return forward_dir, reverse_dir


@pytest.fixture
def make_shards(tmp_path: Path, tiny_tokenizer_dir: Path) -> Callable[..., Path]:
    """Build a shard directory from dialogues without `prepare` (every 5th one is valid).

    `weights[i]` gives dialogue i's per-turn weight flags; `valid_every=0` puts nothing
    in the validation split, 1 everything; `tokenizer_dir` replaces the tiny tokenizer.
    """
    from convcli.data.shards import ShardWriter, ids_dtype, write_manifest
    from convcli.tokenizer import ConversationTokenizer, layout

    def make(
        dialogues: Sequence[Sequence[str]] = DIALOGUES,
        name: str = "shards",
        *,
        weights: Sequence[Sequence[bool] | None] | None = None,
        valid_every: int = 5,
        tokenizer_dir: Path | None = None,
    ) -> Path:
        tokenizer = ConversationTokenizer.from_pretrained(tokenizer_dir or tiny_tokenizer_dir)
        out = tmp_path / name
        out.mkdir()
        tokenizer.save_pretrained(out / "tokenizer")
        dtype = ids_dtype(len(tokenizer))
        writers = {s: ShardWriter(out, s, dtype) for s in ("train", "valid")}
        for i, dialogue in enumerate(dialogues):
            weighted = weights[i] if weights else None
            ids, types, mask = layout(
                tokenizer.encode_turns(dialogue), tokenizer.sep_token_id, weighted
            )
            valid = valid_every > 0 and i % valid_every == valid_every - 1
            writers["valid" if valid else "train"].add(ids, types, mask)
        splits = {s: {"shards": w.close()} for s, w in writers.items()}
        write_manifest(
            out,
            {
                "dtype": dtype.name,
                "splits": splits,
                "tokenizer": {"fingerprint": tokenizer.fingerprint()},
            },
        )
        return out

    return make


def run_cli(
    *args: str,
    cwd: Path | None = None,
    input: str | None = None,
    timeout: float = 600,
    env_repo: Path = REPO,
) -> subprocess.CompletedProcess[str]:
    """Run `python -m convcli ARGS` in a subprocess, using the package of `env_repo`."""
    env = {**os.environ, "PYTHONPATH": str(env_repo)}
    return subprocess.run(
        [sys.executable, "-m", "convcli", *args],
        cwd=cwd or REPO,
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
