"""Chat messages (OpenAI's roles) as turns: what the server feeds the model."""

from __future__ import annotations

import pytest

from convcli.errors import UsageError
from convcli.inference.messages import Turns, messages_to_turns


def test_system_messages_open_the_conversation_and_are_kept():
    turns = messages_to_turns(
        [("system", "You are kind."), ("user", "Hi"), ("assistant", "Hello!"), ("user", "Tea?")]
    )
    assert turns == Turns(["You are kind.", "Hi", "Hello!", "Tea?"], keep_first=1)


def test_one_role_twice_is_one_turn_joined_as_prepare_joins_it():
    turns = messages_to_turns([("user", "Hi"), ("user", " "), ("user", "Tea?")])
    assert turns == Turns(["Hi\nTea?"], keep_first=0)  # the empty message is left out


@pytest.mark.parametrize(
    ("messages", "message"),
    [
        ([("user", "Hi"), ("system", "late")], "system messages go before the conversation"),
        ([("system", "only a persona")], "needs at least one non-empty user or assistant"),
        ([("robot", "Hi")], "must be one of system, user, assistant"),
    ],
)
def test_what_the_model_cannot_read_is_refused_naming_messages(messages, message):
    with pytest.raises(UsageError, match=message) as refused:
        messages_to_turns(messages)
    assert refused.value.params == ("messages",)
