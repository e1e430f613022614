"""`convcli convert`: a thin face on `convcli.convert.convert_checkpoint`."""

from __future__ import annotations

import re
from enum import Enum
from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import StageBars, info


class Dtype(str, Enum):
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def convert(
    checkpoint: Annotated[
        Path,
        typer.Argument(
            help="A DialoGPT .pkl (e.g. medium_ft.pkl) or a convcli train .ckpt.",
            show_default=False,
        ),
    ],
    output: Annotated[
        Path,
        typer.Option("--output", "-o", help="The model folder to write.", show_default=False),
    ],
    tokenizer: Annotated[
        str | None,
        typer.Option(
            help="Tokenizer folder or hub name. Default: what a .ckpt records, else GPT-2's "
            "vocabulary from the hub (give a folder with vocab.json + merges.txt offline).",
            show_default=False,
        ),
    ] = None,
    dtype: Annotated[Dtype, typer.Option(help="Weights dtype of the folder.")] = Dtype.float32,
    reverse: Annotated[
        bool,
        typer.Option("--reverse", help="Mark it a reverse model (small_reverse.pkl), for MMI."),
    ] = False,
    n_head: Annotated[
        int | None,
        typer.Option(
            help="Attention heads (default: width / 64, as in every GPT-2); must divide the width.",
            show_default=False,
        ),
    ] = None,
    n_layer: Annotated[
        int | None,
        typer.Option(help="Expected layers: an error if the checkpoint has another number."),
    ] = None,
    n_embd: Annotated[
        int | None,
        typer.Option(help="Expected width: an error if the checkpoint has another one."),
    ] = None,
    verify: Annotated[
        bool,
        typer.Option(help="Load the written folder and compare its logits with the checkpoint's."),
    ] = True,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace an existing output folder.")
    ] = False,
) -> None:
    """Convert a DialoGPT .pkl or a train .ckpt into a verified model folder.

    The size comes from the tensors (file names lie); no code in the file runs.

    The folder is loaded back with plain transformers and its logits compared.

    Example: convcli convert medium_ft.pkl -o dialogpt-medium --tokenizer gpt2-vocab/
    """
    from convcli.convert import convert_checkpoint

    with StageBars(label=lambda stage: f"{stage:<7}", leave=True) as bars:
        report = convert_checkpoint(
            checkpoint,
            output,
            tokenizer=tokenizer,
            dtype=dtype.value,
            reverse=reverse,
            n_head=n_head,
            n_layer=n_layer,
            n_embd=n_embd,
            verify=verify,
            overwrite=overwrite,
            progress=bars,
        )
    if report.dropped:
        info(f"dropped {len(report.dropped)} keys: {_dropped(report.dropped)}")
    for note in report.notes:
        info(f"note: {note}")
    info(report.summary())


def _dropped(keys: list[str]) -> str:
    buffers = [k for k in keys if re.search(r"(^|\.)h\.\d+\.attn\.(bias|masked_bias)$", k)]
    others = [k for k in keys if k not in buffers]
    parts = [f"{len(buffers)} causal-mask buffers (h.*.attn.bias/masked_bias)"] if buffers else []
    return ", ".join(parts + others)
