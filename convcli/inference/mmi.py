"""Maximum Mutual Information reranking (DialoGPT's MMI, seed 001, fixed and batched).

The forward model samples N candidates for a context in ONE `generate` call
(`num_return_sequences=N`); the reverse model scores all candidates in ONE padded
forward pass. A candidate's score is the mean log-likelihood, under the reverse model,
of the source given the candidate: the reverse model reads

    [sep] candidate [sep] s1 [sep] s2 [sep] ...

(the layout a reverse model is trained on: turns in reverse order) and the score
averages the log-probabilities of the source tokens `s1 [sep] s2 [sep] ...`. The source
is the last message (`source="last"`, the default) or the whole history, newest first
(`source="history"`). The reply is drawn from softmax(score / T), or is the argmax.
Empty candidates are never chosen while a non-empty one exists.

What changed from the tutorial: candidates are generated together instead of one at a
time with a `.item()` per token, the generation length is capped, the first turn works,
truncation keeps the newest turns, a seed makes it reproducible, and identical
candidates are scored once and listed once with their count (the choice weighs them by
it, so its distribution is the tutorial's).
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from convcli.errors import ConvcliError, UsageError
from convcli.inference.model import ConversationModel, _as_batch
from convcli.inference.settings import MMI_CANDIDATE_SAMPLING, MMISettings
from convcli.tokenizer import layout, truncate_turns

if TYPE_CHECKING:
    import torch

Source = Literal["last", "history"]
# The defaults live once, in convcli.inference.settings.
DEFAULT_CANDIDATES = MMISettings.num_candidates
DEFAULT_TEMPERATURE = MMISettings.mmi_temperature
# Candidate sampling unless the caller says otherwise (the tutorial's top-k sampling).
DEFAULT_SAMPLING: dict[str, Any] = MMI_CANDIDATE_SAMPLING.generate_kwargs()


@dataclass
class Candidate:
    """One sampled reply and its MMI score."""

    text: str
    score: float
    """Mean log-likelihood of the source given this reply (higher is better)."""
    token_ids: list[int]
    count: int = 1
    """How many of the sampled candidates were this very reply (same token ids)."""

    def to_dict(self) -> dict[str, Any]:
        return {"text": self.text, "score": round(self.score, 4), "count": self.count}


@dataclass
class MMIResult:
    """The reranked reply of one context."""

    context: list[str]
    candidates: list[Candidate]
    """The distinct replies sampled, in order of first appearance, each with its count."""
    chosen: int
    """Index of the reply in `candidates`."""

    @property
    def response(self) -> str:
        return self.candidates[self.chosen].text

    @property
    def text(self) -> str:
        return self.response

    @property
    def new_tokens(self) -> int:
        """Tokens generated for this context, all candidates together."""
        return sum(len(c.token_ids) * c.count for c in self.candidates)

    def __str__(self) -> str:
        return self.response


def check_same_tokenizer(forward: ConversationModel, reverse: ConversationModel) -> None:
    """Refuse a forward/reverse pair whose tokenizers encode text differently."""
    if forward.tokenizer is reverse.tokenizer and forward.sep_token_id == reverse.sep_token_id:
        return  # one tokenizer loaded for both (load_models): no fingerprints to compare
    a, b = forward.tokenizer.fingerprint(), reverse.tokenizer.fingerprint()
    if a != b or forward.sep_token_id != reverse.sep_token_id:
        raise ConvcliError(
            f"the reverse model {reverse.path or '(given)'} does not share the forward model's "
            f"tokenizer (fingerprints {a} vs {b}); MMI needs both trained with one tokenizer"
        )


def score_candidates(
    reverse: ConversationModel,
    candidates: Sequence[Sequence[int]],
    sources: Sequence[Sequence[Sequence[int]]],
) -> list[float]:
    """Mean log-likelihood of `sources[i]` (turns, newest first) given `candidates[i]`.

    All rows go through the reverse model in one right-padded forward pass. Only the
    positions that predict source tokens go through the output layer, so the
    vocabulary-sized logits are never built for the whole batch.
    """
    sep = reverse.sep_token_id
    n = reverse.n_positions
    rows, types, starts = [], [], []
    for cand, source in zip(candidates, sources, strict=True):
        cand = list(cand)[: n // 2]
        src = truncate_turns(list(reversed(source)), n - len(cand) - 1)[::-1]
        ids, tt, _ = layout([cand, *src], sep)
        rows.append(ids)
        types.append(tt)
        starts.append(len(cand) + 2)  # the first source token
    if reverse.engine is not None:
        # Log-probabilities of every token after the first: source tokens from `start`.
        typed = reverse.meta.token_types
        pairs = zip(rows, types, strict=True)
        scored = reverse.engine.log_probs([(r, t if typed else None) for r, t in pairs])
        return [sum(lp[start - 1 :]) / max(1, len(lp) - start + 1)
                for lp, start in zip(scored, starts, strict=True)]  # fmt: skip
    import torch

    width = max(map(len, rows))
    pad = reverse.tokenizer.pad_token_id
    device = reverse.device
    ids_t = torch.tensor([r + [pad] * (width - len(r)) for r in rows], device=device)
    mask_t = torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows], device=device)
    # target[b, p]: token p of row b is a source token to score (predicted at p - 1).
    target = torch.zeros_like(ids_t, dtype=torch.bool)
    for b, (row, start) in enumerate(zip(rows, starts, strict=True)):
        target[b, start : len(row)] = True
    inputs: dict[str, torch.Tensor] = {"input_ids": ids_t, "attention_mask": mask_t}
    if reverse.meta.token_types:
        inputs["token_type_ids"] = torch.tensor(
            [t + [0] * (width - len(t)) for t in types], device=device
        )
    with torch.inference_mode():
        hidden = reverse.model.base_model(**inputs).last_hidden_state
        picked = hidden[:, :-1][target[:, 1:]]  # [targets, width]
        logits = reverse.model.get_output_embeddings()(picked).float()
        # log p(token) = its logit - logsumexp: no vocabulary-sized log_softmax tensor.
        logp = logits.gather(1, ids_t[target].unsqueeze(1)).squeeze(1) - logits.logsumexp(-1)
        row_of = target.nonzero()[:, 0]
        sums = torch.zeros(len(rows), device=device).index_add_(0, row_of, logp)
        counts = target.sum(1).clamp(min=1)
    return (sums / counts).tolist()


def choice_probabilities(
    scores: Sequence[float],
    nonempty: Sequence[bool],
    counts: Sequence[int] | None = None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
) -> list[float]:
    """P(pick candidate i): softmax(score / T) over the samples, summed over duplicates.

    A reply sampled `count` times gets `count * exp(score / T)` (normalised), exactly
    what the softmax over every sample gives it; empty replies get 0 while a non-empty
    one exists.
    """
    s = [score / temperature for score in scores]
    if counts is not None:
        s = [x + math.log(c) for x, c in zip(s, counts, strict=True)]
    if any(nonempty):
        s = [x if ok else -math.inf for x, ok in zip(s, nonempty, strict=True)]
    top = max(s)
    weights = [math.exp(x - top) for x in s]
    total = sum(weights)
    return [w / total for w in weights]


def choose(
    scores: Sequence[float],
    nonempty: Sequence[bool],
    counts: Sequence[int] | None = None,
    *,
    temperature: float = DEFAULT_TEMPERATURE,
    argmax: bool = False,
    generator: torch.Generator | random.Random | None = None,
) -> int:
    """Index drawn from `choice_probabilities` (or the best-scored non-empty candidate).

    `generator`: draw with it instead of torch's global RNG (a server's per-request seed);
    a `random.Random` draws without torch (the ctranslate2 backend's models).
    """
    if argmax:
        best = [i for i, ok in enumerate(nonempty) if ok] or range(len(scores))
        return max(best, key=lambda i: scores[i])  # the first of equal scores
    probs = choice_probabilities(scores, nonempty, counts, temperature=temperature)
    if isinstance(generator, random.Random):
        return generator.choices(range(len(probs)), weights=probs)[0]
    import torch

    drawn = torch.multinomial(torch.tensor(probs, dtype=torch.float64), 1, generator=generator)
    return int(drawn)


def distinct(rows: Sequence[Sequence[int]]) -> tuple[list[list[int]], list[int]]:
    """The distinct rows in order of first appearance, and how often each occurs."""
    counts: dict[tuple[int, ...], int] = {}
    for row in rows:
        counts[tuple(row)] = counts.get(tuple(row), 0) + 1
    return [list(row) for row in counts], list(counts.values())


class MMIReranker:
    """Answer contexts with the forward model, reranked by the reverse model."""

    def __init__(
        self,
        forward: ConversationModel,
        reverse: ConversationModel,
        *,
        num_candidates: int = DEFAULT_CANDIDATES,
        temperature: float = DEFAULT_TEMPERATURE,
        argmax: bool = False,
        source: Source = "last",
    ) -> None:
        check_same_tokenizer(forward, reverse)
        if num_candidates < 1:
            raise UsageError(
                f"`num_candidates` must be at least 1, got {num_candidates}", param="num_candidates"
            )
        if not argmax and temperature <= 0:
            raise UsageError(f"`temperature` must be positive, got {temperature}")
        if source not in ("last", "history"):
            raise UsageError(f"`source` must be last or history, got {source!r}")
        self.forward, self.reverse = forward, reverse
        self.num_candidates = num_candidates
        self.temperature, self.argmax, self.source = temperature, argmax, source

    def respond(self, context: Sequence[str], **kwargs: Any) -> MMIResult:
        """The reranked reply to one context (see `respond_batch` for the options)."""
        return self.respond_batch([list(context)], **kwargs)[0]

    def respond_batch(
        self,
        contexts: Sequence[Sequence[str]],
        *,
        seed: int | None = None,
        max_context_tokens: int | None = None,
        keep_first_turns: int = 0,
        **hf_kwargs: Any,
    ) -> list[MMIResult]:
        """Reranked replies to a batch of contexts: one generate call, one reverse forward
        over the distinct candidates.

        `hf_kwargs` are Hugging Face `generate` options for the candidates (default:
        top-k 50 sampling); `num_return_sequences` is the number of candidates.
        """
        batch = _as_batch(list(contexts))
        fwd = self.forward
        options = {**DEFAULT_SAMPLING, **hf_kwargs, "num_return_sequences": self.num_candidates}
        sampled = fwd.sample(
            batch, seed=seed, max_context_tokens=max_context_tokens,
            keep_first_turns=keep_first_turns, **options,
        )  # fmt: skip
        turn_ids, cand_ids = sampled.turn_ids, sampled.response_ids

        # Identical samples (common: a confident model repeats itself) are scored once
        # and kept once with their count; `choose` weighs them by it.
        k = self.num_candidates
        groups = [distinct(cand_ids[i * k : (i + 1) * k]) for i in range(len(batch))]
        rows, sources = [], []
        for turns, (unique, _) in zip(turn_ids, groups, strict=True):
            src = [turns[-1]] if self.source == "last" else list(reversed(turns))
            rows += unique
            sources += [src] * len(unique)
        scores = iter(score_candidates(self.reverse, rows, sources))

        results = []
        for context, (unique, counts) in zip(batch, groups, strict=True):
            cands = [
                Candidate(fwd.tokenizer.decode(ids), next(scores), ids, count)
                for ids, count in zip(unique, counts, strict=True)
            ]
            chosen = choose(
                [c.score for c in cands],
                [bool(c.text) for c in cands],
                [c.count for c in cands],
                temperature=self.temperature,
                argmax=self.argmax,
                generator=fwd.rng,  # None: torch's global RNG (the torch backend)
            )
            results.append(MMIResult(list(context), cands, chosen))
        return results
