"""`TrainSettings`: every option of `convcli train`, as a dataclass (no torch import here).

The field docstrings become the comments of `convcli train --print-config` and of the
resolved `train.yaml` written beside the outputs.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

PRESETS = ("tiny", "small", "medium")


@dataclass
class TrainSettings:
    """Options of `convcli train`."""

    data: Path | None = None
    """Shard directory written by `convcli prepare` (its tokenizer is the vocabulary)."""
    output: Path | None = None
    """Run directory: checkpoints/, logs/, final/ and best/ model folders, train.yaml."""
    model: str | None = None
    """Start from this model folder or hub name (fine-tuning). Exclusive with preset."""
    preset: Literal["tiny", "small", "medium"] | None = None
    """Start from random weights of this size: tiny (~1-2M params), small (GPT-2 117M),
    medium (GPT-2 345M). Exclusive with model."""
    token_types: bool | None = None
    """Feed token type ids to the model. Default (null): follow the model folder's
    convcli.json (foreign GPT-2 folders: off); new models from a preset: on."""
    train_on: Literal["responses", "all", "weights"] = "responses"
    """Which tokens carry loss: responses (every turn after the first, as DialoGPT),
    all (every token, as convmodel), weights (turns with a non-zero DialoGPT TSV weight)."""
    reverse: bool = False
    """Train a reverse model for MMI: turn order reversed, the source is the target."""
    batch_tokens: int = 4096
    """Token budget of a batch per device, padding included (length bucketing)."""
    batch_size: int | None = None
    """Fixed number of examples per batch instead of the token budget."""
    learning_rate: float | None = None
    """Peak learning rate of AdamW. Default (null): by starting point, 1e-4 fine-tuning a
    `model`, 3e-3 / 6e-4 / 3e-4 from scratch with `preset` tiny / small / medium."""
    weight_decay: float = 0.01
    """AdamW weight decay; biases and LayerNorm weights are never decayed."""
    warmup_steps: int | None = None
    """Optimizer steps of linear warmup from 0 to the peak learning rate. Default (null):
    10% of the run's steps, at most 100."""
    schedule: Literal["linear", "constant"] = "linear"
    """After warmup: linear decay to 0 at the last step, or constant."""
    grad_clip: float = 1.0
    """Clip the gradient norm to this value (0: no clipping)."""
    accumulate: int = 1
    """Batches per optimizer step (gradient accumulation)."""
    precision: Literal["32", "bf16-mixed", "16-mixed"] = "32"
    """Numeric precision: 32, bf16-mixed, or 16-mixed (GPU)."""
    seed: int = 42
    """Random seed: initial weights, data order, dropout."""
    max_steps: int | None = None
    """Stop after this many optimizer steps (null: use max_epochs)."""
    max_epochs: int | None = None
    """Stop after this many passes over the training split (null with max_steps null: 1)."""
    val_every: int = 500
    """Validate every this many optimizer steps (and once at the end)."""
    early_stop: int | None = None
    """Stop when the validation loss has not improved for this many validations in a row
    (patience; null: never stop early). best/ keeps the best model either way."""
    save_every: int = 1000
    """Write a checkpoint with optimizer state every this many optimizer steps (and at the end)."""
    keep_checkpoints: int = 2
    """How many of the newest step checkpoints to keep."""
    resume: str | None = None
    """Continue a run: auto (the newest checkpoint of the run directory) or a .ckpt path."""
    logger: Literal["csv", "tensorboard"] = "csv"
    """Where metrics go, under the run directory's logs/."""
    accelerator: str = "auto"
    """Lightning accelerator: auto, cpu, gpu, cuda, mps, tpu."""
    devices: str = "auto"
    """Lightning devices: auto, a count (2), or a list of ids (0,1)."""
    num_nodes: int = 1
    """Number of machines (Lightning num_nodes)."""
    strategy: str = "auto"
    """Lightning strategy: auto, ddp, fsdp, deepspeed, ..."""
    threads: int | None = None
    """CPU threads for torch (intra-op) in each training process. Default: OMP_NUM_THREADS
    if set, else half of this machine's CPUs (at most 8): on a busy machine, threads that
    wait for each other at every op cost more than they give."""
    num_workers: int = 0
    """DataLoader worker processes (0: load in the training process)."""
    overwrite: bool = False
    """Start over in an output directory that already holds a run."""
