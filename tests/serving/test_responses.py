"""The official openai client against a real server: replies, n, seeds, stop, usage."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx

from convcli.inference.model import ConversationModel

HELLO = [{"role": "user", "content": "Hello"}]


def test_a_reply_with_truthful_usage(client, trained):
    reply = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0)
    assert reply.object == "chat.completion" and reply.id.startswith("chatcmpl-")
    assert reply.model == "tiny"
    (choice,) = reply.choices
    assert choice.message.role == "assistant"
    assert choice.message.content == "Hi, how are you?"
    assert choice.finish_reason == "stop"
    forward = ConversationModel.from_pretrained(trained[0], device="cpu")
    ids = forward.tokenizer.encode("Hi, how are you?")
    assert reply.usage.completion_tokens == len(ids)
    assert reply.usage.prompt_tokens == len(forward.tokenizer.encode("Hello")) + 2  # 2 seps
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_conversation_is_answered_as_turns(client):
    messages = [
        {"role": "user", "content": "Do you like tea?"},
        {"role": "assistant", "content": "Yes, I like green tea."},
    ]
    reply = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    assert reply.choices[0].message.content == "Me too!"


def test_content_parts_and_the_developer_role_read_as_text_and_system(client):
    """The forms newer OpenAI clients send: a list of text parts, and `developer`."""
    plain = [{"role": "system", "content": "You are kind."},
             {"role": "user", "content": "Do you like tea?"}]  # fmt: skip
    parts = [{"role": "developer", "content": [{"type": "text", "text": "You are kind."}]},
             {"role": "user", "content": [{"type": "text", "text": "Do you like "},
                                          {"type": "text", "text": "tea?"}]}]  # fmt: skip
    replies = [
        client.chat.completions.create(model="tiny", messages=m, temperature=0, max_tokens=12)
        for m in (plain, parts)
    ]
    assert replies[0].choices[0].message.content == replies[1].choices[0].message.content
    assert replies[0].usage.prompt_tokens == replies[1].usage.prompt_tokens


def test_n_replies(client):
    reply = client.chat.completions.create(
        model="tiny", messages=HELLO, n=3, temperature=2.0, seed=1, max_tokens=10
    )
    assert [c.index for c in reply.choices] == [0, 1, 2]
    assert len({c.message.content for c in reply.choices}) > 1


def test_a_seed_gives_the_same_reply_under_concurrent_load(client, plain_url):
    def ask(seed: int) -> str:
        reply = client.chat.completions.create(
            model="tiny", messages=HELLO, temperature=2.0, seed=seed, max_tokens=12
        )
        return reply.choices[0].message.content

    alone = ask(7)
    with ThreadPoolExecutor(8) as pool:
        crowd = list(pool.map(ask, [7, 1, 7, 2, 3, 7, 4, 7]))
    assert [crowd[i] for i in (0, 2, 5, 7)] == [alone] * 4
    assert len(set(crowd)) > 1  # the other seeds really sampled something else
    from tests.serving.server import APPS

    assert APPS[plain_url].state.convcli.batcher.largest > 1  # they shared batches


def test_stop_is_left_out_and_length_is_reported(client):
    stop = client.chat.completions.create(model="tiny", messages=HELLO, temperature=0,
                                          stop=[", how", "zzz"])  # fmt: skip
    assert stop.choices[0].message.content == "Hi"
    assert stop.choices[0].finish_reason == "stop"
    cut = client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, max_completion_tokens=2
    )
    assert cut.choices[0].finish_reason == "length"
    assert cut.usage.completion_tokens == 2
    assert "Hi, how are you?".startswith(cut.choices[0].message.content)


def test_streamed_reply(client):
    stream = client.chat.completions.create(
        model="tiny", messages=HELLO, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )  # fmt: skip
    chunks = list(stream)
    assert len({c.id for c in chunks}) == 1 and len({c.created for c in chunks}) == 1
    assert chunks[0].choices[0].delta.role == "assistant"
    deltas = [c.choices[0].delta.content for c in chunks if c.choices]
    deltas = [d for d in deltas if d]
    assert len(deltas) > 1 and "".join(deltas) == "Hi, how are you?"
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
    assert finishes[-1] == "stop" and finishes.count("stop") == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 1


def test_stream_ends_with_done(plain_url):
    body = {"model": "tiny", "messages": HELLO, "stream": True, "temperature": 0}
    with httpx.stream("POST", f"{plain_url}/v1/chat/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert lines[-1] == "data: [DONE]"


def test_system_message_is_kept_through_truncation(client, trained):
    forward = ConversationModel.from_pretrained(trained[0], device="cpu")
    persona = "My name is Tiny."
    history = ["Where do you live?", "I live in a small town.", "Is it nice?"] * 6
    messages = [{"role": "system", "content": persona}] + [
        {"role": "user" if i % 2 == 0 else "assistant", "content": t} for i, t in enumerate(history)
    ]
    # 96 new tokens leave 32 of the tiny model's 128 positions for the conversation.
    reply = client.chat.completions.create(model="tiny", messages=messages, max_tokens=96)
    fitted = forward.encode_contexts([[persona, *history]], 32, keep_first=1)[0]
    assert fitted[0] == forward.tokenizer.encode(persona) and fitted[-1] == \
        forward.tokenizer.encode("Is it nice?")  # fmt: skip
    assert reply.usage.prompt_tokens == sum(len(t) + 1 for t in fitted) + 1


def test_models_and_health(client, plain_url):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert httpx.get(f"{plain_url}/health").json()["status"] == "ok"


def test_streamed_multibyte_text_equals_the_whole_reply(client):
    """Byte-level tokens split Japanese characters: no half character is ever sent."""
    messages = [{"role": "user", "content": "こんにちは"}]
    whole = client.chat.completions.create(model="tiny", messages=messages, temperature=0)
    stream = client.chat.completions.create(
        model="tiny", messages=messages, temperature=0, stream=True
    )
    deltas = [c.choices[0].delta.content for c in stream if c.choices]
    deltas = [d for d in deltas if d]
    assert whole.choices[0].message.content == "こんにちは、元気ですか?"
    assert "".join(deltas) == whole.choices[0].message.content
    assert not any("\ufffd" in d for d in deltas) and len(deltas) > 1


# MMI through the OpenAI client's extra_body: reranked replies and their candidates.


WHERE = [{"role": "user", "content": "Where do you live?"}]


def test_mmi_reply_with_candidates(mmi_client):
    reply = mmi_client.chat.completions.create(
        model="tiny", messages=WHERE, temperature=1.5, seed=3, max_tokens=12,
        extra_body={"mmi": {"num_candidates": 5, "argmax": True}, "return_candidates": True},
    )  # fmt: skip
    choice = reply.model_dump()["choices"][0]
    cands = choice["candidates"]
    assert sum(c["count"] for c in cands) == 5
    assert [c["chosen"] for c in cands].count(True) == 1
    chosen = next(c for c in cands if c["chosen"])
    assert choice["message"]["content"] == chosen["text"]
    best = max(c["score"] for c in cands if c["text"])
    assert chosen["score"] == best  # argmax
    # usage counts every candidate's tokens: they were all generated.
    assert reply.usage.completion_tokens >= len(chosen["text"].split())


def test_mmi_is_the_default_and_can_be_turned_off(mmi_client):
    default = mmi_client.chat.completions.create(
        model="tiny", messages=WHERE, extra_body={"return_candidates": True}
    )
    assert sum(c["count"] for c in default.model_dump()["choices"][0]["candidates"]) == 8
    off = mmi_client.chat.completions.create(
        model="tiny", messages=WHERE, temperature=0, extra_body={"mmi": False}
    )
    assert "candidates" not in off.model_dump()["choices"][0]
    assert off.choices[0].message.content == "I live in a small town."


def test_streamed_mmi_reply_arrives_once_reranked(mmi_client):
    stream = mmi_client.chat.completions.create(
        model="tiny", messages=WHERE, stream=True, seed=1,
        extra_body={"mmi": {"num_candidates": 4}, "return_candidates": True},
    )  # fmt: skip
    chunks = [c.model_dump() for c in stream]
    texts = [c["choices"][0]["delta"].get("content") for c in chunks if c["choices"]]
    texts = [t for t in texts if t]
    assert len(texts) == 1  # the whole reply in one delta
    last = chunks[-1]["choices"][0]
    assert last["finish_reason"] in ("stop", "length")
    chosen = next(c for c in last["candidates"] if c["chosen"])
    assert chosen["text"] == texts[0]


def test_mmi_requests_batched_with_plain_ones_keep_their_seeds(mmi_url):
    from concurrent.futures import ThreadPoolExecutor

    def ask(body: dict) -> str:
        base = {"model": "tiny", "messages": WHERE, "max_tokens": 10, "temperature": 1.5}
        reply = httpx.post(f"{mmi_url}/v1/chat/completions", json={**base, **body}, timeout=60)
        return reply.json()["choices"][0]["message"]["content"]

    seeded = {"seed": 11, "mmi": {"num_candidates": 3}}
    alone = ask(seeded)
    with ThreadPoolExecutor(4) as pool:
        got = list(pool.map(ask, [seeded, {"mmi": False}, seeded, {"seed": 2}]))
    assert got[0] == got[2] == alone
