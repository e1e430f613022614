"""Stopping a run on SIGTERM or Ctrl-C without losing it.

The first signal asks the run to stop: at the end of the optimizer step under way a
checkpoint is saved (so `--resume auto` continues from there, not from the last
`save_every`), and the run stops with exit code 128 + the signal (143, 130). A second
signal aborts at once, saving nothing more. Under several processes, the ranks agree at
each step end (any rank signalled stops them all), so the save stays collective.
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

import pytorch_lightning as pl

from convcli.training.callbacks import StepCheckpoints

NAMES = {signal.SIGINT: "Ctrl-C", signal.SIGTERM: "SIGTERM"}


class Stopped(Exception):
    """Raised inside `trainer.fit` to end it after a signal (Lightning tears down and
    re-raises it)."""

    def __init__(self, signum: int, step: int, saved: Path | None) -> None:
        super().__init__(signum, step, saved)
        self.signum, self.step, self.saved = signum, step, saved

    def message(self) -> str:
        name = NAMES.get(signal.Signals(self.signum), f"signal {self.signum}")
        if self.saved is None:
            return f"aborted by a second {name}; nothing saved since the last checkpoint"
        return (
            f"stopped by {name} at step {self.step}; saved {self.saved}: continue with "
            "`resume` auto"
        )


def fresh_line() -> str:
    """A newline when stderr is a terminal, where a progress bar holds the current line
    (in a log file, progress comes as whole lines)."""
    return "\n" if sys.stderr.isatty() else ""


class SaveOnSignal(pl.Callback):
    """On SIGTERM/SIGINT: save a checkpoint at the end of the current step, then stop.

    Put it after `StepCheckpoints` in the callbacks, which it saves through, and call
    `restore` once fit has ended (Lightning skips `teardown` hooks when fit raises).
    """

    def __init__(self, checkpoints: StepCheckpoints) -> None:
        self.checkpoints = checkpoints
        self.signum: int | None = None
        # The handlers before fit (Lightning adds its own during fit, and removes them).
        self.previous: dict[int, Any] = {s: signal.getsignal(s) for s in NAMES}
        self.owner = 0  # the process that installed ours

    def on_train_start(self, trainer: pl.Trainer, module: pl.LightningModule) -> None:
        if threading.current_thread() is threading.main_thread():
            self.owner = os.getpid()
            for signum in NAMES:
                signal.signal(signum, self._handle)

    def restore(self) -> None:
        """Put the handlers of before fit back (after fit, however it ended)."""
        if self.owner == os.getpid():
            for signum, handler in self.previous.items():
                signal.signal(signum, handler)
            self.owner = 0

    def _handle(self, signum: int, frame: Any) -> None:
        if self.owner and os.getpid() != self.owner:  # a forked worker inherited it: as usual
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
            return
        if self.signum is not None:  # a second signal: stop now, without saving
            raise Stopped(signum, 0, None)
        self.signum = signum
        # os.write, not sys.stderr: the handler may have interrupted a progress bar in the
        # middle of writing to sys.stderr, and re-entering that buffered writer raises.
        message = (
            f"{fresh_line()}{NAMES[signal.Signals(signum)]}: saving a checkpoint at the end "
            "of this step, then stopping (Ctrl-C again to abort)\n"
        )
        os.write(2, message.encode())

    def on_train_batch_end(
        self, trainer: pl.Trainer, module: pl.LightningModule, outputs: Any, batch: Any,
        batch_idx: int,
    ) -> None:  # fmt: skip
        if (batch_idx + 1) % trainer.accumulate_grad_batches:
            return  # in the middle of an accumulated step: its gradients are not saved
        stop = self.signum is not None
        if trainer.world_size > 1:
            stop = trainer.strategy.reduce_boolean_decision(stop, all=False)
        if not stop:
            return
        step = trainer.global_step
        if self.checkpoints.last_saved != step:
            self.checkpoints.save(trainer)
        saved = self.checkpoints.directory / f"step-{step:07d}.ckpt"
        _close_bars(trainer)  # else a bar closed at exit lands under the last message
        raise Stopped(self.signum or signal.SIGTERM, step, saved)

    def teardown(self, trainer: pl.Trainer, module: pl.LightningModule, stage: str) -> None:
        self.restore()


def _close_bars(trainer: pl.Trainer) -> None:
    bar = trainer.progress_bar_callback
    for name in ("train_progress_bar", "val_progress_bar"):
        with contextlib.suppress(Exception):  # a bar not made yet raises
            getattr(bar, name).close()
