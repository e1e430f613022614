"""Tiny models that have learnt DIALOGUES (a forward and a reverse one), trained in seconds.

Test modules wrap `trained_model_dirs` in a session fixture; the folders are built once
per test session and shared.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pytest

from tests.conftest import DIALOGUES, tiny_gpt2

_CACHE: dict[str, tuple[Path, Path]] = {}


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


def trained_model_dirs(
    tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path
) -> tuple[Path, Path]:
    """(forward folder with token types, reverse folder without) trained on DIALOGUES."""
    if "dirs" in _CACHE:
        return _CACHE["dirs"]
    from convcli.modelfolder import ModelMeta, save_model_folder
    from convcli.tokenizer import ConversationTokenizer

    tokenizer = ConversationTokenizer.from_pretrained(tiny_tokenizer_dir)
    root = tmp_path_factory.mktemp("trained")
    unique = [list(d) for d in dict.fromkeys(tuple(d) for d in DIALOGUES)]
    forward = train_tiny(tokenizer, unique, token_types=True)
    reverse = train_tiny(tokenizer, reverse_pairs(unique), token_types=False)
    sep = tokenizer.sep_token_id
    fdir = save_model_folder(
        forward, tokenizer, ModelMeta(token_types=True, sep_token_id=sep), root / "forward"
    )
    rdir = save_model_folder(
        reverse,
        tokenizer,
        ModelMeta(token_types=False, sep_token_id=sep, reverse=True),
        root / "reverse",
    )
    _CACHE["dirs"] = (fdir, rdir)
    return fdir, rdir
