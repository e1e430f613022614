"""generate_rows: many requests, one decoding loop, each with its own seed, stops and stream."""

from __future__ import annotations

import threading

import pytest

from convcli.inference.mmi import MMIReranker
from convcli.inference.model import ConversationModel
from convcli.inference.rows import MMIOptions, RowRequest, generate_rows


@pytest.fixture(scope="module")
def pair(trained) -> tuple[ConversationModel, ConversationModel]:
    return tuple(ConversationModel.from_pretrained(p, device="cpu") for p in trained)


GREEDY = {"do_sample": False}


def test_greedy_rows_match_generate_one_at_a_time(pair):
    forward, _ = pair
    contexts = [["Hello"], ["Where do you live?"], ["Do you like tea?", "Yes, I like green tea."]]
    results = generate_rows(forward, [RowRequest(c, **GREEDY) for c in contexts])
    for context, result in zip(contexts, results, strict=True):
        alone = forward.generate(context, do_sample=False, return_token_ids=True)
        assert result.choices[0].text == alone.text
        assert result.choices[0].tokens == len(alone.token_ids[0])
        assert result.prompt_tokens == alone.context_lengths[0]
        assert result.choices[0].finish_reason == "stop"  # it ended at its sep
    assert results[0].choices[0].text == "Hi, how are you?"


def test_a_seed_gives_the_same_reply_whatever_shares_the_batch(pair):
    forward, _ = pair
    sample = {"temperature": 3.0, "max_new_tokens": 12}
    alone = generate_rows(forward, [RowRequest(["Hello"], seed=5, n=3, **sample)])[0]
    crowd = [RowRequest(["Good morning"], seed=s, **sample) for s in range(4)]
    mixed = generate_rows(forward, [*crowd[:2], RowRequest(["Hello"], seed=5, n=3, **sample),
                                    *crowd[2:]])  # fmt: skip
    texts = [c.text for c in alone.choices]
    assert [c.text for c in mixed[2].choices] == texts
    assert len(set(texts)) > 1  # hot sampling: the three replies differ
    other = generate_rows(forward, [RowRequest(["Hello"], seed=6, n=3, **sample)])[0]
    assert [c.text for c in other.choices] != texts


def test_top_k_holds_beside_a_request_without_it(pair):
    """top_k=1 is greedy however hot, also in a batch whose other request samples freely."""
    forward, _ = pair
    hot = {"temperature": 5.0, "max_new_tokens": 12}
    free = [RowRequest(["Good morning"], seed=s, top_k=0, top_p=1.0, **hot) for s in range(3)]
    strict = RowRequest(["Hello"], seed=1, n=2, top_k=1, top_p=1.0, **hot)
    results = generate_rows(forward, [*free, strict])
    assert [c.text for c in results[-1].choices] == ["Hi, how are you?"] * 2


def test_stop_string_is_left_out_and_finish_reasons_are_truthful(pair):
    forward, _ = pair
    stop, length, plain = generate_rows(forward, [
        RowRequest(["Hello"], stop=[", how"], **GREEDY),
        RowRequest(["Hello"], max_new_tokens=2, **GREEDY),
        RowRequest(["Hello"], **GREEDY),
    ])  # fmt: skip
    assert plain.choices[0].text == "Hi, how are you?"
    assert (stop.choices[0].text, stop.choices[0].finish_reason) == ("Hi", "stop")
    assert length.choices[0].finish_reason == "length"
    assert length.choices[0].tokens == length.completion_tokens == 2
    assert "Hi, how are you?".startswith(length.choices[0].text)


def test_streamed_deltas_join_to_the_final_text(pair):
    forward, _ = pair
    seen: dict[int, list[str]] = {0: [], 1: []}
    req = RowRequest(
        ["Do you like tea?"], n=2, seed=1, temperature=1.5, stop=["tea"],
        on_text=lambda i, delta: seen[i].append(delta),
    )  # fmt: skip
    (result,) = generate_rows(forward, [req])
    for i, choice in enumerate(result.choices):
        assert "".join(seen[i]) == choice.text
        assert "tea" not in choice.text
    greedy: list[str] = []
    generate_rows(forward, [RowRequest(["Hello"], on_text=lambda i, d: greedy.append(d), **GREEDY)])
    assert len(greedy) > 1 and "".join(greedy) == "Hi, how are you?"  # token by token


