"""`convcli serve --backend ctranslate2`: the same API through the CTranslate2 engine
(float32 here, so that greedy replies can be compared with the torch server's)."""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest

from tests.serving.server import running

pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")

MESSAGES = [{"role": "user", "content": "Do you like tea?"}]


@pytest.fixture(scope="module")
def ct2_url(trained, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The trained pair (a forward with token types) served through CTranslate2."""
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


def ask(client, **options):
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


def test_a_cancelled_request_stops_at_its_first_token(trained, tmp_path, monkeypatch) -> None:
    """A client that went away: its rows end at the next token the engine hands over."""
    import threading

    from convcli.inference.model import ConversationModel
    from convcli.inference.rows import RowRequest, generate_rows

    monkeypatch.setenv("CONVCLI_CACHE", str(tmp_path))
    model = ConversationModel.from_pretrained(trained[0], device="cpu", backend="ctranslate2")
    gone = threading.Event()
    gone.set()
    requests = [RowRequest(turns=["Hello"], n=2, max_new_tokens=20, cancelled=gone),
                RowRequest(turns=["Hello"], do_sample=False, max_new_tokens=20)]  # fmt: skip
    cancelled, answered = generate_rows(model, requests)
    assert [c.finish_reason for c in cancelled.choices] == ["cancelled", "cancelled"]
    assert cancelled.completion_tokens == 0
    assert answered.choices[0].text == "Hi, how are you?"


def test_unseeded_requests_share_an_engine_call_and_seeded_ones_get_their_own(
    trained, tmp_path, monkeypatch
) -> None:
    from convcli.inference.model import ConversationModel
    from convcli.inference.rows import RowRequest, generate_rows

    monkeypatch.setenv("CONVCLI_CACHE", str(tmp_path))
    model = ConversationModel.from_pretrained(trained[0], device="cpu", backend="ctranslate2")
    calls = []
    real = model.engine.generate

    def counted(prompts, *args, **kwargs):
        calls.append(len(prompts))
        return real(prompts, *args, **kwargs)

    monkeypatch.setattr(model.engine, "generate", counted)
    turns = [["Hello"], ["Do you like tea?"], ["Good morning"]]
    requests = [RowRequest(turns=t, max_new_tokens=6, n=2) for t in turns]
    requests.append(RowRequest(turns=["Hello"], max_new_tokens=6, seed=3))
    results = generate_rows(model, requests)
    assert calls == [6, 1]  # three unseeded requests' six rows together; the seeded alone
    assert [len(r.choices) for r in results] == [2, 2, 2, 1]
    again = generate_rows(model, requests[-1:])
    assert again[0].choices[0].text == results[-1].choices[0].text  # the seed holds
