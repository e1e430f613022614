"""Loading what generate, chat, eval and a server run: the models and the torch threads."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from convcli.inference.settings import (
    EngineSettings,
    MMISettings,
    RuntimeSettings,
    default_threads,
)

if TYPE_CHECKING:
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel


def set_threads(threads: int | None) -> int:
    """Set torch's intra-op threads (None: `default_threads()`); returns the number set."""
    import torch

    count = threads if threads is not None else default_threads()
    torch.set_num_threads(count)
    return count


def check_models(
    model: str | Path, mmi: MMISettings | None = None, runtime: RuntimeSettings | None = None
) -> None:
    """Refuse at once what `load_models` would refuse before loading any weights: a folder
    that is missing or not a model, a device this machine lacks, a compute type its engine
    cannot run (a server checks this before it starts listening)."""
    from convcli.modelfolder import checked_folder

    runtime = runtime or RuntimeSettings()
    if isinstance(runtime, EngineSettings) and runtime.backend != "torch":
        from convcli.inference.ct2_engine import check_compute_type, engine_device

        check_compute_type(engine_device(runtime.device), runtime.compute_type or "int8")
    else:
        from convcli.loadgate import check_device

        check_device(runtime.device)
    for folder in (model, (mmi or MMISettings()).reverse_model):
        if folder is not None:
            checked_folder(folder)


def load_models(
    model: str | Path,
    mmi: MMISettings | None = None,
    runtime: RuntimeSettings | None = None,
    report: Callable[[str], None] | None = None,
) -> tuple[ConversationModel, MMIReranker | None, list[str]]:
    """The forward model, the MMI reranker when `mmi.reverse_model` is set, and warnings
    for the user (a model marked the wrong way round). `report(message)` hears of slow
    steps as they start (a conversion for the ctranslate2 backend)."""
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

    mmi = mmi or MMISettings()
    runtime = runtime or RuntimeSettings()
    engine: dict[str, Any] = {}
    if isinstance(runtime, EngineSettings) and runtime.backend != "torch":
        # No torch here: importing it would cost more than the engine's first reply.
        engine = {"backend": runtime.backend, "compute_type": runtime.compute_type or "int8",
                  "report": report, "threads": runtime.threads or default_threads()}  # fmt: skip
    else:
        from transformers.utils import logging as hf_logging

        from convcli.loadgate import check_device

        check_device(runtime.device)  # before anything loads: one line, exit 2
        set_threads(runtime.threads)
        # transformers' advice and weight-loading bars are noise for a front end.
        hf_logging.set_verbosity_error()
        hf_logging.disable_progress_bar()
    notes: list[str] = []
    forward = ConversationModel.from_pretrained(model, device=runtime.device, **engine)
    notes.extend(forward.notes)
    if forward.meta.reverse:
        notes.append(f"{model} is marked as a reverse model; its replies will read backwards")
    if mmi.reverse_model is None:
        return forward, None, notes
    # One tokenizer object when both folders hold the same tokenizer files: loaded and
    # fingerprinted once (see check_same_tokenizer).
    reverse = ConversationModel.from_pretrained(
        mmi.reverse_model, device=runtime.device, share_tokenizer=forward, **engine
    )
    notes.extend(reverse.notes)
    if not reverse.meta.reverse:
        notes.append(f"{mmi.reverse_model} is not marked as a reverse model (convcli.json)")
    reranker = MMIReranker(
        forward,
        reverse,
        num_candidates=mmi.num_candidates,
        temperature=mmi.mmi_temperature,
        argmax=mmi.mmi_argmax,
        source=mmi.mmi_source,
    )
    return forward, reranker, notes
