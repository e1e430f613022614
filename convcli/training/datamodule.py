"""The shard reader as a LightningDataModule: examples -> labels -> padded batches.

Nothing is loaded up front: a batch reads its examples from the memory-mapped shards.
Reversal (for MMI reverse models) and truncation to the model's context re-lay an
example on the fly from its turns; the loss flags stored with the example say which
labels to keep (`--train-on`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from itertools import pairwise
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from convcli.data.shards import Shards, ShardSplit
from convcli.tokenizer import LOSS_RESPONSE, LOSS_WEIGHTED, layout, truncate_turns
from convcli.training.batching import BatchPlan, BucketBatchSampler

IGNORE = -100  # the label value Hugging Face and cross_entropy skip


def relayout(
    ids: np.ndarray,
    flags: np.ndarray,
    sep_id: int,
    *,
    reverse: bool = False,
    max_length: int | None = None,
) -> tuple[list[int], list[int], list[int]]:
    """Re-lay an example's turns: reversed and/or cut to `max_length` by whole oldest turns.

    A turn's weight and reply flags are read from the sep that closes it (that sep carries
    the turn's own flags in `layout`), so they follow their turns.
    """
    seps = np.flatnonzero(ids == sep_id)
    turns = [ids[a + 1 : b].tolist() for a, b in pairwise(seps)]
    weighted = [bool(flags[b] & LOSS_WEIGHTED) for b in seps[1:]]
    # Which turns are replies, as prepare marked them (by role: the assistant's; turns an
    # earlier window trained: none). Reversed, a reply is any turn but the first, as ever.
    replies: list[bool] | None = [bool(flags[b] & LOSS_RESPONSE) for b in seps[1:]]
    if reverse:
        turns.reverse()
        weighted.reverse()
        replies = None
    if max_length is not None and len(ids) > max_length:
        turns = truncate_turns(turns, max_length)
        weighted = weighted[len(weighted) - len(turns) :]
        if replies is not None:  # the first turn left has no context: no reply
            replies = [False, *replies[len(replies) - len(turns) + 1 :]][: len(turns)]
    return layout(turns, sep_id, weighted, replies)


def select_labels(ids: np.ndarray, flags: np.ndarray, train_on: str) -> np.ndarray:
    """Labels aligned with `ids`: the token where it carries loss, else -100."""
    if train_on == "all":
        keep = np.ones(len(ids), dtype=bool)
    elif train_on == "responses":
        keep = (flags & LOSS_RESPONSE) != 0
    elif train_on == "weights":
        keep = (flags & LOSS_WEIGHTED) != 0
    else:
        raise ValueError(f"unknown train_on {train_on!r}")
    labels = np.where(keep, ids.astype(np.int64), IGNORE)
    labels[:1] = IGNORE  # nothing predicts the first token
    return labels


class TrainingExamples(Dataset):
    """Examples of one shard split as model inputs; indexed by (index, counted) pairs."""

    def __init__(
        self,
        path: Path,
        split: str,
        sep_id: int,
        *,
        train_on: str = "responses",
        reverse: bool = False,
        max_length: int | None = None,
    ) -> None:
        self.path, self.split_name, self.sep_id = Path(path), split, sep_id
        self.train_on, self.reverse, self.max_length = train_on, reverse, max_length
        self._split: ShardSplit | None = None

    @property
    def split(self) -> ShardSplit:
        if self._split is None:  # reopened lazily in each DataLoader worker
            self._split = Shards(self.path).split(self.split_name)
        return self._split

    def __getstate__(self) -> dict[str, Any]:
        # Workers reopen the memory maps instead of receiving a pickled copy of the data.
        return {**self.__dict__, "_split": None}

    def __len__(self) -> int:
        return len(self.split)

    def lengths(self) -> np.ndarray:
        """Token lengths as batched (truncation caps them at `max_length`)."""
        lengths = self.split.lengths()
        return np.minimum(lengths, self.max_length) if self.max_length else lengths

    def __getitem__(self, key: tuple[int, bool]) -> dict[str, np.ndarray]:
        index, counted = key
        example = self.split[index]
        ids, types, flags = example.ids, example.types, example.mask
        if self.reverse or (self.max_length and len(ids) > self.max_length):
            laid = relayout(
                np.asarray(ids), np.asarray(flags), self.sep_id,
                reverse=self.reverse, max_length=self.max_length,
            )  # fmt: skip
            ids, types, flags = (np.asarray(a) for a in laid)
        ids = np.asarray(ids, dtype=np.int64)
        labels = select_labels(ids, np.asarray(flags), self.train_on)
        if not counted:
            labels[:] = IGNORE
        return {"input_ids": ids, "token_type_ids": np.asarray(types, np.int64), "labels": labels}


class Collate:
    """Pad a list of examples to the longest one (dynamic padding)."""

    def __init__(self, pad_id: int, token_types: bool) -> None:
        self.pad_id, self.token_types = pad_id, token_types

    def __call__(self, items: Sequence[dict[str, np.ndarray]]) -> dict[str, torch.Tensor]:
        width = max(len(item["input_ids"]) for item in items)
        shape = (len(items), width)
        ids = torch.full(shape, self.pad_id, dtype=torch.long)
        types = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE, dtype=torch.long)
        attention = torch.zeros(shape, dtype=torch.long)
        for row, item in enumerate(items):
            n = len(item["input_ids"])
            ids[row, :n] = torch.from_numpy(item["input_ids"])
            types[row, :n] = torch.from_numpy(item["token_type_ids"])
            labels[row, :n] = torch.from_numpy(item["labels"])
            attention[row, :n] = 1
        batch = {"input_ids": ids, "attention_mask": attention, "labels": labels}
        if self.token_types:
            batch["token_type_ids"] = types
        return batch


class ResumableLoader(DataLoader):
    """A DataLoader whose position within the epoch is saved in Lightning checkpoints.

    Lightning stores `state_dict()` of stateful loaders in the checkpoint and calls
    `load_state_dict` before iterating on resume; the sampler then skips what was trained.
    """

    def __init__(self, *args: Any, batches_done: Callable[[], int], **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._batches_done = batches_done

    def state_dict(self) -> dict[str, int]:
        sampler: BucketBatchSampler = self.batch_sampler  # type: ignore[assignment]
        return {"epoch": sampler.epoch, "batches_done": self._batches_done()}

    def load_state_dict(self, state: dict[str, int]) -> None:
        sampler: BucketBatchSampler = self.batch_sampler  # type: ignore[assignment]
        sampler.resume_at(state["epoch"], state["batches_done"])


class ConversationData(pl.LightningDataModule):
    """Training and validation batches from a shard directory, this rank's share."""

    def __init__(
        self,
        path: Path,
        *,
        sep_id: int,
        pad_id: int,
        plan: BatchPlan,
        train_on: str = "responses",
        reverse: bool = False,
        max_length: int | None = None,
        token_types: bool = True,
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.plan, self.seed, self.num_workers = plan, seed, num_workers
        self.collate = Collate(pad_id, token_types)
        options = {"train_on": train_on, "reverse": reverse, "max_length": max_length}
        self.train = TrainingExamples(path, "train", sep_id, **options)
        shards = Shards(path)
        self.valid = (
            TrainingExamples(path, "valid", sep_id, **options)
            if "valid" in shards.manifest["splits"] and len(shards.split("valid"))
            else None
        )

    def _rank(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        return (trainer.global_rank, trainer.world_size) if trainer else (0, 1)

    def sampler(self, split: str) -> BucketBatchSampler:
        """The batch sampler of a split, for this rank."""
        dataset = self.train if split == "train" else self.valid
        assert dataset is not None
        rank, world = self._rank()
        return BucketBatchSampler(
            dataset.lengths(), self.plan, shuffle=split == "train",
            seed=self.seed, rank=rank, world_size=world,
        )  # fmt: skip

    def train_dataloader(self) -> DataLoader:
        return ResumableLoader(
            self.train,
            batch_sampler=self.sampler("train"),
            collate_fn=self.collate,
            num_workers=self.num_workers,
            batches_done=self._batches_done,
        )

    def val_dataloader(self) -> DataLoader | list:
        if self.valid is None:
            return []
        return DataLoader(
            self.valid,
            batch_sampler=self.sampler("valid"),
            collate_fn=self.collate,
            num_workers=self.num_workers,
        )

    def _batches_done(self) -> int:
        return self.trainer.fit_loop.epoch_loop.batch_progress.current.processed
