"""Answer several requests at once: one batched decoding loop over all their rows.

What a server needs and `ConversationModel.generate` does not give: every request (a
`RowRequest`) brings its own sampling settings, seed, stop strings, token callback and
cancellation flag, and `generate_rows` answers all of them with ONE prefill and one
decoding loop whose batch holds every row (a request with `n=2`, or with MMI over 8
candidates, owns 2 or 8 rows).

- Seeds: each request samples with its own `torch.Generator`, never the global RNG, so a
  seeded request gets the same reply whatever else shares its batch. The only caveat is
  float rounding: a different batch shape (other requests' padding) can change a logit in
  its last bits, which flips a draw only when it lands within that rounding of a boundary.
- Rows leave the batch as soon as they end (their sep, a stop string, their length cap,
  or their request's `cancelled` event): a finished or abandoned row stops costing
  compute, and the loop ends when no row is left.
- Stop strings: the reply ends before the first stop string, which is left out, and the
  choice's `finish_reason` is "stop"; "length" means the token cap cut it.
- Streaming: `on_text(choice, delta)` receives text as it is generated (held back while
  it could still be the start of a stop string, a split UTF-8 character or trailing
  whitespace), and the deltas join to exactly the final text. MMI replies are known only
  once reranked, so they arrive in one piece.
- Conversations come as turns; `keep_first` opening turns (a persona, the system
  message) are kept through truncation, which drops whole oldest turns (`fit_turns`).
"""

from __future__ import annotations

import random
import secrets
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from convcli.errors import ConvcliError, UsageError
from convcli.inference.mmi import Candidate, choose, distinct, score_candidates

if TYPE_CHECKING:
    import torch

    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

    Generator = torch.Generator | random.Random

FinishReason = Literal["stop", "length", "cancelled"]


@dataclass
class MMIOptions:
    """How one request's reply is reranked by the reverse model."""

    num_candidates: int = 8
    temperature: float = 0.5
    argmax: bool = False


@dataclass
class RowRequest:
    """One request: a conversation and how to answer it."""

    turns: list[str]
    """The conversation, oldest turn first; the reply answers the last one."""
    keep_first: int = 0
    """Leading turns always kept when old turns are dropped (persona, system message)."""
    n: int = 1
    """Replies wanted (each its own row; with MMI, each reranked from its own candidates)."""
    max_new_tokens: int | None = None
    """Token cap of a reply (default 64, capped to fit the model)."""
    max_context_tokens: int | None = None
    """Tighter budget for the conversation than what fits the model."""
    do_sample: bool = True
    """Sample (False: greedy). MMI candidates are always sampled."""
    temperature: float = 1.0
    """Sampling temperature; 0 means greedy."""
    top_k: int = 0
    """Sample among the k likeliest tokens (0: all)."""
    top_p: float = 1.0
    """Sample among the likeliest tokens holding this much probability."""
    seed: int | None = None
    """Seed of this request's own generator (None: a random one)."""
    stop: list[str] = field(default_factory=list)
    """Strings that end a reply (left out of it)."""
    mmi: MMIOptions | None = None
    """Rerank with the reverse model (needs one)."""
    on_start: Callable[[], None] | None = None
    """Called once the request is accepted, before decoding starts (not on an error)."""
    on_text: Callable[[int, str], None] | None = None
    """Called with (choice index, new text) as text becomes final."""
    cancelled: threading.Event | None = None
    """Set it to stop decoding this request's rows (a client went away)."""


@dataclass
class Choice:
    """One reply."""

    text: str
    finish_reason: FinishReason
    tokens: int
    """Tokens of the reply as generated (up to its end or its stop string)."""
    candidates: list[Candidate] = field(default_factory=list)
    """With MMI: every candidate with its score."""
    chosen: int = 0
    """With MMI: the index of the reply in `candidates`."""


