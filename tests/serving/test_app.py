"""The app's own behaviour: health while loading, CORS only when asked for, and the same API
through the ctranslate2 backend."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest

from convcli.inference.model import ConversationModel
from convcli.serving.app import create_app
from convcli.serving.settings import ServeSettings
from tests.serving.server import running


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


# -- serve --backend ctranslate2: the same API through the CTranslate2 engine ------------

MESSAGES = [{"role": "user", "content": "Do you like tea?"}]


@pytest.fixture(scope="module")
def ct2_url(trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The trained pair (a forward with token types) served through CTranslate2, in float32
    so that greedy replies can be compared with the torch server's."""
    pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")
    from convcli.inference.settings import EngineSettings

    before = os.environ.get("CONVCLI_CACHE")
    os.environ["CONVCLI_CACHE"] = str(tmp_path_factory.mktemp("ct2-cache"))
    runtime = EngineSettings(device="cpu", threads=1, backend="ctranslate2",
                             compute_type="float32")  # fmt: skip
    try:
        with running(trained[0], trained[1], runtime=runtime, max_candidates=6) as url:
            yield url
    finally:
        if before is None:
            os.environ.pop("CONVCLI_CACHE", None)
        else:
            os.environ["CONVCLI_CACHE"] = before


@pytest.fixture
def ct2(ct2_url):
    from openai import OpenAI

    return OpenAI(base_url=f"{ct2_url}/v1", api_key="unused", max_retries=0)


def ask(client, **options):  # (the ctranslate2 tests)
    return client.chat.completions.create(model="tiny", messages=MESSAGES, **options)


def test_greedy_replies_equal_the_torch_server(ct2, client) -> None:
    options = {"temperature": 0, "max_tokens": 12, "extra_body": {"mmi": False}}
    got = ask(ct2, **options)
    assert got.choices[0].message.content == ask(client, **options).choices[0].message.content
    assert got.choices[0].message.content == "Yes, I like green tea."
    assert got.choices[0].finish_reason == "stop"
    assert got.usage.prompt_tokens > 0 and got.usage.completion_tokens > 0


def test_streaming_joins_to_the_reply_and_stop_strings_cut_it(ct2) -> None:
    options = {"temperature": 0, "max_tokens": 12, "extra_body": {"mmi": False}}
    whole = ask(ct2, **options).choices[0].message.content
    deltas = [
        chunk.choices[0].delta.content or ""
        for chunk in ask(ct2, stream=True, **options)
        if chunk.choices
    ]
    assert "".join(deltas) == whole and len(deltas) > 2
    cut = ask(ct2, stop=["green"], **options).choices[0]
    assert cut.message.content == "Yes, I like" and cut.finish_reason == "stop"
    capped = ask(ct2, temperature=0, max_tokens=2, extra_body={"mmi": False})
    assert capped.choices[0].finish_reason == "length"
    assert capped.usage.completion_tokens == 2


def test_seeded_samples_repeat_and_n_gives_n(ct2) -> None:
    options = {"temperature": 2.0, "seed": 7, "n": 3, "max_tokens": 8,
               "extra_body": {"mmi": False}}  # fmt: skip
    first = [c.message.content for c in ask(ct2, **options).choices]
    ask(ct2, temperature=2.0, max_tokens=8, extra_body={"mmi": False})  # unseeded between
    assert [c.message.content for c in ask(ct2, **options).choices] == first
    assert len(first) == 3


def test_mmi_through_the_engine(ct2) -> None:
    reply = ask(ct2, seed=1, max_tokens=12,
                extra_body={"mmi": {"num_candidates": 4}, "return_candidates": True})  # fmt: skip
    extra = reply.model_extra or {}
    choice = reply.choices[0]
    candidates = (choice.model_extra or {}).get("candidates") or extra.get("candidates")
    assert candidates and sum(c["count"] for c in candidates) == 4
    assert choice.message.content in [c["text"] for c in candidates]