def test_a_cancelled_request_stops_decoding_and_the_others_finish(pair):
    forward, _ = pair
    cancel = threading.Event()
    first = RowRequest(["Hello"], max_new_tokens=40, temperature=5.0, seed=0,
                       on_text=lambda i, d: cancel.set(), cancelled=cancel)  # fmt: skip
    other = RowRequest(["Hello"], **GREEDY)
    gone, done = generate_rows(forward, [first, other])
    assert gone.choices[0].finish_reason == "cancelled"
    assert gone.completion_tokens < 40
    assert done.choices[0].text == "Hi, how are you?"
    # Alone, a cancelled request ends the loop at once.
    cancel2 = threading.Event()
    cancel2.set()
    (alone,) = generate_rows(forward, [RowRequest(["Hello"], max_new_tokens=40, cancelled=cancel2)])
    assert alone.choices[0].finish_reason == "cancelled" and alone.completion_tokens == 0


def test_mmi_reranks_each_request_from_its_own_candidates(pair):
    forward, reverse = pair
    reranker = MMIReranker(forward, reverse)
    mmi = RowRequest(["Where do you live?"], mmi=MMIOptions(num_candidates=5, argmax=True),
                     temperature=2.0, seed=2, max_new_tokens=12)  # fmt: skip
    plain = RowRequest(["Hello"], **GREEDY)
    got, other = generate_rows(forward, [mmi, plain], reranker)
    choice = got.choices[0]
    assert sum(c.count for c in choice.candidates) == 5
    assert len({tuple(c.token_ids) for c in choice.candidates}) == len(choice.candidates)
    scores = [c.score if c.text else float("-inf") for c in choice.candidates]
    best = scores.index(max(scores))
    assert choice.chosen == best and choice.text == choice.candidates[best].text
    assert got.completion_tokens == sum(len(c.token_ids) * c.count for c in choice.candidates)
    assert other.choices[0].text == "Hi, how are you?" and not other.choices[0].candidates
    again = generate_rows(forward, [mmi], reranker)[0].choices[0]
    assert [c.text for c in again.candidates] == [c.text for c in choice.candidates]


def test_a_bad_request_gets_its_own_error_and_the_others_are_answered(pair):
    forward, _ = pair
    bad = RowRequest(["Hello"], mmi=MMIOptions())  # no reverse model loaded
    empty = RowRequest([])
    good = RowRequest(["Hello"], **GREEDY)
    r_bad, r_empty, r_good = generate_rows(forward, [bad, empty, good])
    assert r_bad.error is not None and "`mmi`" in str(r_bad.error)
    assert r_empty.error is not None and not r_empty.choices
    assert r_good.error is None and r_good.choices[0].text == "Hi, how are you?"


def test_opening_turns_are_kept_when_old_turns_are_cut(pair):
    forward, _ = pair
    persona = "My name is Tiny."
    history = ["Where do you live?", "I live in a small town.", "Is it nice?"] * 4
    req = RowRequest([persona, *history], keep_first=1, max_context_tokens=40, **GREEDY)
    (result,) = generate_rows(forward, [req])
    fitted = forward.encode_contexts([[persona, *history]], 40, keep_first=1)[0]
    assert fitted[0] == forward.tokenizer.encode(persona)
    assert result.prompt_tokens == sum(len(t) + 1 for t in fitted) + 1 <= 40


def test_top_k_and_top_p_narrow_the_draw(pair):
    forward, _ = pair
    hot = {"temperature": 3.0, "max_new_tokens": 12}
    narrow = [RowRequest(["Hello"], top_k=1, seed=s, **hot) for s in range(3)]
    narrow += [RowRequest(["Hello"], top_p=1e-6, seed=s, **hot) for s in range(3)]
    wide = [RowRequest(["Hello"], seed=s, **hot) for s in range(3)]
    results = generate_rows(forward, [*narrow, *wide])
    texts = [r.choices[0].text for r in results]
    assert texts[:6] == ["Hi, how are you?"] * 6  # only the likeliest token can be drawn
    assert len(set(texts[6:])) > 1


def test_ct2_a_cancelled_request_stops_at_its_first_token(trained, tmp_path, monkeypatch) -> None:
    """On the ctranslate2 backend, a client that went away: its rows end at the next
    token the engine hands over."""
    pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")
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


def test_ct2_unseeded_requests_share_an_engine_call_and_seeded_ones_get_their_own(
    trained, tmp_path, monkeypatch
) -> None:
    pytest.importorskip("ctranslate2", reason="the ctranslate2 backend is an optional extra")
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