@dataclass
class RowResult:
    """What one request got: its choices, its token counts, or its own error."""

    choices: list[Choice] = field(default_factory=list)
    prompt_tokens: int = 0
    """Tokens of the conversation actually fed to the model (after truncation)."""
    completion_tokens: int = 0
    """Tokens generated for it (with MMI: every candidate's)."""
    error: ConvcliError | None = None


class _Text:
    """The text of one row so far: cut at a stop string, with what may change held back."""

    def __init__(self, decode: Callable[[list[int]], str], stop: Sequence[str]) -> None:
        self.decode, self.stop = decode, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = ""
        self.stopped = False

    def add(self, token: int) -> None:
        self.ids.append(token)
        if self.stop and self.stop_at(self.current()) is not None:
            self.stopped = True

    def current(self) -> str:
        return self.decode(self.ids).lstrip()

    def stop_at(self, text: str) -> int | None:
        hits = [i for i in (text.find(s) for s in self.stop) if i >= 0]
        return min(hits) if hits else None

    def final(self) -> str:
        text = self.current()
        cut = self.stop_at(text)
        return (text if cut is None else text[:cut]).rstrip()

    def delta(self) -> str:
        """New text that can no longer change (None of it is sent twice)."""
        text = self.current()
        cut = self.stop_at(text)
        if cut is not None:
            text = text[:cut]
        else:
            # Hold back a tail that could start a stop string...
            hold = max(
                (
                    k
                    for s in self.stop
                    for k in range(1, min(len(s), len(text) + 1))
                    if text.endswith(s[:k])
                ),
                default=0,
            )
            text = text[: len(text) - hold]
        # ...a split UTF-8 character, and trailing whitespace (the final text is stripped).
        text = text.rstrip("\ufffd").rstrip()
        if len(text) <= len(self.sent) or not text.startswith(self.sent):
            return ""
        new, self.sent = text[len(self.sent) :], text
        return new


@dataclass
class _Row:
    request: int
    choice: int
    context: int
    """Index of its (unique) context in the prefill batch."""
    max_new: int
    text: _Text
    finish: FinishReason | None = None


def _plan(
    model: ConversationModel, req: RowRequest, reranker: MMIReranker | None
) -> tuple[list[list[int]], int]:
    """(the request's turns as fitted token ids, its max_new_tokens); raises for a bad one."""
    if not req.turns or not all(isinstance(t, str) for t in req.turns):
        raise UsageError("`messages` must hold at least one turn of text", param="messages")
    if req.mmi is not None:
        if reranker is None:
            raise UsageError("`mmi` needs a reverse model, and this one has none", param="mmi")
        if req.mmi.num_candidates < 1:
            raise UsageError("`num_candidates` must be at least 1", param="num_candidates")
        if not req.mmi.argmax and req.mmi.temperature <= 0:
            raise UsageError("the MMI `temperature` must be positive", param="temperature")
    max_new, budget = model.plan_lengths(req.max_new_tokens)
    if req.max_context_tokens is not None:
        budget = min(budget, req.max_context_tokens)
    return model.encode_contexts([req.turns], budget, req.keep_first)[0], max_new


