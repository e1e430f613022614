"""Chat messages (OpenAI's roles) as the turns a conversation model reads.

- Leading `system` messages are opening turns kept through truncation, as `chat
  --context` keeps a persona (`keep_first`); a system message after the conversation
  started is refused, since the model has no place for one.
- `user` and `assistant` messages alternate as turns; two in a row from one role are
  one turn, joined by a newline as `prepare` joins them in a corpus of chat messages (the
  model only knows alternating speakers).
- Empty messages are left out: an empty turn would put two seps in a row, a layout the
  model never saw in training.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from convcli.errors import UsageError

ROLES = ("system", "user", "assistant")


@dataclass
class Turns:
    turns: list[str]
    keep_first: int
    """How many leading turns are opening turns (always kept)."""


def messages_to_turns(messages: Sequence[tuple[str, str]]) -> Turns:
    """(role, content) pairs -> turns; a `UsageError` naming `messages` if none are left."""
    opening: list[str] = []
    turns: list[str] = []
    last_role = None
    for i, (role, content) in enumerate(messages):
        if role not in ROLES:
            raise UsageError(
                f"`messages[{i}].role` must be one of {', '.join(ROLES)}, got {role!r}",
                param="messages",
            )
        text = content.strip()
        if role == "system":
            if turns:
                raise UsageError(
                    f"`messages[{i}]`: system messages go before the conversation",
                    param="messages",
                )
            if text:
                opening.append(text)
            continue
        if not text:
            continue
        if role == last_role:
            turns[-1] = f"{turns[-1]}\n{text}"
        else:
            turns.append(text)
        last_role = role
    if not turns:
        raise UsageError(
            "`messages` needs at least one non-empty user or assistant message", param="messages"
        )
    return Turns(opening + turns, len(opening))
