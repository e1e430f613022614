"""Role-tagged messages into turns: what chat messages, ShareGPT and tables of structs share.

A system message is an opening context turn; only the assistant's turns are trained
(weight 1, and they are the replies), so `train --train-on responses` learns the
assistant's voice from the per-token flags prepare stores.
"""

from __future__ import annotations

from typing import Any

from convcli.data.readers.base import BadRecord, ReadOptions, Record, Role, check_turns


def role_turns(
    messages: Any,
    *,
    key: str,
    role_key: str,
    text_key: str,
    roles: dict[str, Role],
    source: str,
    line: int,
    options: ReadOptions,
    system: Any = None,
    unit: str = "line",
) -> Record:
    """A dialogue of role-tagged messages (`[{role_key: ..., text_key: ...}]` under `key`).

    Turns of one role in a row are joined with a newline (`same_role="join"`) or kept
    apart ("split"); either way they are counted. Weights: assistant turns 1, others 0;
    an OpenAI-style `weight` (0 or 1) on a message overrides its turn's weight.
    """

    def bad(reason: str, message: str) -> BadRecord:
        return BadRecord(reason, message, source, line, unit)

    if not isinstance(messages, list) or not messages:
        return bad("not-turns", f'expected an object with a non-empty "{key}" array')
    turns: list[str] = []
    kinds: list[Role] = []
    weights: list[float] = []
    same = 0
    if isinstance(system, str) and system.strip():  # ShareGPT's record-level system prompt
        turns, kinds, weights = [system.strip()], ["system"], [0.0]
    for i, message in enumerate(messages, 1):
        if not isinstance(message, dict):
            return bad("not-turns", f"message {i} is not an object")
        name = message.get(role_key)
        if name is None:
            return bad("no-role", f'message {i} has no "{role_key}"')
        role = roles.get(name) if isinstance(name, str) else None
        if role is None:
            known = ", ".join(sorted(roles))
            return bad("unknown-role", f"message {i}: unknown {role_key} {name!r} (known: {known})")
        text = message.get(text_key)
        if not isinstance(text, str):
            what = "has no" if text is None else "has a non-string"
            return bad("not-text", f'message {i} {what} "{text_key}"')
        if not text.strip():
            return bad("empty-turn", f"message {i} is empty")
        weight = 1.0 if role == "assistant" else 0.0
        if role == "assistant" and message.get("weight") in (0, 1):
            weight = float(message["weight"])
        if kinds and kinds[-1] == role:
            same += 1
            if options.same_role == "join":
                turns[-1] += "\n" + text.strip()
                weights[-1] = max(weights[-1], weight)
                continue
        turns.append(text.strip())
        kinds.append(role)
        weights.append(weight)
    return check_turns(turns, weights, source, line, kinds, same, unit, options.min_turns)
