"""The app's own behaviour: health while loading, CORS only when asked for."""

from __future__ import annotations

import threading
import time

from convcli.inference.model import ConversationModel
from convcli.serving.app import create_app
from convcli.serving.settings import ServeSettings


def test_health_is_503_until_the_models_are_loaded(trained):
    from fastapi.testclient import TestClient

    release = threading.Event()

    def load():
        release.wait(30)
        return ConversationModel.from_pretrained(trained[0], device="cpu"), None

    app = create_app(load, name="tiny")
    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    with TestClient(app) as client:
        health = client.get("/health")
        assert health.status_code == 503 and health.json() == {"status": "loading"}
        early = client.post("/v1/chat/completions", json=body)
        assert early.status_code == 503 and early.json()["error"]["type"] == "server_error"
        release.set()
        deadline = time.monotonic() + 30
        while client.get("/health").status_code != 200:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        assert client.get("/health").json() == {"status": "ok", "model": "tiny", "mmi": False}
        reply = client.post("/v1/chat/completions", json=body).json()
        assert reply["choices"][0]["message"]["content"] == "Hi, how are you?"


def test_a_model_that_fails_to_load_is_reported_on_health():
    from fastapi.testclient import TestClient

    from convcli.errors import ConvcliError

    def load():
        raise ConvcliError("model folder not found: nowhere")

    seen = []
    app = create_app(load, name="x", on_load_error=seen.append)
    with TestClient(app) as client:
        deadline = time.monotonic() + 10
        while not seen:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        health = client.get("/health")
    assert health.status_code == 503
    assert health.json() == {"status": "error", "error": "model folder not found: nowhere"}
    assert seen == ["model folder not found: nowhere"]


def test_cors_only_for_the_origins_given(trained):
    from fastapi.testclient import TestClient

    def load():
        return ConversationModel.from_pretrained(trained[0], device="cpu"), None

    preflight = {
        "Origin": "http://ui.example",
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type",
    }
    closed = create_app(load, name="tiny")
    opened = create_app(load, name="tiny", serve=ServeSettings(cors_origin=["http://ui.example"]))
    with TestClient(closed) as client:
        reply = client.options("/v1/chat/completions", headers=preflight)
        assert "access-control-allow-origin" not in reply.headers
    with TestClient(opened) as client:
        reply = client.options("/v1/chat/completions", headers=preflight)
        assert reply.status_code == 200
        assert reply.headers["access-control-allow-origin"] == "http://ui.example"
        other = client.options(
            "/v1/chat/completions", headers={**preflight, "Origin": "http://evil.example"}
        )
        assert "access-control-allow-origin" not in other.headers


def test_two_apps_in_one_process_load_in_turn(trained):
    """transformers' loading is process-wide: concurrent loads once left meta tensors."""
    from fastapi.testclient import TestClient

    def load():
        return ConversationModel.from_pretrained(trained[0], device="cpu"), None

    body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}
    apps = [create_app(load, name="tiny") for _ in range(3)]
    with TestClient(apps[0]) as a, TestClient(apps[1]) as b, TestClient(apps[2]) as c:
        for client in (a, b, c):
            deadline = time.monotonic() + 60
            while (health := client.get("/health")).status_code != 200:
                assert health.json()["status"] == "loading"  # not an error
                assert time.monotonic() < deadline
                time.sleep(0.05)
            reply = client.post("/v1/chat/completions", json=body).json()
            assert reply["choices"][0]["message"]["content"] == "Hi, how are you?"
