"""`convcli serve`: a thin face on `convcli.serving` (FastAPI + uvicorn, the `serve` extra)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from convcli.cli.common import info
from convcli.cli.options import settings_options
from convcli.errors import ConvcliError
from convcli.inference.settings import (
    CHAT_SAMPLING,
    EngineSettings,
    MMISettings,
    SamplingSettings,
)
from convcli.serving.settings import ServeSettings

INSTALL_HINT = "convcli serve needs FastAPI and uvicorn: pip install 'convcli[serve]'"


@settings_options(
    config="serve",
    serve=ServeSettings,
    mmi=MMISettings,
    sampling=CHAT_SAMPLING,
    runtime=EngineSettings,
    hide=("do_sample", "num_beams", "num_return_sequences", "min_new_tokens",
          "repetition_penalty", "no_repeat_ngram_size", "seed"),
)  # fmt: skip
def serve(
    model: Annotated[
        Path, typer.Argument(help="A model folder (from train or convert, or a GPT-2 folder).")
    ],
    serve: ServeSettings = ServeSettings(),
    mmi: MMISettings = MMISettings(),
    sampling: SamplingSettings = CHAT_SAMPLING,
    runtime: EngineSettings = EngineSettings(),
) -> None:
    """Serve a model over an OpenAI-compatible API, with a chat page at /.

    POST /v1/chat/completions (streaming too), GET /v1/models, GET /health.
    With --reverse-model, replies are reranked by MMI; a request can set
    "mmi": {"num_candidates": N} or "mmi": false, and "return_candidates": true.
    The sampling options are the defaults of requests that do not set them.

    \b
    Examples:
      convcli serve my-model
      convcli serve my-model --reverse-model my-reverse --port 8080
      convcli serve my-model --host 0.0.0.0 --api-key "$KEY" --workers 2
    """
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise ConvcliError(INSTALL_HINT) from None

    from convcli.inference.loading import check_models
    from convcli.serving.launch import ENVIRONMENT, app_from_settings

    check_models(model, mmi, runtime)  # one line before listening, not after
    url = f"http://{serve.host}:{serve.port}/"
    if serve.workers > 1:
        import json
        import os

        from convcli.settings import to_dict

        spec = {"model": str(model), "serve": to_dict(serve), "sampling": to_dict(sampling),
                "mmi": to_dict(mmi), "runtime": to_dict(runtime)}  # fmt: skip
        os.environ[ENVIRONMENT] = json.dumps(spec)
        info(f"starting {serve.workers} workers, each loading {model}; chat page: {url}")
        uvicorn.run("convcli.serving.launch:from_environment", factory=True, host=serve.host,
                    port=serve.port, workers=serve.workers, log_level="info")  # fmt: skip
        return

    failure: list[str] = []
    server: uvicorn.Server | None = None

    def on_load_error(message: str) -> None:
        failure.append(message)
        if server is not None:
            server.should_exit = True

    def on_loaded(message: str) -> None:
        info(message if message.startswith("warning") else f"{message}; chat page: {url}")

    app = app_from_settings(
        str(model), serve, sampling, mmi, runtime,
        on_load_error=on_load_error, on_loaded=on_loaded,
    )  # fmt: skip
    config = uvicorn.Config(app, host=serve.host, port=serve.port, log_level="info")
    server = uvicorn.Server(config)
    server.run()
    if failure:
        raise ConvcliError(failure[0])
