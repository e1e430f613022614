from __future__ import annotations

import numpy as np
import pytest

from convcli.training.batching import BatchPlan, BucketBatchSampler, epoch_batches, padding_fraction

LENGTHS = np.random.default_rng(0).integers(5, 200, size=500)


def test_token_budget_is_respected_and_every_example_appears_once():
    plan = BatchPlan(batch_tokens=1000)
    batches = epoch_batches(LENGTHS, plan, seed=1, epoch=0)
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))
    assert all(LENGTHS[b].max() * len(b) <= 1000 for b in batches)


def test_overlong_example_gets_its_own_batch():
    lengths = np.array([10, 5000, 10])
    batches = epoch_batches(lengths, BatchPlan(batch_tokens=100), seed=0, epoch=0)
    assert [1] in batches and sorted(map(len, batches)) == [1, 2]


def test_fixed_batch_size():
    batches = epoch_batches(LENGTHS, BatchPlan(batch_size=8), seed=0, epoch=0)
    sizes = sorted(map(len, batches))
    assert sizes[1:] == [8] * (len(batches) - 1) and 1 <= sizes[0] <= 8  # one short batch
    assert sorted(i for b in batches for i in b) == list(range(len(LENGTHS)))


def test_bucketing_pads_far_less_than_random_batches():
    bucketed = epoch_batches(LENGTHS, BatchPlan(batch_tokens=2000), seed=0, epoch=0)
    random = epoch_batches(LENGTHS, BatchPlan(batch_tokens=2000, bucket=False), seed=0, epoch=0)
    assert padding_fraction(bucketed, LENGTHS) < 0.1 < padding_fraction(random, LENGTHS)


def test_order_is_deterministic_per_seed_and_epoch():
    plan = BatchPlan(batch_tokens=1000)
    assert epoch_batches(LENGTHS, plan, 3, 0) == epoch_batches(LENGTHS, plan, 3, 0)
    assert epoch_batches(LENGTHS, plan, 3, 0) != epoch_batches(LENGTHS, plan, 3, 1)
    assert epoch_batches(LENGTHS, plan, 3, 0) != epoch_batches(LENGTHS, plan, 4, 0)


@pytest.mark.parametrize("shuffle", [True, False])
def test_ranks_get_distinct_equal_shares(shuffle):
    plan = BatchPlan(batch_size=7)
    samplers = [
        BucketBatchSampler(LENGTHS[:100], plan, shuffle=shuffle, seed=0, rank=r, world_size=3)
        for r in range(3)
    ]
    shares = [list(s) for s in samplers]
    assert len({len(share) for share in shares}) == 1  # DDP needs equal step counts
    counted = [i for share in shares for batch in share for i, c in batch if c]
    if shuffle:  # training repeats a few batches to even out; all data is seen
        assert set(counted) == set(range(100))
    else:  # validation counts every example exactly once
        assert sorted(counted) == list(range(100))
    firsts = [share[0] for share in shares]
    assert len({tuple(first) for first in firsts}) == 3


def test_resume_mid_epoch_yields_exactly_the_rest():
    plan = BatchPlan(batch_tokens=800)
    full = BucketBatchSampler(LENGTHS, plan, seed=5)
    full.set_epoch(2)
    expected = list(full)
    resumed = BucketBatchSampler(LENGTHS, plan, seed=5)
    resumed.resume_at(2, 7)
    assert list(resumed) == expected[7:]
    assert len(list(resumed)) == len(expected)  # the skip applies to one pass only


def test_every_epoch_has_as_many_batches_as_lightning_counted():
    # Lightning reads len(sampler) once; an epoch with more batches would lose its tail.
    lengths = np.random.default_rng(0).integers(5, 300, size=3000)
    sampler = BucketBatchSampler(lengths, BatchPlan(batch_tokens=1024), seed=1)
    counted = len(sampler)
    for epoch in range(1, 6):
        sampler.set_epoch(epoch)
        batches = list(sampler)
        assert len(batches) == len(sampler) == counted
        assert sorted(i for b in batches for i, _ in b) == list(range(len(lengths)))
    assert list(sampler) != [b for b in BucketBatchSampler(lengths, BatchPlan(1024), seed=1)]
