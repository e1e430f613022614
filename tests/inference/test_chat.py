from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from convcli.errors import InputError
from convcli.inference.chat import (
    ChatSession,
    Response,
    Transcript,
    load_transcript,
    make_responder,
)
from convcli.inference.mmi import Candidate
from convcli.inference.model import ConversationModel


class FakeModel:
    """Records each context it is asked about and answers with a numbered reply."""

    def __init__(self) -> None:
        self.calls: list[tuple[list[str], int]] = []

    def __call__(self, context: list[str], keep_first: int) -> Response:
        self.calls.append((list(context), keep_first))
        n = len(self.calls)
        return Response(
            text=f"reply {n}",
            candidates=[Candidate(f"reply {n}", -1.0, [1]), Candidate("other", -2.5, [2], 3)],
            chosen=0,
            new_tokens=7,
            seconds=0.5,
        )


def events(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_history_commands_and_opening_turns():
    fake = FakeModel()
    session = ChatSession(fake, opening=["I am a bot."])
    assert session.handle("   ").text is None and not fake.calls  # empty lines are ignored
    assert session.handle("Hello").text == "reply 1"
    assert session.handle("How are you?").text == "reply 2"
    assert fake.calls[-1] == (["I am a bot.", "Hello", "reply 1", "How are you?"], 1)
    assert session.handle("/reset").notes == ["(new conversation)"]
    session.handle("Again")
    assert fake.calls[-1] == (["I am a bot.", "Again"], 1)
    assert session.handle("//slash text").text == "reply 4"
    assert fake.calls[-1][0][-1] == "/slash text"
    assert "unknown command /nope" in session.handle("/nope").notes[0]
    assert "/candidates" in session.handle("/help").notes[0]
    assert session.handle("/quit").quit and session.handle("/EXIT").quit


def test_an_empty_reply_stays_out_of_the_history():
    contexts: list[list[str]] = []
    replies = iter(["", "reply"])

    def respond(context: list[str], keep_first: int) -> Response:
        contexts.append(list(context))
        return Response(next(replies))

    session = ChatSession(respond)
    assert session.handle("Hello").text == ""
    session.handle("Anyone?")
    assert contexts[-1] == ["Hello", "Anyone?"]  # no empty turn between them


def test_candidates_are_shown_on_request_and_every_turn():
    session = ChatSession(FakeModel())
    assert "no candidates" in session.handle("/candidates").notes[0]
    session.handle("Hello")
    shown = session.handle("/candidates").notes
    assert shown[1].startswith(" *") and "reply 1" in shown[1]
    assert "-2.500" in shown[2] and shown[2].endswith("other (x3)")  # sampled 3 times
    every = ChatSession(FakeModel(), show_candidates=True, verbose=True)
    notes = every.handle("Hello").notes
    assert any("other" in n for n in notes)
    assert notes[-1] == "turn 1: 7 tokens in 0.50 s (14.0 tokens/s)"


def test_transcript_is_written_as_it_happens_and_resumes(tmp_path):
    path = tmp_path / "chat.jsonl"
    log = Transcript(path)
    log.write("start", context=["Persona."])
    session = ChatSession(FakeModel(), opening=["Persona."], transcript=log)
    session.handle("Hello")
    # Flushed: readable while the session is still open.
    assert [e["event"] for e in events(path)] == ["start", "turn"]
    session.handle("/reset")
    session.handle("こんにちは")
    session.handle("More")
    log.close()
    recorded = events(path)
    assert [e["event"] for e in recorded] == ["start", "turn", "reset", "turn", "turn"]
    assert recorded[3]["user"] == "こんにちは"
    assert recorded[3]["candidates"][1] == {"text": "other", "score": -2.5, "count": 3}

    state = load_transcript(path)
    assert state.opening == ["Persona."]
    assert state.history == ["こんにちは", "reply 2", "More", "reply 3"]
    fake = FakeModel()
    resumed = ChatSession(fake, opening=state.opening, history=state.history)
    resumed.handle("Next")
    assert fake.calls[0][0] == ["Persona.", "こんにちは", "reply 2", "More", "reply 3", "Next"]


def test_a_resume_with_a_new_persona_is_remembered(tmp_path):
    path = tmp_path / "t.jsonl"
    lines = [
        {"event": "start", "context": ["I am old."]},
        {"event": "turn", "user": "Hi", "bot": "Hello"},
        {"event": "resume", "context": ["I am new."]},
        {"event": "turn", "user": "Again", "bot": ""},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    state = load_transcript(path)
    assert state.opening == ["I am new."]
    assert state.history == ["Hi", "Hello", "Again"]  # an empty reply is not a turn


def test_a_half_written_last_line_is_ignored_but_a_bad_line_is_an_error(tmp_path):
    path = tmp_path / "chat.jsonl"
    good = json.dumps({"event": "turn", "user": "a", "bot": "b"})
    path.write_text(good + "\n" + '{"event": "turn", "us', encoding="utf-8")
    assert load_transcript(path).history == ["a", "b"]
    path.write_text("not json\n" + good + "\n", encoding="utf-8")
    with pytest.raises(InputError, match=r"chat\.jsonl:1:"):
        load_transcript(path)


def test_responder_keeps_the_opening_turns_within_the_history_budget(tiny_model_dir):
    model = ConversationModel.from_pretrained(tiny_model_dir, device="cpu")
    seen: list[torch.Tensor] = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True
    )
    opening = ["You are a friendly tea lover."]
    history = [f"message {i} about tea" for i in range(10)]
    op, *msgs = (len(t) for t in model.tokenizer.encode_turns([opening[0], *history]))
    budget = 1 + (op + 1) + (msgs[-1] + 1) + (msgs[-2] + 1)  # room for two messages
    respond = make_responder(model, max_history_tokens=budget, max_new_tokens=2)
    respond([*opening, *history], 1)
    kept = model.tokenizer.decode_turns(seen[0][0].tolist())
    assert kept == [opening[0], *history[-2:]]
    assert seen[0].shape[1] == budget


def test_a_huge_message_is_cut_to_its_end_to_fit(tiny_model_dir):
    model = ConversationModel.from_pretrained(tiny_model_dir, device="cpu")
    seen: list[torch.Tensor] = []
    model.model.register_forward_pre_hook(
        lambda m, a, kw: seen.append(kw["input_ids"]), with_kwargs=True
    )
    message = "tea " * 3000 + "Where do you live?"
    options = {"max_new_tokens": 4, "do_sample": True, "seed": 0}
    response = make_responder(model, **options)([message], 0)
    # The model saw one turn: the message's last tokens, as many as fit its positions
    # with room for the reply (so the question at its end is what gets answered).
    sep, budget = model.tokenizer.sep_token_id, model.model.config.n_positions - 4
    tail = model.tokenizer.encode(message)[-(budget - 2) :]
    assert seen[0][0].tolist() == [sep, *tail, sep]
    assert model.tokenizer.decode(tail).endswith("tea tea Where do you live?")
    # ... and the reply is the one `generate` gives for that message.
    expected = model.generate([message], return_token_ids=True, **options)
    assert (response.text, response.new_tokens) == (expected.text, len(expected.token_ids[0]))
    assert 1 <= response.new_tokens <= 4
