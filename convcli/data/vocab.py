"""Train a byte-level BPE tokenizer for users with no pretrained one (the offline demo)."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

EOS = "<|endoftext|>"


def train_bpe_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> Any:
    """A GPT-2-style byte-level BPE tokenizer trained on `texts`.

    Like GPT-2 it has one special token, `<|endoftext|>` (id 0), which is also the
    sep token between turns. Returns a transformers fast tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if vocab_size < 257 + 1:
        raise ValueError(f"vocab size {vocab_size} is too small for byte-level BPE (need >= 258)")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOS],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        sep_token=EOS,
        pad_token=EOS,
        model_max_length=1024,
    )
