"""Settings of `convcli convert` (light: the CLI imports it without torch)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

DTYPES = ("float32", "float16", "bfloat16")


@dataclass
class ConvertSettings:
    """How a DialoGPT .pkl or a train .ckpt becomes a model folder."""

    checkpoint: Path | None = None
    """A DialoGPT .pkl (e.g. medium_ft.pkl) or a convcli train .ckpt."""
    output: Path | None = None
    """The model folder to write."""
    tokenizer: str | None = None
    """Tokenizer folder or hub name. Default: what a .ckpt records, else GPT-2's vocabulary
    from the hub (give a folder with vocab.json + merges.txt offline)."""
    dtype: Literal["float32", "float16", "bfloat16"] = "float32"
    """Weights dtype of the folder."""
    reverse: bool = False
    """Mark it a reverse model (small_reverse.pkl), for MMI."""
    n_head: int | None = None
    """Attention heads (default: width / 64, as in every GPT-2); must divide the width."""
    n_layer: int | None = None
    """Expected layers: an error if the checkpoint has another number."""
    n_embd: int | None = None
    """Expected width: an error if the checkpoint has another one."""
    verify: bool = True
    """Load the written folder and compare its logits with the checkpoint's."""
    overwrite: bool = False
    """Replace an existing output folder."""
