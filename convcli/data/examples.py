"""Tokenized dialogues into training examples, with numpy: windows and the layout.

`lay_out` produces, for many dialogues at once, exactly what `convcli.tokenizer.layout`
produces for one, without Python work per token. A dialogue longer than `max_length`
becomes several examples of whole turns (`sliding_windows`).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from convcli.data.shards import SPLITS
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED

Arrays = tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]  # ids, types, mask, lengths


def sliding_windows(lengths: Sequence[int], max_length: int) -> list[tuple[int, int]]:
    """Cut a dialogue with turns of these token lengths into windows of whole turns.

    Returns (start, stop) turn ranges whose layouts fit in `max_length`; together they
    cover every turn as a new (trained) turn exactly once. Each window starts with as
    much earlier context as fits in half of `max_length`. Every turn must fit alone
    (length + 2 <= max_length).
    """
    n = len(lengths)
    if sum(lengths) + n + 1 <= max_length:
        return [(0, n)]
    windows = []
    new = 0  # the first turn no window has covered yet
    while new < n:
        start, cost, context = new, lengths[new] + 2, 0
        while start > 0:
            extra = lengths[start - 1] + 1
            if context + extra > max_length // 2 or cost + extra > max_length:
                break
            start, cost, context = start - 1, cost + extra, context + extra
        stop = new + 1
        while stop < n and cost + lengths[stop] + 1 <= max_length:
            cost += lengths[stop] + 1
            stop += 1
        windows.append((start, stop))
        new = stop
    return windows


def lay_out(
    ids: np.ndarray,
    turn_lengths: np.ndarray,
    turn_counts: np.ndarray,
    weighted: np.ndarray,
    valid: np.ndarray,
    *,
    responses: np.ndarray | None = None,
    sep: int,
    max_length: int,
    skip_long: bool,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, Arrays]]:
    """Lay out tokenized dialogues as examples, per split, with numpy (no work per token).

    `ids` are the token ids of all turns of all dialogues, one after the other, and
    `turn_lengths` the tokens of each turn; `turn_counts` the turns of each dialogue,
    `weighted` per turn (it has a non-zero weight), `valid` per dialogue, `responses` per
    turn (it is a reply; default: every turn but a dialogue's first). Each example
    is exactly `convcli.tokenizer.layout` of its turns; the loss flags of a window of a
    long dialogue mark only the turns no earlier window trained (see `sliding_windows`).

    Returns per dialogue: examples made, skipped for a long turn, turns truncated; and per
    split (ids, types, mask, example lengths).
    """
    dialogues = len(turn_counts)
    if not dialogues:
        empty = (ids, *(np.zeros(0, np.uint8),) * 2, np.zeros(0, np.int64))
        nothing = np.zeros(0, np.int64)
        return nothing, nothing.astype(bool), nothing, dict.fromkeys(SPLITS, empty)
    offsets = np.cumsum(turn_lengths) - turn_lengths  # where each turn starts in `ids`
    first = np.cumsum(turn_counts) - turn_counts  # each dialogue's first turn
    if responses is None:
        responses = np.ones(len(turn_lengths), dtype=bool)
        responses[first] = False
    limit = max_length - 2  # a turn alone: sep, tokens, sep
    over = turn_lengths > limit
    if skip_long:
        too_long = np.logical_or.reduceat(over, first)
        truncated = np.zeros(dialogues, np.int64)
        lengths = turn_lengths
    else:
        too_long = np.zeros(dialogues, bool)
        truncated = np.add.reduceat(over.astype(np.int64), first)
        lengths = np.minimum(turn_lengths, limit)  # a truncated turn keeps its start
    fits = np.add.reduceat(lengths, first) + turn_counts + 1 <= max_length

    # One example per dialogue that fits: all its turns, all trainable (new = its first turn).
    examples = np.where(too_long, 0, 1)
    windows: dict[int, list[tuple[int, int]]] = {}
    for d in np.flatnonzero(~fits & ~too_long).tolist():  # rare: Python is fine here
        start, stop = int(first[d]), int(first[d] + turn_counts[d])
        windows[d] = sliding_windows(lengths[start:stop].tolist(), max_length)
        examples[d] = len(windows[d])
    owner = np.repeat(np.arange(dialogues), examples)  # each example's dialogue
    start = first[owner]  # first turn of each example (global turn index)
    stop = start + turn_counts[owner]
    new = start.copy()  # its first turn that no earlier window trained
    at = np.cumsum(examples) - examples  # where each dialogue's examples start
    for d, cuts in windows.items():
        previous_stop = 0
        for k, (a, b) in enumerate(cuts):
            i = at[d] + k
            start[i], stop[i], new[i] = first[d] + a, first[d] + b, first[d] + previous_stop
            previous_stop = b

    arrays = {}
    for split in SPLITS:
        take = valid[owner] == (split == "valid")
        arrays[split] = _examples(
            start[take], stop[take], new[take],
            ids, offsets, lengths, weighted, responses, sep,
        )  # fmt: skip
    return examples, too_long, truncated, arrays


def _examples(
    start: np.ndarray,
    stop: np.ndarray,
    new: np.ndarray,
    flat: np.ndarray,
    offsets: np.ndarray,
    lengths: np.ndarray,
    weighted: np.ndarray,
    responses: np.ndarray,
    sep: int,
) -> Arrays:
    """The flat arrays of examples given as turn ranges [start, stop) (see `lay_out`).

    An example of turns t0..tn-1 is `sep t0 sep t1 ... sep`. Types: segment i (its sep
    and the tokens of t_i) has i % 2, the last sep n % 2. Flags: the first sep 0, the
    tokens of t_i and the sep after them the flags of t_i. So both are runs of values
    (`np.repeat`) over n + 1 segments per example.
    """
    n = stop - start
    ends = np.cumsum(n)  # per example, the end of its turns in the per-turn arrays below
    begins = ends - n
    pos = np.arange(int(ends[-1]) if len(ends) else 0) - np.repeat(begins, n)  # turn in example
    turn = np.repeat(start, n) + pos  # global turn index
    size = lengths[turn]
    flags = np.where(weighted[turn], LOSS_WEIGHTED, 0) | np.where(responses[turn], LOSS_RESPONSE, 0)
    flags[turn < np.repeat(new, n)] = 0  # trained in an earlier window: context here
    types = np.repeat(np.insert(pos % 2, ends, n % 2), np.insert(size + 1, ends, 1))
    mask = np.repeat(np.insert(flags, begins, 0), np.insert(size + 1, begins, 1))
    # ids: sep everywhere, then each turn's tokens after its sep.
    example_lengths = np.add.reduceat(size + 1, begins) + 1 if len(n) else np.zeros(0, np.int64)
    out = np.full(len(types), sep, flat.dtype)
    segment = np.cumsum(size + 1) - size - 1 + np.repeat(np.arange(len(n)), n)  # each turn's sep
    within = np.arange(int(size.sum())) - np.repeat(np.cumsum(size) - size, size)
    out[np.repeat(segment + 1, size) + within] = flat[np.repeat(offsets[turn], size) + within]
    return out, types.astype(np.uint8), mask.astype(np.uint8), example_lengths.astype(np.int64)
