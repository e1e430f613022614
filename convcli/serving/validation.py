"""The chat-completions request, checked, and OpenAI's error object for every refusal.

Every 4xx the server sends, malformed JSON included, is
`{"error": {"message", "type", "param", "code"}}` as OpenAI sends it, so clients show
the message instead of failing to parse the error.
"""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictBool,
    StrictStr,
    ValidationError,
    model_validator,
)

MAX_STOP_CHARS = 256
# How pydantic names the branch of a union in an error's location (not a field).
UNION_BRANCHES = ("str", "list[str]", "list[TextPart]", "MMIRequest", "bool")


class APIError(Exception):
    """A refusal: HTTP status and OpenAI's error fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code,
        )  # fmt: skip

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


class TextPart(BaseModel):
    """One part of a message's content in OpenAI's list form (text parts only)."""

    model_config = ConfigDict(extra="ignore")

    type: Literal["text"]
    text: StrictStr


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    # "developer" is OpenAI's newer name for "system".
    role: Literal["system", "developer", "user", "assistant"]
    content: StrictStr | list[TextPart]

    @model_validator(mode="after")
    def _plain(self) -> Message:
        """Text parts joined into one string, and `developer` read as `system`, so the rest
        of the server sees one form."""
        if isinstance(self.content, list):
            self.content = "".join(part.text for part in self.content)
        if self.role == "developer":
            self.role = "system"
        return self


class StreamOptions(BaseModel):
    model_config = ConfigDict(extra="ignore")

    include_usage: StrictBool = False


class MMIRequest(BaseModel):
    """The `mmi` extension: how to rerank (unset fields take the server's defaults)."""

    model_config = ConfigDict(extra="forbid")

    num_candidates: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, gt=0)
    argmax: StrictBool | None = None


# Request fields that would change the reply, which this server does not apply, with the
# value that changes nothing: any other value is refused rather than silently ignored.
CHANGE_THE_REPLY: dict[str, object] = {"frequency_penalty": 0, "presence_penalty": 0,
                                       "repetition_penalty": 1, "logit_bias": {}}  # fmt: skip


class ChatRequest(BaseModel):
    """POST /v1/chat/completions. Fields OpenAI has that do not change the reply (user,
    logprobs, ...) are accepted and ignored, as OpenAI-compatible servers do; those that
    would (`CHANGE_THE_REPLY`) are refused unless neutral."""

    model_config = ConfigDict(extra="ignore")

    model: StrictStr | None = None
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, gt=0, le=1)
    top_k: int | None = Field(default=None, ge=0)
    n: int = Field(default=1, ge=1)
    seed: int | None = Field(default=None, ge=-(2**63), lt=2**64)  # a torch.Generator seed
    stop: StrictStr | list[StrictStr] | None = None
    stream: StrictBool = False
    stream_options: StreamOptions | None = None
    mmi: MMIRequest | StrictBool | None = None
    return_candidates: StrictBool = False

    def stop_list(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)


def _param(loc: tuple[Any, ...]) -> str | None:
    """pydantic's error location as OpenAI's `param` (`messages[0].content`)."""
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in UNION_BRANCHES or str(part).startswith("function-"):
            continue  # the branch of a union, not a field
        else:
            out += f".{part}" if out else str(part)
    return out or None


def parse_request(body: bytes) -> ChatRequest:
    """The request from the raw body, or an `APIError` 400 naming the bad field."""
    try:
        data = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise APIError(400, f"the body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the body must be a JSON object")
    for name, neutral in CHANGE_THE_REPLY.items():
        value = data.get(name)
        if value is not None and value != neutral:
            raise APIError(
                400, f"{name}: this server does not apply it (only {json.dumps(neutral)})",
                param=name,
            )  # fmt: skip
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        param = _param(tuple(first["loc"]))
        message = first["msg"]
        if first["type"] == "missing":
            message = "a required field is missing"
        raise APIError(400, f"{param}: {message}" if param else message, param=param) from None


def check_limits(
    req: ChatRequest, *, max_tokens: int, max_n: int, max_candidates: int, has_reverse: bool
) -> None:
    """Caps that depend on the server and its model."""
    for name in ("max_tokens", "max_completion_tokens"):
        value = getattr(req, name)
        if value is not None and value > max_tokens:
            raise APIError(
                400,
                f"{name}: {value} is over this model's limit of {max_tokens} new tokens",
                param=name,
            )
    if req.n > max_n:
        raise APIError(400, f"n: {req.n} is over this server's limit of {max_n}", param="n")
    if len(req.stop_list()) > 4:
        raise APIError(400, "stop: at most 4 stop strings", param="stop")
    if any(len(stop) > MAX_STOP_CHARS for stop in req.stop_list()):
        # Each streamed token is checked against every prefix of every stop string.
        raise APIError(
            400, f"stop: a stop string is at most {MAX_STOP_CHARS} characters", param="stop"
        )
    mmi = req.mmi
    if isinstance(mmi, MMIRequest) or mmi is True:
        if not has_reverse:
            raise APIError(
                400, "mmi: this server has no reverse model to rerank with",
                param="mmi",
            )  # fmt: skip
        count = mmi.num_candidates if isinstance(mmi, MMIRequest) else None
        if count is not None and count > max_candidates:
            raise APIError(
                400,
                f"mmi.num_candidates: {count} is over this server's limit of {max_candidates}",
                param="mmi.num_candidates",
            )
    if req.return_candidates and (mmi is False or not has_reverse):
        raise APIError(
            400, "return_candidates: candidates exist only with MMI (a reverse model)",
            param="return_candidates",
        )  # fmt: skip
