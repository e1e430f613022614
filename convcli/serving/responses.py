"""OpenAI's chat-completion objects for one request: the response, and the stream's chunks."""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

from convcli.inference.rows import Choice, RowResult
from convcli.serving.validation import ChatRequest


class Reply:
    """OpenAI's response and chunk objects for one request (one id, one `created`)."""

    def __init__(self, model: str, req: ChatRequest) -> None:
        self.id = f"chatcmpl-{uuid.uuid4().hex[:24]}"
        self.created = int(time.time())
        self.model = model
        self.req = req

    def _head(self, obj: str) -> dict[str, Any]:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.model,
                "system_fingerprint": None}  # fmt: skip

    @staticmethod
    def usage(result: RowResult) -> dict[str, int]:
        return {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        }

    def candidates(self, choice: Choice) -> dict[str, Any]:
        if not (self.req.return_candidates and choice.candidates):
            return {}
        return {
            "candidates": [
                {**c.to_dict(), "chosen": i == choice.chosen}
                for i, c in enumerate(choice.candidates)
            ]
        }

    def completion(self, result: RowResult) -> dict[str, Any]:
        choices = [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
                **self.candidates(c),
            }
            for i, c in enumerate(result.choices)
        ]
        return {**self._head("chat.completion"), "choices": choices, "usage": self.usage(result)}

    def chunk(self, choices: list[dict[str, Any]], **extra: Any) -> str:
        body = {**self._head("chat.completion.chunk"), "choices": choices, **extra}
        return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"

    def delta(self, index: int, delta: dict[str, Any], finish: str | None = None, **x: Any) -> str:
        return self.chunk(
            [{"index": index, "delta": delta, "finish_reason": finish, "logprobs": None, **x}]
        )
