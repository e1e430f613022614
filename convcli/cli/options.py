"""Options and model loading shared by `generate`, `chat` and `eval`."""

from __future__ import annotations

import json
from enum import Enum
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

from convcli.cli.common import info
from convcli.errors import UsageError

if TYPE_CHECKING:
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

GEN = "Generation"
MMI = "MMI reranking"
BATCH = "Batch mode"


class MMISource(str, Enum):
    last = "last"
    history = "history"


class OnError(str, Enum):
    strict = "strict"
    skip = "skip"


# Shared option types (chat uses them too).
MaxNewTokens = Annotated[
    int | None,
    typer.Option(
        "--max-new-tokens",
        min=1,
        help="Tokens to generate at most (default 64, capped to fit the model).",
        rich_help_panel=GEN,
    ),
]
MinNewTokens = Annotated[
    int | None,
    typer.Option(
        "--min-new-tokens", min=0, help="Tokens to generate at least.", rich_help_panel=GEN
    ),
]
Temperature = Annotated[
    float | None,
    typer.Option("--temperature", min=0.0, help="Sampling temperature.", rich_help_panel=GEN),
]
TopK = Annotated[
    int | None, typer.Option("--top-k", min=0, help="Top-k sampling.", rich_help_panel=GEN)
]
TopP = Annotated[
    float | None,
    typer.Option(
        "--top-p", min=0.0, max=1.0, help="Nucleus (top-p) sampling.", rich_help_panel=GEN
    ),
]
NumBeams = Annotated[
    int | None, typer.Option("--num-beams", min=1, help="Beam search width.", rich_help_panel=GEN)
]
RepetitionPenalty = Annotated[
    float | None,
    typer.Option(
        "--repetition-penalty",
        min=0.0,
        help="Penalty for repeated tokens (1.0 = none).",
        rich_help_panel=GEN,
    ),
]
NoRepeatNgram = Annotated[
    int | None,
    typer.Option(
        "--no-repeat-ngram-size",
        min=0,
        help="Never repeat an n-gram of this size.",
        rich_help_panel=GEN,
    ),
]
ExtraOption = Annotated[
    list[str] | None,
    typer.Option(
        "--option",
        "-o",
        metavar="KEY=VALUE",
        help="Any other transformers generate option (VALUE read as JSON), "
        "e.g. -o length_penalty=0.8.",
        rich_help_panel=GEN,
    ),
]
Seed = Annotated[
    int | None, typer.Option("--seed", help="Random seed: the same seed gives the same output.")
]
Device = Annotated[
    str | None,
    typer.Option("--device", help="cpu, cuda, cuda:1, mps... (default CUDA when present)."),
]
ReverseModel = Annotated[
    Path | None,
    typer.Option(
        "--reverse-model",
        help="A reverse model folder: rerank candidates by MMI.",
        rich_help_panel=MMI,
    ),
]
NumCandidates = Annotated[
    int,
    typer.Option(
        "--num-candidates", min=1, help="Candidates sampled for MMI.", rich_help_panel=MMI
    ),
]
MMITemperature = Annotated[
    float,
    typer.Option(
        "--mmi-temperature", min=0.0, help="Pick from softmax(score / T).", rich_help_panel=MMI
    ),
]
MMIArgmax = Annotated[
    bool, typer.Option("--mmi-argmax", help="Pick the best-scored candidate.", rich_help_panel=MMI)
]
MMISourceOpt = Annotated[
    MMISource,
    typer.Option(
        "--mmi-source",
        help="Score against the last message or the whole history (newest first).",
        rich_help_panel=MMI,
    ),
]


def sampling_options(**values: Any) -> dict[str, Any]:
    """The transformers generate kwargs the user set (None = unset), plus `--option`s."""
    extra = values.pop("option", None) or []
    options = {k: v for k, v in values.items() if v is not None}
    for item in extra:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip():
            raise UsageError(f"--option expects KEY=VALUE, got {item!r}")
        try:
            options[key.strip()] = json.loads(raw)
        except ValueError:
            options[key.strip()] = raw
    return options


def load_models(
    model: Path,
    reverse_model: Path | None,
    *,
    device: str | None,
    num_candidates: int,
    mmi_temperature: float,
    mmi_argmax: bool,
    mmi_source: str,
) -> tuple[ConversationModel, MMIReranker | None]:
    """The forward model and, with a reverse model, the MMI reranker; warnings on stderr."""
    from transformers.utils import logging as hf_logging

    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

    # transformers' advice and weight-loading bars are noise on a CLI's stderr.
    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    forward = ConversationModel.from_pretrained(model, device=device)
    if forward.meta.reverse:
        info(f"warning: {model} is marked as a reverse model; its replies will read backwards")
    if reverse_model is None:
        return forward, None
    reverse = ConversationModel.from_pretrained(reverse_model, device=device)
    if not reverse.meta.reverse:
        info(f"warning: {reverse_model} is not marked as a reverse model (convcli.json)")
    reranker = MMIReranker(
        forward,
        reverse,
        num_candidates=num_candidates,
        temperature=mmi_temperature,
        argmax=mmi_argmax,
        source=mmi_source,
    )
    return forward, reranker
