"""The learning-rate schedule, and its defaults by starting point.

Fine-tuning a pretrained model wants a small peak (it already knows language; a large
step erases it). Random weights want a peak an order of magnitude higher, smaller for
bigger models (GPT-2 small was trained at 6e-4). Warmup scales with the run: 100 fixed
steps would be most of a 150-step run.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

FINE_TUNE_LR = 1e-4
SCRATCH_LR = {"tiny": 3e-3, "small": 6e-4, "medium": 3e-4}
WARMUP_FRACTION = 0.1
MAX_DEFAULT_WARMUP = 100


@dataclass(frozen=True)
class Schedule:
    """Peak learning rate and warmup steps of a run, and how they were chosen."""

    learning_rate: float
    warmup_steps: int
    total_steps: int
    why: str

    def describe(self) -> str:
        return (
            f"learning rate {self.learning_rate:g}, warmup {self.warmup_steps} of "
            f"{self.total_steps} steps ({self.why})"
        )


def default_warmup(total_steps: int) -> int:
    """10% of the run, at most 100 steps, at least 1."""
    return max(1, min(MAX_DEFAULT_WARMUP, math.ceil(WARMUP_FRACTION * total_steps)))


def choose_schedule(
    learning_rate: float | None, warmup_steps: int | None, preset: str | None, total_steps: int
) -> Schedule:
    """Fill the unset values: by starting point (`preset` None: fine-tuning) and run length."""
    start = "fine-tuning" if preset is None else f"from scratch, preset {preset}"
    chosen = []
    if learning_rate is None:
        learning_rate = FINE_TUNE_LR if preset is None else SCRATCH_LR[preset]
        chosen.append(f"learning rate: default {start}")
    if warmup_steps is None:
        warmup_steps = default_warmup(total_steps)
        chosen.append(f"warmup: default {WARMUP_FRACTION:.0%} of the run, at most "
                      f"{MAX_DEFAULT_WARMUP}")  # fmt: skip
    why = "; ".join(chosen) if chosen else "as given"
    return Schedule(learning_rate, warmup_steps, total_steps, why)


def lr_factor(step: int, warmup: int, total: int, schedule: str) -> float:
    """Linear warmup to 1, then linear decay to 0 at `total` (or constant)."""
    if step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup:
        return 1.0
    return max(0.0, (total - step) / (total - warmup))
