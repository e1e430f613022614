"""The conversation encoding of seed 000, exactly, around any Hugging Face tokenizer.

For turns t0..tn-1 the ids are `[sep] enc(t0) [sep] enc(t1) ... [sep]`. Segment i
(its leading sep and the tokens of t_i) has token type `i % 2`; the final lone sep
has `n % 2`. With the GPT-2 vocabulary and `["Hello", "How are you"]`:

    ids   [50256, 15496, 50256, 2437, 389, 345, 50256]
    types [0,     0,     1,     1,    1,   1,   0]

The sep token is the tokenizer's own sep token, else its eos token (GPT-2 and
DialoGPT end every turn with `<|endoftext|>`), else a `<sep>` special token added
to the vocabulary (the model's embeddings must then be resized).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from convcli.errors import ConvcliError, first_line

SEP_FALLBACK = "<sep>"

# Per-token loss flags, aligned with the labels: flag[p] describes the target
# token p, i.e. what the model predicts at position p - 1. A turn's flags cover
# its text tokens and the sep that ends it.
LOSS_RESPONSE = 1  # the token belongs to a reply: any turn but the first
LOSS_WEIGHTED = 2  # the token's turn has a non-zero weight (DialoGPT TSV weights)


def layout(
    turn_ids: Sequence[Sequence[int]],
    sep_id: int,
    weighted: Sequence[bool] | None = None,
    replies: Sequence[bool] | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Lay out encoded turns as (input ids, token types, loss flags).

    `weighted[i]` says whether turn i has a non-zero weight (default: all do), `replies[i]`
    whether it is a reply (default: every turn but the first; with roles, the assistant's).
    """
    ids: list[int] = []
    types: list[int] = []
    flags: list[int] = []
    previous = 0  # flags of the turn the next sep closes; nothing precedes the first sep
    for i, tokens in enumerate(turn_ids):
        reply = replies[i] if replies is not None else i > 0
        turn_flags = (LOSS_RESPONSE if reply else 0) | (
            LOSS_WEIGHTED if weighted is None or weighted[i] else 0
        )
        ids.append(sep_id)
        ids.extend(tokens)
        types.extend([i % 2] * (len(tokens) + 1))
        flags.append(previous)
        flags.extend([turn_flags] * len(tokens))
        previous = turn_flags
    ids.append(sep_id)
    types.append(len(turn_ids) % 2)
    flags.append(previous)
    return ids, types, flags


def layout_length(turn_lengths: Sequence[int]) -> int:
    """Length of `layout` for turns of these token lengths."""
    return sum(turn_lengths) + len(turn_lengths) + 1


def split_turns(ids: Sequence[int], sep_id: int) -> list[list[int]]:
    """Inverse of `layout` on the ids: the token ids of each turn."""
    turns: list[list[int]] = []
    current: list[int] | None = None
    for token in ids:
        if token == sep_id:
            if current is not None:
                turns.append(current)
            current = []
        elif current is not None:
            current.append(token)
    if current:  # a trailing turn without its closing sep (e.g. cut generation)
        turns.append(current)
    return turns


def truncate_turns(turn_ids: Sequence[Sequence[int]], budget: int) -> list[list[int]]:
    """Drop whole oldest turns until the layout fits in `budget` tokens.

    The newest turn is never dropped; if it alone does not fit, its end is kept.
    """
    if budget < 3:
        raise ValueError(f"a budget of {budget} tokens cannot hold a turn (need at least 3)")
    kept: list[list[int]] = []
    total = 1  # the final sep
    for tokens in reversed(turn_ids):
        cost = len(tokens) + 1
        if total + cost > budget:
            if not kept:
                kept.append(list(tokens[len(tokens) - (budget - 2) :]))
            break
        kept.append(list(tokens))
        total += cost
    kept.reverse()
    return kept


def _is_batch(context: Sequence[Any]) -> bool:
    if isinstance(context, str):
        raise TypeError("a context is a list of turns, not a string: wrap it as [text]")
    return bool(context) and not isinstance(context[0], str)