def generate_rows(
    model: ConversationModel,
    requests: Sequence[RowRequest],
    reranker: MMIReranker | None = None,
) -> list[RowResult]:
    """Answer every request in one batched decoding loop; one `RowResult` per request.

    A request that cannot be answered (empty turns, MMI without a reverse model, opening
    turns that leave no room) gets its own `error`; the others are answered anyway.
    """
    results = [RowResult() for _ in requests]
    contexts: list[list[list[int]]] = []
    context_of: dict[int, int] = {}
    rows: list[_Row] = []
    generators: dict[int, Generator] = {}
    decode = model.tokenizer.tokenizer.decode

    def text_of(ids: list[int]) -> str:
        return decode(ids, skip_special_tokens=True)

    for r, req in enumerate(requests):
        try:
            turn_ids, max_new = _plan(model, req, reranker)
        except ConvcliError as exc:
            results[r].error = exc
            continue
        results[r].prompt_tokens = sum(len(t) + 1 for t in turn_ids) + 1
        if req.on_start is not None:
            req.on_start()
        generators[r] = _generator(model, req.seed)
        contexts.append(turn_ids)
        context_of[r] = len(contexts) - 1
        per_choice = req.mmi.num_candidates if req.mmi else 1
        for c in range(req.n * per_choice):
            rows.append(_Row(r, c, len(contexts) - 1, max_new, _Text(text_of, req.stop)))
    if rows:
        decode_rows = _decode if model.engine is None else _decode_engine
        decode_rows(model, requests, contexts, rows, generators)
    for r, req in enumerate(requests):
        if results[r].error is None:
            turn_ids = contexts[context_of[r]]
            _collect(reranker, req, r, turn_ids, rows, generators[r], results[r])
    return results


def _decode(
    model: ConversationModel,
    requests: Sequence[RowRequest],
    contexts: list[list[list[int]]],
    rows: list[_Row],
    generators: dict[int, torch.Generator],
) -> None:
    """The loop: prefill each context once, then one token per live row per step."""
    import torch

    tensors = model.batch_tensors(contexts)
    mask = tensors["attention_mask"]
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    stops = model.reply_stop_ids()
    device = model.device
    with torch.inference_mode():
        out = model.model(**tensors, position_ids=positions, use_cache=True, logits_to_keep=1)
        cache = out.cache
        # Each row continues its context's cache (n rows of one context: one prefill).
        index = torch.tensor([row.context for row in rows], device=device)
        cache.batch_select_indices(index)
        logits = out.logits[index, -1]
        mask = mask[index]
        next_pos = positions[index, -1] + 1
        types = tensors.get("token_type_ids")
        next_type = types[index, -1:] if types is not None else None
        live = list(range(len(rows)))  # rows[live[i]] is batch row i
        while live:
            tokens = _pick(logits, [rows[i] for i in live], requests, generators).tolist()
            keep = [
                b for b, (i, token) in enumerate(zip(live, tokens, strict=True))
                if not _take(rows[i], requests[rows[i].request], token, stops)
            ]  # fmt: skip
            if not keep:
                break
            if len(keep) < len(live):
                sel = torch.tensor(keep, device=device)
                cache.batch_select_indices(sel)
                mask, next_pos = mask[sel], next_pos[sel]
                next_type = next_type[sel] if next_type is not None else None
                tokens = [tokens[b] for b in keep]
                live = [live[b] for b in keep]
            mask = torch.cat([mask, mask.new_ones(len(live), 1)], dim=1)
            inputs = {"input_ids": torch.tensor(tokens, device=device).unsqueeze(1)}
            if next_type is not None:
                inputs["token_type_ids"] = next_type
            out = model.model(
                **inputs, attention_mask=mask, position_ids=next_pos.unsqueeze(1),
                cache=cache, use_cache=True,
            )  # fmt: skip
            cache, logits = out.cache, out.logits[:, -1]
            next_pos = next_pos + 1


def _take(row: _Row, req: RowRequest, token: int, stops: set[int]) -> bool:
    """Give a row its next token (streaming what became final); True once the row has
    ended: its request cancelled, its stop token or a stop string, its length cap."""
    if req.cancelled is not None and req.cancelled.is_set():
        row.finish = "cancelled"
        return True
    if token in stops:
        row.finish = "stop"
    else:
        row.text.add(token)
        if row.text.stopped:
            row.finish = "stop"
        elif len(row.text.ids) >= row.max_new:
            row.finish = "length"
    if req.on_text is not None and req.mmi is None and row.finish is None:
        delta = row.text.delta()
        if delta:
            req.on_text(row.choice, delta)
    return row.finish is not None


