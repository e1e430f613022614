"""MMI through the OpenAI client's extra_body: reranked replies and their candidates."""

from __future__ import annotations

import httpx

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
