"""Building the app from `convcli serve`'s settings, in this process or in each of
`--workers N` uvicorn worker processes."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from convcli.inference.settings import EngineSettings, MMISettings, SamplingSettings
from convcli.serving.app import create_app
from convcli.serving.settings import ServeSettings

if TYPE_CHECKING:
    from fastapi import FastAPI

    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel


ENVIRONMENT = "CONVCLI_SERVE"
"""How `--workers N` hands its settings to each uvicorn worker process (JSON)."""


def app_from_settings(
    model: str,
    serve: ServeSettings,
    sampling: SamplingSettings,
    mmi: MMISettings,
    runtime: EngineSettings,
    *,
    on_load_error: Callable[[str], None] | None = None,
    on_loaded: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app for a model folder (and a reverse model): what `convcli serve` runs."""
    from convcli.inference.loading import load_models

    name = serve.model_name or Path(model).resolve().name

    def load() -> tuple[ConversationModel, MMIReranker | None]:
        forward, reranker, notes = load_models(model, mmi, runtime, report=on_loaded)
        for note in notes:
            if on_loaded is not None:
                on_loaded(f"warning: {note}")
        if on_loaded is not None:
            how = f"MMI over {mmi.num_candidates} candidates" if reranker else "sampling"
            on_loaded(f"serving {model} as {name!r} ({how})")
        return forward, reranker

    return create_app(
        load, name=name, serve=serve, sampling=sampling, mmi=mmi, on_load_error=on_load_error
    )


def from_environment() -> FastAPI:
    """uvicorn's factory in each worker process of `--workers N`."""
    import os

    from convcli.settings import build

    spec = json.loads(os.environ[ENVIRONMENT])
    return app_from_settings(
        spec["model"],
        build(ServeSettings, spec["serve"]),
        build(SamplingSettings, spec["sampling"]),
        build(MMISettings, spec["mmi"]),
        build(EngineSettings, spec["runtime"]),
    )