def _generator(model: ConversationModel, seed: int | None) -> Generator:
    """A request's own random generator: torch's on the torch backend (it samples the
    tokens and MMI's choice), Python's on an engine (MMI's choice; no torch to import)."""
    seed = seed if seed is not None else secrets.randbits(63)
    if model.engine is not None:
        return random.Random(seed)
    import torch

    generator = torch.Generator(device=model.device)
    generator.manual_seed(seed)
    return generator


def _decode_engine(
    model: ConversationModel,
    requests: Sequence[RowRequest],
    contexts: list[list[list[int]]],
    rows: list[_Row],
    generators: dict[int, Generator],
) -> None:
    """The rows through the CTranslate2 engine, heard token by token as in `_decode`.

    CTranslate2 takes one set of sampling options per call and seeds by reloading, so
    unseeded rows that share their options (and length cap) go in one call, and a seeded
    request gets a call of its own after a reseed (the same reply whatever else runs).
    Each row is its own batch item, so it ends on its own: its sep, a stop string, its
    cap, or its request's cancel.
    """
    from convcli.tokenizer import layout

    assert model.engine is not None
    stops = model.reply_stop_ids()
    calls: dict[tuple[tuple[object, ...], int, int | None], list[_Row]] = {}
    for row in rows:
        req = requests[row.request]
        options: tuple[object, ...] = (False,)
        if req.mmi is not None or (req.do_sample and req.temperature > 0):
            options = (True, req.top_k, req.top_p, req.temperature if req.temperature > 0 else 1.0)
        seeded = row.request if options[0] and req.seed is not None else None
        calls.setdefault((options, row.max_new, seeded), []).append(row)
    prompts: dict[int, tuple[list[int], list[int] | None]] = {}
    for (options, max_new, seeded), members in calls.items():
        for row in members:
            if row.context not in prompts:
                ids, types, _ = layout(contexts[row.context], model.sep_token_id)
                prompts[row.context] = (ids, types if model.meta.token_types else None)
        seed = requests[seeded].seed if seeded is not None else None
        if seed is not None:
            model.engine.reseed(seed)
        sampling: dict[str, object] = {"do_sample": False}
        if options[0]:
            _, top_k, top_p, temperature = options
            sampling = {"do_sample": True, "top_k": top_k, "top_p": top_p,
                        "temperature": temperature}  # fmt: skip

        def on_token(b: int, token: int, members: list[_Row] = members) -> bool:
            row = members[b]
            return row.finish is not None or _take(row, requests[row.request], token, stops)

        model.engine.generate(
            [prompts[row.context] for row in members], max_new, sorted(stops),
            on_token=on_token, **sampling,
        )  # fmt: skip
        for row in members:  # ended by its stop token before the callback saw it, or the cap
            if row.finish is None:
                row.finish = "length" if len(row.text.ids) >= row.max_new else "stop"


