"""Every bad request gets a 4xx with OpenAI's error object, and the server keeps serving."""

from __future__ import annotations

import json

import httpx
import pytest

GOOD = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}], "temperature": 0}


def post(url: str, body: object, **kwargs) -> httpx.Response:
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    headers = {"Content-Type": "application/json", **kwargs.pop("headers", {})}
    return httpx.post(f"{url}/v1/chat/completions", content=content, headers=headers,
                      timeout=60, **kwargs)  # fmt: skip


def still_serves(url: str) -> None:
    reply = post(url, GOOD)
    assert reply.status_code == 200
    assert reply.json()["choices"][0]["message"]["content"] == "Hi, how are you?"


BAD = {
    "malformed JSON": (b'{"messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "unknown role": ({**GOOD, "messages": [{"role": "robot", "content": "hi"}]}, 400,
                     "messages[0].role"),
    "no messages": ({**GOOD, "messages": []}, 400, "messages"),
    "missing messages": ({"model": "tiny"}, 400, "messages"),
    "only empty messages": ({**GOOD, "messages": [{"role": "user", "content": "  "}]}, 400,
                            "messages"),
    "non-string content": ({**GOOD, "messages": [{"role": "user", "content": 5}]}, 400,
                           "messages[0].content"),
    "a content part without text": (
        {**GOOD, "messages": [{"role": "user", "content": [{"type": "text"}]}]}, 400,
        "messages[0].content"),
    "an image part": ({**GOOD, "messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400,
        "messages[0].content"),
    "seed beyond a generator's": ({**GOOD, "seed": 2**64}, 400, "seed"),
    "a stop string over the cap": ({**GOOD, "stop": ["a" * 257]}, 400, "stop"),
    "system after the start": ({**GOOD, "messages": [{"role": "user", "content": "Hi"},
                                                     {"role": "system", "content": "x"}]},
                               400, "messages"),
    "max_tokens over the model": ({**GOOD, "max_tokens": 100_000}, 400, "max_tokens"),
    "max_completion_tokens zero": ({**GOOD, "max_completion_tokens": 0}, 400,
                                   "max_completion_tokens"),
    "n over the cap": ({**GOOD, "n": 5}, 400, "n"),
    "temperature out of range": ({**GOOD, "temperature": 7}, 400, "temperature"),
    "stop not a string": ({**GOOD, "stop": 3}, 400, "stop"),
    "five stops": ({**GOOD, "stop": ["a", "b", "c", "d", "e"]}, 400, "stop"),
    "mmi without a reverse model": ({**GOOD, "mmi": {"num_candidates": 2}}, 400, "mmi"),
    "a frequency penalty": ({**GOOD, "frequency_penalty": 0.5}, 400, "frequency_penalty"),
    "a repetition penalty": ({**GOOD, "repetition_penalty": 1.2}, 400, "repetition_penalty"),
    "a logit bias": ({**GOOD, "logit_bias": {"50256": -100}}, 400, "logit_bias"),
    "unknown model": ({**GOOD, "model": "gpt-9"}, 404, "model"),
    "body over the limit": ({**GOOD, "messages": [{"role": "user", "content": "x" * 30_000}]},
                            413, None),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD))
def test_bad_request_gets_an_openai_error_and_the_server_goes_on(plain_url, case):
    body, status, param = BAD[case]
    reply = post(plain_url, body)
    assert reply.status_code == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["message"] and error["type"]
    assert error["param"] == param
    still_serves(plain_url)


