"""Length-bucketed batches with dynamic padding, deterministic and resumable.

Examples of similar length are batched together so little compute goes to padding:
each epoch the examples are sorted by length, ties in a random order (seed + epoch),
packed greedily against the token budget (longest example x count <= `batch_tokens`)
or a fixed count, and the batches shuffled. Packing only sees the sorted lengths, so
every epoch has the same number of batches: Lightning counts an epoch's batches once
(and the learning-rate schedule from that count), so a later epoch with more batches
would silently lose its last ones. Batches still mix differently each epoch among
examples of equal length. Every rank sees a distinct, equally long share of the batches.
A sampler can start mid-epoch (`resume_at`), so a resumed run sees exactly the data
an uninterrupted one would.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

# A batch is a list of (example index, counted) pairs. `counted` is False only for the
# filler batches that even out validation across ranks: they run but add no loss.
Batch = list[tuple[int, bool]]


@dataclass(frozen=True)
class BatchPlan:
    """How to cut batches: a token budget or a fixed size, and whether to sort by length."""

    batch_tokens: int | None = 4096
    batch_size: int | None = None
    bucket: bool = True


def pack(order: Sequence[int], lengths: np.ndarray, plan: BatchPlan) -> list[list[int]]:
    """Greedily cut `order` into batches that fit the plan (an overlong example goes alone)."""
    batches: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for index in order:
        size = int(lengths[index])
        width = max(longest, size)
        full = (
            len(current) >= plan.batch_size
            if plan.batch_size
            else width * (len(current) + 1) > (plan.batch_tokens or 0)
        )
        if current and full:
            batches.append(current)
            current, width = [], size
        current.append(int(index))
        longest = width
    if current:
        batches.append(current)
    return batches


def epoch_batches(
    lengths: np.ndarray, plan: BatchPlan, seed: int, epoch: int | None
) -> list[list[int]]:
    """All batches of one epoch. `epoch=None`: no shuffling (validation), sorted by length."""
    n = len(lengths)
    if epoch is None:
        order = np.argsort(lengths, kind="stable") if plan.bucket else np.arange(n)
        return pack(order, lengths, plan)
    rng = np.random.default_rng([seed, epoch])
    # By length with ties shuffled; unbucketed (benchmarks only), the batch count varies.
    order = np.lexsort((rng.random(n), lengths)) if plan.bucket else rng.permutation(n)
    batches = pack(order, lengths, plan)
    return [batches[i] for i in rng.permutation(len(batches))]


def padding_fraction(batches: Sequence[Sequence[int]], lengths: np.ndarray) -> float:
    """Share of the padded batch tensors that is padding."""
    real = sum(int(lengths[b].sum()) for b in batches)
    padded = sum(int(lengths[b].max()) * len(b) for b in batches if len(b))
    return 1.0 - real / padded if padded else 0.0


class BucketBatchSampler:
    """A `batch_sampler` for DataLoader: bucketed batches, this rank's share, resumable.

    `shuffle=False` gives the fixed validation order; ranks then get filler batches
    (uncounted) instead of repeated data, so every example is counted exactly once.
    """

    def __init__(
        self,
        lengths: np.ndarray,
        plan: BatchPlan,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        self.lengths = np.asarray(lengths)
        self.plan, self.shuffle, self.seed = plan, shuffle, seed
        self.rank, self.world_size = rank, world_size
        self.epoch = 0
        self._resume: tuple[int, int] | None = None  # (epoch, batches of it already done)
        self._cache: tuple[int, list[Batch]] | None = None

    # Lightning calls `set_epoch` on `batch_sampler.sampler`, so point that at ourselves.
    @property
    def sampler(self) -> BucketBatchSampler:
        return self

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def resume_at(self, epoch: int, batches_done: int) -> None:
        """Make the next pass over `epoch` skip the batches an earlier run already trained on."""
        self.epoch = epoch
        self._resume = (epoch, batches_done)

    def all_batches(self, epoch: int = 0) -> list[list[int]]:
        """Every batch of the epoch, all ranks together."""
        return epoch_batches(self.lengths, self.plan, self.seed, epoch if self.shuffle else None)

    def _rank_batches(self, epoch: int) -> list[Batch]:
        if self._cache is None or self._cache[0] != epoch:
            self._cache = (epoch, self._split(self.all_batches(epoch)))
        return self._cache[1]

    def _split(self, batches: list[list[int]]) -> list[Batch]:
        if self.world_size > 1 and batches:
            # Equal batch counts on every rank, or DDP waits forever for the short ones.
            short = -len(batches) % self.world_size
            filler = [(b, self.shuffle) for b in batches[:short]]
            tagged = [(b, True) for b in batches] + filler
            chosen = tagged[self.rank :: self.world_size]
        else:
            chosen = [(b, True) for b in batches]
        return [[(i, counted) for i in b] for b, counted in chosen]

    def __len__(self) -> int:
        return len(self._rank_batches(self.epoch))

    def __iter__(self) -> Iterator[Batch]:
        batches = self._rank_batches(self.epoch)
        skip = 0
        if self._resume is not None and self._resume[0] == self.epoch:
            skip = self._resume[1]
            self._resume = None
        yield from batches[skip:]