def _pick(
    logits: torch.Tensor,
    rows: list[_Row],
    requests: Sequence[RowRequest],
    generators: dict[int, torch.Generator],
) -> torch.Tensor:
    """The next token of each row: greedy, or drawn by its request's generator after
    temperature, top-k and top-p (transformers' order)."""
    import torch

    logits = logits.float()
    picked = logits.argmax(-1)
    sampled = [
        b for b, row in enumerate(rows)
        if requests[row.request].mmi is not None
        or (requests[row.request].do_sample and requests[row.request].temperature > 0)
    ]  # fmt: skip
    if not sampled:
        return picked
    idx = torch.tensor(sampled, device=logits.device)
    reqs = [requests[rows[b].request] for b in sampled]
    temps = [r.temperature if r.temperature > 0 else 1.0 for r in reqs]
    scores = logits[idx] / torch.tensor(temps, device=logits.device).unsqueeze(1)
    vocab = scores.shape[-1]
    dev = logits.device
    ks = [r.top_k if 0 < r.top_k < vocab else vocab for r in reqs]
    width = max(ks)
    # Only the likeliest `width` tokens can be drawn: top-k needs no full sort, and with
    # neither top-k nor top-p the whole distribution is drawn from as it is.
    if width < vocab:
        ordered, order = scores.topk(width, dim=-1)
    elif any(r.top_p < 1 for r in reqs) or any(k < vocab for k in ks):
        # A request without top-k (k = vocab) shares the batch with one that has it.
        ordered, order = scores.sort(dim=-1, descending=True)
    else:
        ordered, order = scores, None
    if order is not None:
        ranks = torch.arange(width, device=dev).unsqueeze(0)
        drop = ranks >= torch.tensor(ks, device=dev).unsqueeze(1)
        ps = torch.tensor([r.top_p for r in reqs], device=dev).unsqueeze(1)
        probs = ordered.masked_fill(drop, float("-inf")).softmax(-1)
        before = probs.cumsum(-1) - probs  # probability held by the likelier tokens
        drop |= (before >= ps) & (ranks > 0)
        ordered = ordered.masked_fill(drop, float("-inf"))
    probs = ordered.softmax(-1)
    # Each request draws for its own rows with its own generator, always in the same order.
    by_request: dict[int, list[int]] = {}
    for j, b in enumerate(sampled):
        by_request.setdefault(rows[b].request, []).append(j)
    for r, js in by_request.items():
        sel = torch.tensor(js, device=logits.device)
        draw = torch.multinomial(probs[sel], 1, generator=generators[r])
        picked[idx[sel]] = (draw if order is None else order[sel].gather(1, draw)).squeeze(1)
    return picked


def _collect(
    reranker: MMIReranker | None,
    req: RowRequest,
    r: int,
    turn_ids: list[list[int]],
    rows: list[_Row],
    generator: Generator,
    result: RowResult,
) -> None:
    """Fill a request's result from its finished rows (reranking MMI candidates)."""
    mine = [row for row in rows if row.request == r]
    result.completion_tokens = sum(len(row.text.ids) for row in mine)
    if req.mmi is None:
        for row in mine:
            choice = Choice(row.text.final(), row.finish or "length", len(row.text.ids))
            result.choices.append(choice)
            if req.on_text is not None and row.finish != "cancelled":
                rest = choice.text[len(row.text.sent) :]
                if rest:
                    req.on_text(row.choice, rest)
        return
    assert reranker is not None
    if any(row.finish == "cancelled" for row in mine):
        result.choices = [Choice("", "cancelled", 0) for _ in range(req.n)]
        return
    k = req.mmi.num_candidates
    source = [turn_ids[-1]] if reranker.source == "last" else list(reversed(turn_ids))
    # Identical candidates are scored once and listed once with their count, as in
    # MMIReranker (the choice weighs them by it: the same distribution).
    groups = [distinct([row.text.ids for row in mine[c * k : (c + 1) * k]]) for c in range(req.n)]
    unique = [ids for ids, _ in groups for ids in ids]
    scores = iter(score_candidates(reranker.reverse, unique, [source] * len(unique)))
    for c, (ids_list, counts) in enumerate(groups):
        group = mine[c * k : (c + 1) * k]
        cands = []
        for ids, count in zip(ids_list, counts, strict=True):
            row = next(r for r in group if r.text.ids == ids)
            cands.append(Candidate(row.text.final(), next(scores), ids, count))
        chosen = choose(
            [x.score for x in cands],
            [bool(x.text) for x in cands],
            [x.count for x in cands],
            temperature=req.mmi.temperature,
            argmax=req.mmi.argmax,
            generator=generator,
        )
        row = next(r for r in group if r.text.ids == cands[chosen].token_ids)
        choice = Choice(
            cands[chosen].text, row.finish or "length", len(row.text.ids), cands, chosen
        )
        result.choices.append(choice)
        if req.on_text is not None and choice.text:
            req.on_text(c, choice.text)
