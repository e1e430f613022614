"""`ConversationModel`: a model folder plus its tokenizer, answering conversations.

The seed 000 API: `ConversationModel.from_pretrained(path)` then
`model.generate(["Hello"], do_sample=True, top_p=0.95)`. Any Hugging Face `generate`
option passes through. What this adds around `transformers`:

- the context is laid out as the model was trained (`[sep] t0 [sep] t1 ... [sep]`),
  with token types only when the folder says the model was trained with them;
- oldest whole turns are dropped so that context + generation fit `n_positions`;
- generation ends at the sep token and the text never contains sep/eos/pad;
- a batch of contexts is left-padded into one `generate` call. transformers 5 derives
  position ids from the attention mask (`cumsum - 1`), so a padded context gets the
  same positions as alone, and it extends `token_type_ids` with their last value:
  the context's final lone sep already carries the response segment's type, so the
  generated tokens get the right type (both are checked in the tests).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.errors import ConvcliError, UsageError, first_line
from convcli.inference.settings import Backend, default_threads
from convcli.modelfolder import ModelMeta, load_model_folder
from convcli.tokenizer import ConversationTokenizer, layout, layout_length, truncate_turns

if TYPE_CHECKING:
    import torch
    from transformers import PreTrainedModel

    from convcli.inference.ct2_engine import CT2Engine

DEFAULT_MAX_NEW_TOKENS = 64


@dataclass
class GenerationResult:
    """What `ConversationModel.generate` returns.

    `responses` holds every response, context-major: with `num_return_sequences=k`,
    context i owns `responses[i*k:(i+1)*k]` (see `per_context`). For one context and
    one sequence, `result.text` (and `str(result)`) is the reply.
    """

    contexts: list[list[str]]
    """The contexts as given (before truncation)."""
    responses: list[str]
    """Decoded responses, with no sep/eos/pad text, whitespace trimmed."""
    num_return_sequences: int = 1
    """Responses per context."""
    token_ids: list[list[int]] | None = None
    """The response token ids (sep and padding removed), when `return_token_ids=True`."""
    context_lengths: list[int] = field(default_factory=list)
    """Tokens of each context actually fed to the model (after truncation)."""
    max_new_tokens: int = DEFAULT_MAX_NEW_TOKENS
    """The generation cap that applied (after fitting into the model's positions)."""

    @property
    def text(self) -> str:
        """The first response."""
        return self.responses[0]

    @property
    def context(self) -> list[str]:
        """The first (for a single call, the only) context."""
        return self.contexts[0]

    def per_context(self) -> list[list[str]]:
        """The responses grouped by context."""
        k = self.num_return_sequences
        return [self.responses[i * k : (i + 1) * k] for i in range(len(self.contexts))]

    def __str__(self) -> str:
        return self.text


@dataclass
class Sampled:
    """What `ConversationModel.sample` made: the fitted contexts and the replies' ids."""

    turn_ids: list[list[list[int]]]
    """Each context's turns as fed to the model (after truncation)."""
    tensors: dict[str, torch.Tensor] | None
    """The padded model inputs (None on an engine, which takes the ids as lists)."""
    max_new_tokens: int
    response_ids: list[list[int]]
    """Each generated sequence's reply, cut at the first sep (contexts x samples)."""

    @property
    def context_lengths(self) -> list[int]:
        """Tokens of each context as fed to the model."""
        return [layout_length([len(t) for t in turns]) for turns in self.turn_ids]


def fit_turns(
    turn_ids: Sequence[Sequence[int]], budget: int, keep_first: int = 0
) -> list[list[int]]:
    """Drop whole oldest turns (after the first `keep_first`) until the layout fits.

    The first `keep_first` turns (a persona, opening turns) and the newest turn are
    always kept; when the newest alone does not fit, its end is kept.
    """
    pinned = [list(t) for t in turn_ids[:keep_first]]
    rest = turn_ids[keep_first:]
    cost = sum(len(t) + 1 for t in pinned)  # each pinned turn and its sep
    if not rest:
        if cost + 1 > budget:
            raise ConvcliError(f"the kept opening turns take {cost + 1} tokens, over the {budget}")
        return pinned
    if cost + 3 > budget:
        raise ConvcliError(
            f"the kept opening turns take {cost + 1} tokens, leaving no room in the "
            f"{budget}-token context budget"
        )
    return pinned + truncate_turns(rest, budget - cost)


class ConversationModel:
    """A conversation model (forward or reverse) ready to generate.

    Build with `from_pretrained`; `.model` is the Hugging Face model, `.tokenizer` the
    `ConversationTokenizer`, `.meta` the folder's `ModelMeta`, `.config` the model's
    config. With the ctranslate2 backend, `.engine` runs the model and `.model` is None.
    """

    def __init__(
        self,
        model: PreTrainedModel | None,
        tokenizer: ConversationTokenizer,
        meta: ModelMeta,
        path: str = "",
        engine: CT2Engine | None = None,
        config: Any = None,
    ) -> None:
        if model is None and (engine is None or config is None):
            raise ValueError(
                "a ConversationModel without a torch model needs an engine and a config"
            )
        self.model = model
        self.config = config if config is not None else model.config  # type: ignore[union-attr]
        self.tokenizer = tokenizer
        self.meta = meta
        self.path = path
        self.engine = engine
        self.notes: list[str] = []
        self.generation_defaults: dict[str, Any] = {}
        """What the folder's generation_config.json sets that an engine applies itself."""
        # An engine's models draw MMI's choice from Python's RNG: no torch to import.
        self.rng = random.Random() if engine is not None else None
        if model is not None and engine is None:
            # Batched calls (MMI candidates, several contexts) on CPU use oneDNN-packed
            # weights, made on first use; batch-1 calls run the model's own layers.
            from convcli.inference.packed import pack_batched_linears

            pack_batched_linears(model)

    @classmethod
    def from_pretrained(
        cls,
        path: str | Path,
        device: str | None = None,
        dtype: torch.dtype | str | None = None,
        share_tokenizer: ConversationModel | None = None,
        backend: Backend = "torch",
        compute_type: str = "int8",
        report: Callable[[str], None] | None = None,
        threads: int | None = None,
    ) -> ConversationModel:
        """Load a model folder written by `train` or `convert`, or a plain GPT-2 folder.

        `device=None` picks CUDA when present, else CPU. `share_tokenizer`: a model whose
        tokenizer this folder reuses when their tokenizer files are identical (MMI pairs).
        `backend="ctranslate2"` decodes with CTranslate2 at `compute_type` (int8 by
        default; see `convcli.inference.ct2_engine` for what differs from torch), with
        `threads` CPU threads (default: `default_threads()`), and imports neither torch
        nor transformers once the folder is converted (`convcli.inference.ct2_loading`);
        `report(message)` hears when the folder is converted for it (seconds, once).
        """
        if backend not in ("torch", "ctranslate2"):
            raise UsageError(f"`backend` must be torch or ctranslate2, got {backend!r}")
        if backend == "ctranslate2" and dtype is not None:
            raise UsageError("`dtype` is for the torch backend (ctranslate2: `compute_type`)")
        share = None
        if share_tokenizer is not None:
            share = (share_tokenizer.path, share_tokenizer.tokenizer)
        if backend == "torch":
            loaded = load_model_folder(path, device=device, dtype=dtype, share_tokenizer=share)
            model = cls(loaded.model, loaded.tokenizer, loaded.meta, loaded.path)
        else:
            from convcli.inference.ct2_loading import load_for_engine

            loaded, engine, defaults = load_for_engine(
                path, device=device, compute_type=compute_type, share_tokenizer=share,
                threads=threads or default_threads(), report=report,
            )  # fmt: skip
            model = cls(None, loaded.tokenizer, loaded.meta, loaded.path, engine, loaded.config)
            model.generation_defaults = defaults
        model.notes = loaded.notes  # e.g. a run directory's final/ was used
        return model

    def require_torch(self, what: str) -> PreTrainedModel:
        """The torch model, or one line saying that `what` needs the torch backend."""
        if self.model is None:
            raise ConvcliError(f"{what} runs on the torch backend, not {self.path}'s engine")
        return self.model

    # -- properties -------------------------------------------------------------------------

    @property
    def device(self) -> torch.device:
        """Where the model runs."""
        if self.engine is not None:
            import torch

            return torch.device(self.engine.device, self.engine.device_index)
        return self.model.device  # type: ignore[union-attr]

    @property
    def n_positions(self) -> int:
        config = self.config
        for name in ("n_positions", "max_position_embeddings", "n_ctx"):
            value = getattr(config, name, None)
            if isinstance(value, int) and value > 0:
                return value
        return 1024

    @property
    def sep_token_id(self) -> int:
        return self.meta.sep_token_id

    # -- encoding ---------------------------------------------------------------------------

    def plan_lengths(self, max_new_tokens: int | None) -> tuple[int, int]:
        """(max_new_tokens, context budget) so that context + generation fit positions.

        A request for more tokens than fit is cut so the context keeps at least a
        quarter of the positions.
        """
        n = self.n_positions
        max_new = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else int(max_new_tokens)
        if max_new < 1:
            raise UsageError(f"max_new_tokens must be at least 1, got {max_new}")
        floor = max(3, n // 4)
        max_new = min(max_new, n - floor)
        return max_new, n - max_new

    def encode_contexts(
        self,
        contexts: Sequence[Sequence[str]],
        budget: int,
        keep_first: int = 0,
    ) -> list[list[list[int]]]:
        """Token ids of each context's turns, fitted into `budget` layout tokens."""
        flat = [turn for turns in contexts for turn in turns]
        encoded = iter(self.tokenizer.encode_turns(flat))
        out = []
        for turns in contexts:
            out.append(fit_turns([next(encoded) for _ in turns], budget, keep_first))
        return out

    def batch_tensors(self, turn_ids: Sequence[Sequence[Sequence[int]]]) -> dict[str, torch.Tensor]:
        """Left-padded `input_ids`, `attention_mask` (and `token_type_ids` if the model uses
        them) for contexts given as turn ids."""
        import torch

        laid = [layout(turns, self.sep_token_id) for turns in turn_ids]
        width = max(len(ids) for ids, _, _ in laid)
        pad = self.tokenizer.pad_token_id
        ids_rows, mask_rows, type_rows = [], [], []
        for ids, types, _ in laid:
            gap = width - len(ids)
            ids_rows.append([pad] * gap + ids)
            mask_rows.append([0] * gap + [1] * len(ids))
            type_rows.append([0] * gap + types)
        device = self.device if self.engine is None else "cpu"  # the engine takes lists
        tensors = {
            "input_ids": torch.tensor(ids_rows, dtype=torch.long, device=device),
            "attention_mask": torch.tensor(mask_rows, dtype=torch.long, device=device),
        }
        if self.meta.token_types:
            tensors["token_type_ids"] = torch.tensor(type_rows, dtype=torch.long, device=device)
        return tensors

    # -- generation -------------------------------------------------------------------------

    def generate(
        self,
        context: Sequence[str] | Sequence[Sequence[str]],
        *,
        seed: int | None = None,
        return_token_ids: bool = False,
        max_context_tokens: int | None = None,
        keep_first_turns: int = 0,
        **hf_kwargs: Any,
    ) -> GenerationResult:
        """Generate the next turn of a context (a list of turns) or of a batch of contexts.

        Every Hugging Face `generate` option passes through (do_sample, top_p, top_k,
        temperature, num_beams, repetition_penalty, no_repeat_ngram_size,
        num_return_sequences, min_new_tokens, max_new_tokens, ...). `max_new_tokens`
        defaults to 64 and is capped to fit the model's positions; `max_length` counts
        the context as in transformers. `seed` makes sampling reproducible.
        `max_context_tokens` tightens the context budget; `keep_first_turns` pins the
        first turns (a persona) when oldest turns are dropped.
        """
        batch = _as_batch(context)
        k = int(hf_kwargs.get("num_return_sequences") or 1)
        sampled = self.sample(
            batch, seed=seed, max_context_tokens=max_context_tokens,
            keep_first_turns=keep_first_turns, **hf_kwargs,
        )  # fmt: skip
        return GenerationResult(
            contexts=[list(c) for c in batch],
            responses=[self.tokenizer.decode(ids) for ids in sampled.response_ids],
            num_return_sequences=k,
            token_ids=sampled.response_ids if return_token_ids else None,
            context_lengths=sampled.context_lengths,
            max_new_tokens=sampled.max_new_tokens,
        )

    def sample(
        self,
        batch: Sequence[Sequence[str]],
        *,
        seed: int | None = None,
        max_context_tokens: int | None = None,
        keep_first_turns: int = 0,
        **hf_kwargs: Any,
    ) -> Sampled:
        """The path `generate` and MMI share: fit and pad the contexts, run one Hugging Face
        `generate` call, cut each sequence's reply at its sep."""
        turn_ids, max_new = self.fit(
            batch,
            max_new_tokens=hf_kwargs.pop("max_new_tokens", None),
            max_length=hf_kwargs.pop("max_length", None),
            max_context_tokens=max_context_tokens,
            keep_first_turns=keep_first_turns,
        )
        tensors = None
        if self.engine is not None:
            laid = (layout(turns, self.sep_token_id) for turns in turn_ids)
            prompts = [(ids, types if self.meta.token_types else None) for ids, types, _ in laid]
            stops = self._stop_ids(hf_kwargs.pop("eos_token_id", None))
            options = {**self.generation_defaults, **hf_kwargs}
            if seed is not None:
                self.reseed(seed, engine=bool(options.get("do_sample")))
            try:
                generated = self.engine.generate(prompts, max_new, stops, **options)
            except (ValueError, TypeError) as exc:
                raise UsageError(f"generation options rejected: {first_line(exc)}") from exc
            replies = [self.cut_reply(ids) for ids in generated]
        else:
            tensors = self.batch_tensors(turn_ids)
            sequences = self.generate_ids(tensors, max_new, seed=seed, **hf_kwargs)
            replies = self.response_ids(sequences, tensors["input_ids"].shape[1])
        return Sampled(turn_ids, tensors, max_new, replies)

    def reseed(self, seed: int, *, engine: bool = True) -> None:
        """Seed what draws from here on. Torch backend: torch's RNG (sampling and MMI's
        choice). Engine: its sampling (unless `engine=False`: a call that does not sample)
        and `rng` (MMI's choice)."""
        if self.engine is None:
            import torch

            torch.manual_seed(seed)
            return
        assert self.rng is not None
        self.rng.seed(seed)
        if engine:
            self.engine.reseed(seed)

    def fit(
        self,
        batch: Sequence[Sequence[str]],
        *,
        max_new_tokens: int | None = None,
        max_length: int | None = None,
        max_context_tokens: int | None = None,
        keep_first_turns: int = 0,
    ) -> tuple[list[list[list[int]]], int]:
        """Encode and fit a batch: (each context's turn ids, max_new_tokens)."""
        if max_length is not None and max_new_tokens is None:
            # transformers' max_length counts the prompt: resolve it against the longest one.
            full = self.encode_contexts(batch, self.n_positions, keep_first_turns)
            longest = max(sum(len(t) + 1 for t in turns) + 1 for turns in full)
            max_new_tokens = max(1, int(max_length) - longest)
        max_new, budget = self.plan_lengths(max_new_tokens)
        if max_context_tokens is not None:
            budget = min(budget, int(max_context_tokens))
        return self.encode_contexts(batch, budget, keep_first_turns), max_new

    def prepare(
        self, batch: Sequence[Sequence[str]], **fit_kwargs: Any
    ) -> tuple[list[list[list[int]]], dict[str, torch.Tensor], int]:
        """`fit`, and the padded model inputs: (turn ids, model inputs, max_new_tokens)."""
        turn_ids, max_new = self.fit(batch, **fit_kwargs)
        return turn_ids, self.batch_tensors(turn_ids), max_new

    def generate_ids(
        self,
        tensors: dict[str, torch.Tensor],
        max_new_tokens: int,
        *,
        seed: int | None = None,
        **hf_kwargs: Any,
    ) -> torch.Tensor:
        """Run Hugging Face `generate` on prepared inputs; returns the full sequences."""
        import torch

        if seed is not None:
            torch.manual_seed(seed)
        min_new = hf_kwargs.get("min_new_tokens")
        if min_new is not None:
            hf_kwargs["min_new_tokens"] = min(int(min_new), max_new_tokens)
        stops = self._stop_ids(hf_kwargs.pop("eos_token_id", None))
        hf_kwargs.setdefault("pad_token_id", self.tokenizer.pad_token_id)
        try:
            with torch.inference_mode():
                if _shares_context(tensors, hf_kwargs):
                    tensors, hf_kwargs = self._shared_prefill(tensors, hf_kwargs, max_new_tokens)
                return self.model.generate(
                    **tensors,
                    max_new_tokens=max_new_tokens,
                    eos_token_id=stops if len(stops) > 1 else stops[0],
                    **hf_kwargs,
                )
        except (ValueError, TypeError) as exc:
            # transformers rejects bad option combinations with ValueError/TypeError.
            raise UsageError(f"generation options rejected: {first_line(exc)}") from exc

    def _stop_ids(self, eos: int | Sequence[int] | None) -> list[int]:
        """The sep token and any `eos_token_id` the caller adds."""
        stops = [self.sep_token_id]
        extra = [] if eos is None else list(eos) if isinstance(eos, list | tuple) else [eos]
        return stops + [e for e in extra if e not in stops]

    def _shared_prefill(
        self, tensors: dict[str, torch.Tensor], hf_kwargs: dict[str, Any], max_new_tokens: int
    ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        """Run the context once, then repeat its KV cache for each sampled sequence.

        transformers' `num_return_sequences` copies the prompt k times before the first
        forward, so k samples of one context cost k prefills; the tutorial ran it once.
        Here the context (all but its last token) goes through the model once per
        context, the cache is repeated k times, and `generate` continues from it with
        the prompts repeated: the same sequences, one prefill.

        The repeated cache goes into a `StaticCache` sized for the whole reply: each step
        then writes its keys and values in place, where the growing cache copied every
        layer's cache (`torch.cat`, ~11% of an MMI turn's time in the profile).
        """
        from transformers import StaticCache

        k = int(hf_kwargs["num_return_sequences"])
        mask = tensors["attention_mask"]
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        head = {key: value[:, :-1] for key, value in tensors.items()}
        # logits_to_keep=1: the vocabulary projection of the context is not needed. `cache`
        # is transformers 5's name (`past_key_values` warns and goes away in 6.0).
        cache = self.model(
            **head, position_ids=positions[:, :-1], use_cache=True, logits_to_keep=1
        ).cache
        cache.batch_repeat_interleave(k)
        width = tensors["input_ids"].shape[1]
        static = StaticCache(config=self.model.config, max_cache_len=width + max_new_tokens)
        for layer, grown in zip(static.layers, cache.layers, strict=True):
            layer.update(grown.keys, grown.values)
        repeated = {key: value.repeat_interleave(k, dim=0) for key, value in tensors.items()}
        return repeated, {**hf_kwargs, "num_return_sequences": 1, "cache": static}

    def response_ids(self, sequences: torch.Tensor, prompt_width: int) -> list[list[int]]:
        """The generated ids of each sequence, cut at the first sep (or eos/pad)."""
        return [self.cut_reply(row) for row in sequences[:, prompt_width:].tolist()]

    def reply_stop_ids(self) -> set[int]:
        """The ids that end a reply: sep, pad and the tokenizer's eos."""
        stops = {self.sep_token_id, self.tokenizer.pad_token_id}
        eos = self.tokenizer.tokenizer.eos_token_id
        if eos is not None:
            stops.add(eos)
        return stops

    def cut_reply(self, ids: Sequence[int]) -> list[int]:
        """Generated ids up to the first sep, pad or eos (both backends cut alike)."""
        stops = self.reply_stop_ids()
        return list(ids[: next((i for i, t in enumerate(ids) if t in stops), len(ids))])


def _shares_context(tensors: dict[str, torch.Tensor], hf_kwargs: dict[str, Any]) -> bool:
    """Several samples per context (no beams, no cache given): one prefill can serve all."""
    return (
        int(hf_kwargs.get("num_return_sequences") or 1) > 1
        and hf_kwargs.get("do_sample") is True
        and int(hf_kwargs.get("num_beams") or 1) == 1
        and not {"cache", "past_key_values"} & hf_kwargs.keys()
        and hf_kwargs.get("use_cache", True) is not False
        and tensors["input_ids"].shape[1] > 1
    )


def _as_batch(context: Sequence[str] | Sequence[Sequence[str]]) -> list[list[str]]:
    """A batch of contexts from one context or a batch (a context is a list of turns)."""
    if isinstance(context, str):
        raise UsageError("a context is a list of turns, not a string: wrap it as [text]")
    items = list(context)
    if not items:
        raise UsageError("a context needs at least one turn")
    if all(isinstance(t, str) for t in items):
        return [items]  # type: ignore[list-item]
    batch = []
    for turns in items:
        if isinstance(turns, str) or not all(isinstance(t, str) for t in turns):
            raise UsageError("a batch is a list of contexts, each a list of turn strings")
        if not turns:
            raise UsageError("a context needs at least one turn")
        batch.append(list(turns))
    return batch