def test_neutral_values_of_what_the_server_does_not_apply_are_fine(plain_url):
    neutral = {"frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {}}
    assert post(plain_url, {**GOOD, **neutral}).json()["choices"][0]["message"]["content"] == (
        "Hi, how are you?"
    )


def test_num_candidates_over_the_cap(mmi_url):
    reply = post(mmi_url, {**GOOD, "mmi": {"num_candidates": 7}})
    assert reply.status_code == 400
    assert reply.json()["error"]["param"] == "mmi.num_candidates"
    assert post(mmi_url, {**GOOD, "mmi": {"num_candidates": 6}}).status_code == 200


def test_openai_client_raises_the_servers_message(client):
    import openai

    with pytest.raises(openai.BadRequestError, match="over this server's limit of 4"):
        client.chat.completions.create(model="tiny", messages=GOOD["messages"], n=5)


def test_unknown_route_and_method_are_error_objects(plain_url):
    missing = httpx.get(f"{plain_url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()
    wrong = httpx.get(f"{plain_url}/v1/chat/completions")
    assert wrong.status_code == 405 and "error" in wrong.json()


def test_api_key_is_required(trained):
    import openai

    from tests.serving.server import running

    with running(trained[0], api_key="s3cret") as url:
        for headers in ({}, {"Authorization": "Bearer wrong"}):
            reply = post(url, GOOD, headers=headers)
            assert reply.status_code == 401
            assert reply.json()["error"]["code"] == "invalid_api_key"
        assert httpx.get(f"{url}/v1/models").status_code == 401
        assert httpx.get(f"{url}/health").status_code == 200  # probes need no key
        good = openai.OpenAI(base_url=f"{url}/v1", api_key="s3cret", max_retries=0)
        reply = good.chat.completions.create(model="tiny", messages=GOOD["messages"],
                                             temperature=0)  # fmt: skip
        assert reply.choices[0].message.content == "Hi, how are you?"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{url}/v1", api_key="nope", max_retries=0).models.list()


def test_a_client_leaving_mid_stream_stops_its_decoding(tiny_model_dir):
    """A random model rarely ends a reply (seeded here, so never early): without
    cancellation this row would run 90 steps (each slowed to 20 ms here, so that the
    client's leaving lands mid-reply)."""
    import time

    from tests.serving.server import running

    with running(tiny_model_dir) as url:
        model = _state(url).batcher.model.model
        steps = []

        def slow(*args, forward=model.forward, **kwargs):
            steps.append(1)
            time.sleep(0.02)
            return forward(*args, **kwargs)

        model.forward = slow
        body = {"model": "tiny", "messages": [{"role": "user", "content": "Hello"}],
                "stream": True, "max_tokens": 90, "temperature": 1.0, "top_k": 0,
                "seed": 1}  # fmt: skip
        with httpx.stream("POST", f"{url}/v1/chat/completions", json=body) as response:
            for line in response.iter_lines():
                if line.startswith("data: {") and json.loads(line[6:])["choices"][0]["delta"].get(
                    "content"
                ):
                    break  # text arrived: leave
        batcher = _state(url).batcher
        deadline = time.monotonic() + 10
        while not batcher.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.finished == {"cancelled": 1}
        assert len(steps) < 45  # stopped well before its 90 steps
        del model.forward
        assert post(url, {**GOOD, "max_tokens": 3}).status_code == 200


def test_a_client_leaving_a_plain_request_stops_its_decoding(tiny_model_dir):
    """Not streamed: the server notices the closed connection while it waits."""
    import time

    from tests.serving.server import running

    with running(tiny_model_dir) as url:
        model = _state(url).batcher.model.model
        steps = []

        def slow(*args, forward=model.forward, **kwargs):
            steps.append(1)
            time.sleep(0.1)
            return forward(*args, **kwargs)

        model.forward = slow
        body = {**GOOD, "max_tokens": 90, "temperature": 1.0, "top_k": 0, "seed": 1}
        with pytest.raises(httpx.ReadTimeout):
            httpx.post(f"{url}/v1/chat/completions", json=body, timeout=0.5)  # then hangs up
        batcher = _state(url).batcher
        deadline = time.monotonic() + 20
        while not batcher.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.finished == {"cancelled": 1}
        assert len(steps) < 60  # not its 90 steps
        del model.forward
        assert post(url, {**GOOD, "max_tokens": 3}).status_code == 200


def test_a_request_over_the_timeout_is_504_and_stops_decoding(tiny_model_dir):
    """90 steps of 100 ms would take 9 s; the timeout is 0.5 s. (Seeded: unseeded, the
    random model drew its sep within the first steps about once in a few dozen runs.)"""
    import time

    from tests.serving.server import running

    with running(tiny_model_dir, request_timeout=0.5) as url:
        model = _state(url).batcher.model.model
        steps = []

        def slow(*args, forward=model.forward, **kwargs):
            steps.append(1)
            time.sleep(0.1)
            return forward(*args, **kwargs)

        model.forward = slow
        reply = post(url, {**GOOD, "max_tokens": 90, "temperature": 1.0, "top_k": 0, "seed": 1})
        assert reply.status_code == 504, reply.text
        assert reply.json()["error"]["code"] == "timeout"
        batcher = _state(url).batcher
        deadline = time.monotonic() + 20
        while not batcher.finished and time.monotonic() < deadline:
            time.sleep(0.05)
        assert batcher.finished == {"cancelled": 1}
        assert len(steps) < 60  # not its 90 steps
        del model.forward
        assert post(url, {**GOOD, "max_tokens": 3}).status_code == 200


def test_a_bug_is_a_500_error_object_and_the_server_goes_on(tiny_model_dir):
    from tests.serving.server import running

    with running(tiny_model_dir) as url:
        model = _state(url).batcher.model.model

        def broken(*args, **kwargs):
            raise RuntimeError("boom")

        model.forward = broken
        reply = post(url, GOOD)
        assert reply.status_code == 500
        assert reply.json()["error"] == {
            "message": "internal error: RuntimeError",
            "type": "server_error",
            "param": None,
            "code": None,
        }
        del model.forward
        assert post(url, {**GOOD, "max_tokens": 3}).status_code == 200


def _state(url: str):
    """The app state of the in-process server at `url` (tests only)."""
    from tests.serving.server import APPS

    return APPS[url].state.convcli
