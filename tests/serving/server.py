"""Run the app in a real uvicorn on 127.0.0.1 (a free port), in this process."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from pathlib import Path

APPS: dict[str, object] = {}
"""The app behind each running test server, by URL (to look at its batcher)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(
    model: Path, reverse: Path | None = None, runtime: object = None, **serve: object
) -> Iterator[str]:
    """Serve `model` in this process (a uvicorn thread); yields the base URL once healthy.
    `runtime`: an `EngineSettings` (default: torch on one CPU thread)."""
    import httpx
    import uvicorn

    from convcli.inference.settings import CHAT_SAMPLING, EngineSettings, MMISettings
    from convcli.serving.launch import app_from_settings
    from convcli.serving.settings import ServeSettings

    port = free_port()
    settings = ServeSettings(port=port, model_name="tiny", **serve)  # type: ignore[arg-type]
    app = app_from_settings(
        str(model), settings, CHAT_SAMPLING, MMISettings(reverse_model=reverse),
        runtime or EngineSettings(device="cpu", threads=1),
    )  # fmt: skip
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            health = httpx.get(f"{url}/health")
            if health.status_code == 200:
                break
            if health.json().get("status") == "error":
                raise RuntimeError(f"the test server could not load: {health.json()['error']}")
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError("the test server did not become healthy")
        time.sleep(0.05)
    APPS[url] = app
    try:
        yield url
    finally:
        APPS.pop(url, None)
        server.should_exit = True
        thread.join(timeout=10)