class ConversationTokenizer:
    """Wraps a Hugging Face tokenizer with the conversation layout of seed 000."""

    def __init__(self, tokenizer: Any, sep_token: str = SEP_FALLBACK) -> None:
        if tokenizer.sep_token is None:
            if tokenizer.eos_token is not None:
                tokenizer.sep_token = tokenizer.eos_token
            else:
                tokenizer.add_special_tokens({"sep_token": sep_token})
        if tokenizer.pad_token is None:
            # Padding is always masked out; reusing sep adds no token to the vocabulary.
            tokenizer.pad_token = tokenizer.sep_token
        self.tokenizer = tokenizer

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, **kwargs: Any) -> ConversationTokenizer:
        """Load a tokenizer by hub name or folder (a bare vocab.json + merges.txt works too)."""
        return cls(load_hf_tokenizer(name_or_path, **kwargs))

    # -- vocabulary -------------------------------------------------------------------------

    @property
    def sep_token(self) -> str:
        return self.tokenizer.sep_token

    @property
    def sep_token_id(self) -> int:
        return self.tokenizer.sep_token_id

    @property
    def pad_token_id(self) -> int:
        return self.tokenizer.pad_token_id

    def __len__(self) -> int:
        return len(self.tokenizer)

    def fingerprint(self) -> str:
        """A hash of the vocabulary and sep token: equal fingerprints encode text alike."""
        vocab = sorted(self.tokenizer.get_vocab().items())
        kind = getattr(self.tokenizer, "stands_for", None) or type(self.tokenizer).__name__
        payload = json.dumps([kind, self.sep_token, vocab])
        return hashlib.sha256(payload.encode()).hexdigest()[:16]

    def save_pretrained(self, path: str | Path) -> None:
        self.tokenizer.save_pretrained(str(path))

    # -- encoding ---------------------------------------------------------------------------

    def encode_turns(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each turn, in one batched call.

        No BOS/EOS of the tokenizer's own, and special-token text typed by a user
        (a literal "<|endoftext|>") is split like any text, so a sep never appears
        inside a turn.
        """
        if not texts:
            return []
        encodings = self._backend_encodings(texts)
        if encodings is not None:
            return [e.ids for e in encodings]
        return self.tokenizer(list(texts), add_special_tokens=False, split_special_tokens=True)[
            "input_ids"
        ]

    def encode_turns_flat(self, texts: Sequence[str]) -> tuple[list[int], list[int]]:
        """`encode_turns` flattened: the ids of all turns in one list, and each turn's length.

        The same ids; for many turns (prepare) it is faster: one list, not one per turn.
        """
        if not texts:
            return [], []
        encodings = self._backend_encodings(texts)
        if encodings is None:
            per_turn = self.encode_turns(texts)
            return [i for ids in per_turn for i in ids], [len(ids) for ids in per_turn]
        from tokenizers import Encoding

        return Encoding.merge(encodings).ids, [len(e) for e in encodings]

    def _backend_encodings(self, texts: Sequence[str]) -> list[Any] | None:
        """The fast tokenizer's encodings of `texts` (None for a slow tokenizer)."""
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        # What the fast tokenizer's __call__ does, without building a BatchEncoding
        # (twice as fast; prepare spends most of its time here). encode_batch_fast (newer
        # tokenizers) gives the same ids without computing character offsets.
        encode = getattr(backend, "encode_batch_fast", backend.encode_batch)
        saved = backend.encode_special_tokens
        backend.encode_special_tokens = True
        try:
            return encode(list(texts), add_special_tokens=False)
        finally:
            backend.encode_special_tokens = saved

    def encode(self, text: str) -> list[int]:
        """Token ids of one turn."""
        return self.encode_turns([text])[0]

    def __call__(
        self, context: Sequence[str] | Sequence[Sequence[str]], max_length: int | None = None
    ) -> dict[str, list[Any]]:
        """Encode a context (a list of turns), or a batch of them, in the seed's layout.

        With `max_length`, whole oldest turns are dropped to fit (see `truncate_turns`).
        A batch gives a list per key, unpadded.
        """
        batch = _is_batch(context)
        contexts = [list(c) for c in context] if batch else [list(context)]  # type: ignore[arg-type]
        flat = [turn for turns in contexts for turn in turns]
        encoded = iter(self.encode_turns(flat))
        out: dict[str, list[Any]] = {"input_ids": [], "token_type_ids": [], "attention_mask": []}
        for turns in contexts:
            turn_ids = [next(encoded) for _ in turns]
            if max_length is not None:
                turn_ids = truncate_turns(turn_ids, max_length)
            ids, types, _ = layout(turn_ids, self.sep_token_id)
            out["input_ids"].append(ids)
            out["token_type_ids"].append(types)
            out["attention_mask"].append([1] * len(ids))
        return out if batch else {key: value[0] for key, value in out.items()}

    # -- decoding ---------------------------------------------------------------------------

    def decode(self, ids: Sequence[int]) -> str:
        """Text of one turn: special tokens (sep, eos, pad) removed, whitespace trimmed."""
        return self.tokenizer.decode(list(ids), skip_special_tokens=True).strip()

    def decode_turns(self, ids: Sequence[int]) -> list[str]:
        """Inverse of `__call__`: the turns of a laid-out sequence."""
        return [self.decode(turn) for turn in split_turns(ids, self.sep_token_id)]


class BackendTokenizer:
    """A fast tokenizer as transformers loaded it, rebuilt from its `tokenizers` backend
    (the `to_str()` JSON) and special tokens, without importing transformers (or torch,
    which transformers imports): what `ConversationTokenizer` uses of a Hugging Face
    tokenizer. The ctranslate2 backend keeps one beside each conversion (`snapshot`) so
    that later runs start in a fraction of a second; it encodes and decodes as the
    tokenizer it was taken from (tested), whose class name it keeps for `fingerprint`.
    """

    def __init__(
        self, backend_json: str, *, stands_for: str, sep_token: str, pad_token: str,
        eos_token: str | None,
    ) -> None:  # fmt: skip
        from tokenizers import Tokenizer

        self.backend_tokenizer = Tokenizer.from_str(backend_json)
        self.stands_for = stands_for
        self.sep_token, self.pad_token, self.eos_token = sep_token, pad_token, eos_token
        for token in (sep_token, pad_token):
            if self.backend_tokenizer.token_to_id(token) is None:
                raise ValueError(f"the special token {token!r} is not in the vocabulary")

    @classmethod
    def snapshot(cls, tokenizer: Any) -> dict[str, Any] | None:
        """What rebuilds `tokenizer` (a loaded Hugging Face tokenizer with its sep and pad
        set, or a BackendTokenizer), or None when it is not a fast tokenizer or decodes
        with more than its backend (transformers' clean-up of spaces)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None:
            return None
        if getattr(tokenizer, "clean_up_tokenization_spaces", False):
            probe = backend.encode("a , b . c ' d n't").ids  # spaces the clean-up removes
            if tokenizer.decode(probe) != backend.decode(probe):
                return None
        return {
            "backend_json": backend.to_str(),
            "stands_for": getattr(tokenizer, "stands_for", None) or type(tokenizer).__name__,
            "sep_token": str(tokenizer.sep_token),
            "pad_token": str(tokenizer.pad_token),
            "eos_token": None if tokenizer.eos_token is None else str(tokenizer.eos_token),
        }

    @property
    def sep_token_id(self) -> int:
        return self.backend_tokenizer.token_to_id(self.sep_token)

    @property
    def pad_token_id(self) -> int:
        return self.backend_tokenizer.token_to_id(self.pad_token)

    @property
    def eos_token_id(self) -> int | None:
        eos = self.eos_token
        return None if eos is None else self.backend_tokenizer.token_to_id(eos)

    def __len__(self) -> int:
        return self.backend_tokenizer.get_vocab_size(with_added_tokens=True)

    def get_vocab(self) -> dict[str, int]:
        return self.backend_tokenizer.get_vocab(with_added_tokens=True)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend_tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def save_pretrained(self, path: str | Path) -> None:
        """tokenizer.json and the tokenizer_config.json that makes transformers load it
        back as the tokenizer it came from."""
        folder = Path(path)
        folder.mkdir(parents=True, exist_ok=True)
        self.backend_tokenizer.save(str(folder / "tokenizer.json"))
        config = {"tokenizer_class": self.stands_for, "sep_token": self.sep_token,
                  "pad_token": self.pad_token, "eos_token": self.eos_token}  # fmt: skip
        text = json.dumps({k: v for k, v in config.items() if v is not None}, indent=2)
        (folder / "tokenizer_config.json").write_text(text + "\n", encoding="utf-8")


def load_hf_tokenizer(name_or_path: str | Path, **kwargs: Any) -> Any:
    """`AutoTokenizer.from_pretrained`, plus bare GPT-2 vocab folders, with a clear error."""
    from transformers import AutoTokenizer, GPT2TokenizerFast

    from convcli.loadgate import TRUST, check_name, check_no_code, check_tokenizer_files

    path = Path(name_or_path)
    check_name(name_or_path, "tokenizer")
    if path.is_dir():
        check_no_code(path)
        check_tokenizer_files(path)
    kwargs = {**kwargs, **TRUST}
    bare_gpt2 = (
        path.is_dir()
        and (path / "vocab.json").is_file()
        and (path / "merges.txt").is_file()
        and not (path / "tokenizer_config.json").exists()
        and not (path / "config.json").exists()
    )
    try:
        if bare_gpt2:
            # transformers 5 needs from_pretrained(folder): vocab_file=/merges_file=
            # silently build an empty vocabulary.
            return GPT2TokenizerFast.from_pretrained(str(path), **kwargs)
        return AutoTokenizer.from_pretrained(str(name_or_path), **kwargs)
    except Exception as exc:  # tokenizers raises plain Exceptions for a damaged file
        where = _damaged_file(path) if path.is_dir() else None
        detail = f"no {exc.args[0]!r} entry" if isinstance(exc, KeyError) else first_line(exc)
        raise ConvcliError(
            f"cannot load tokenizer {str(name_or_path)!r}"
            + (f" ({where.name})" if where else "")
            + f": {detail}"
        ) from exc


def _damaged_file(folder: Path) -> Path | None:
    """The tokenizer file of `folder` that is not valid JSON, or tokenizer.json when the
    files parse (the `tokenizers` library then found it inconsistent), or None."""
    names = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
             "added_tokens.json", "vocab.json")  # fmt: skip
    for name in names:
        file = folder / name
        try:
            if file.is_file():
                json.loads(file.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return file
    return folder / "tokenizer.json" if (folder / "tokenizer.json").is_file() else None
