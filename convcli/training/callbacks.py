"""Lightning callbacks of `convcli train`: checkpoints, reseeding, best/ export, early stop,
and progress on stderr (a bar on a terminal, a line every few seconds in a log file)."""

from __future__ import annotations

import contextlib
import re
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import EarlyStopping, TQDMProgressBar

from convcli.training.module import ConversationLM

_STEP_FILE = re.compile(r"step-(\d+)\.ckpt")


def step_checkpoints(directory: Path) -> list[tuple[int, Path]]:
    """The `step-N.ckpt` files of a run, oldest first."""
    return sorted(
        (int(m.group(1)), p)
        for p in directory.glob("step-*.ckpt")
        if (m := _STEP_FILE.fullmatch(p.name))
    )


class StepCheckpoints(pl.Callback):
    """Checkpoints (weights, optimizer, loops, data position) every N steps and at the end."""

    def __init__(self, directory: Path, every: int, keep: int) -> None:
        self.directory, self.every, self.keep = directory, every, keep
        self.last_saved = -1

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        step = trainer.global_step
        if step and step % self.every == 0 and step != self.last_saved:
            self.save(trainer)

    def on_train_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if trainer.global_step != self.last_saved:
            self.save(trainer)

    def save(self, trainer: pl.Trainer) -> None:
        step = trainer.global_step
        trainer.save_checkpoint(self.directory / f"step-{step:07d}.ckpt")
        self.last_saved = step
        if trainer.is_global_zero:
            for _, path in step_checkpoints(self.directory)[: -self.keep]:
                path.unlink(missing_ok=True)


class Reseed(pl.Callback):
    """Seed dropout from (seed, rank, batch number), so a resumed run draws the same masks."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        batch = trainer.fit_loop.epoch_loop.total_batch_idx + 1
        torch.manual_seed((self.seed * 1_000_003 + trainer.global_rank * 7919 + batch) % 2**62)


class BestFolder(pl.Callback):
    """Export `best/` whenever the validation loss improves, and remember the history.

    Runs on every rank: the export gathers sharded weights collectively (rank 0 writes).
    The validation loss is already reduced across ranks, so all ranks decide alike.
    """

    def __init__(self, export: Callable[[str, ConversationLM, pl.Trainer], Any]) -> None:
        self.export = export
        self.best: float | None = None
        self.best_step = -1
        self.last_val_step = -1
        self.history: list[tuple[int, float]] = []  # (step, validation loss)

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        assert isinstance(module, ConversationLM)
        if trainer.sanity_checking or module.val_loss is None:
            return
        step = trainer.global_step
        self.last_val_step = step
        if not self.history or self.history[-1][0] != step:
            self.history.append((step, module.val_loss))
        if self.best is None or module.val_loss < self.best:
            self.best, self.best_step = module.val_loss, step
            self.export("best", module, trainer)

    def validations_since_best(self) -> int:
        """How many validations after the best one (0: the last was the best)."""
        return sum(1 for step, _ in self.history if step > self.best_step)

    def state_dict(self) -> dict[str, Any]:
        return {"best": self.best, "best_step": self.best_step, "history": self.history}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.best = state.get("best")
        self.best_step = state.get("best_step", -1)
        self.history = [tuple(h) for h in state.get("history", [])]  # type: ignore[misc]


class EarlyStop(EarlyStopping):
    """Lightning's EarlyStopping on the validation loss, remembering the step it stopped at."""

    def __init__(self, patience: int) -> None:
        super().__init__(monitor="val_loss", patience=patience, mode="min", strict=False)
        self.stopped_step: int | None = None

    def on_validation_end(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        super().on_validation_end(trainer, module)
        if trainer.should_stop and self.wait_count >= self.patience and self.stopped_step is None:
            self.stopped_step = trainer.global_step


class StderrProgressBar(TQDMProgressBar):
    """Lightning's tqdm bar, on stderr: stdout is for model text."""

    def init_sanity_tqdm(self):  # type: ignore[no-untyped-def]
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_sanity_tqdm()

    def init_train_tqdm(self):  # type: ignore[no-untyped-def]
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_train_tqdm()

    def init_validation_tqdm(self):  # type: ignore[no-untyped-def]
        with contextlib.redirect_stdout(sys.stderr):
            return super().init_validation_tqdm()


class StderrProgressLines(pl.Callback):
    """Progress for a log file: one plain line every `interval` seconds, no bar frames.

    A redirected tqdm bar writes a frame (with carriage returns and escapes) per update;
    this writes `step 120/800 (15%), epoch 3, train_loss 2.314, val_loss 2.907, 1.2 s/step`.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self.interval = interval
        self.last = 0.0
        self.started = 0.0
        self.first_step = 0

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        self.started = self.last = time.monotonic()
        self.first_step = trainer.global_step

    def on_train_batch_end(self, trainer: pl.Trainer, *args: Any) -> None:
        now = time.monotonic()
        if now - self.last < self.interval or not trainer.is_global_zero:
            return
        self.last = now
        step, total = trainer.global_step, trainer.max_steps
        parts = [f"step {step}/{total} ({step / total:.0%})" if total > 0 else f"step {step}"]
        parts.append(f"epoch {trainer.current_epoch}")
        metrics = trainer.callback_metrics
        parts += [
            f"{k} {float(metrics[k]):.3f}" for k in ("train_loss", "val_loss") if k in metrics
        ]
        if step > self.first_step:
            parts.append(f"{(now - self.started) / (step - self.first_step):.2f} s/step")
        print(", ".join(parts), file=sys.stderr, flush=True)
