"""The FastAPI app: OpenAI's chat completions, /v1/models, /health and the chat page.

A thin face on the core: a request is checked (`validation`), its messages become turns
(`inference.messages`), and it joins the next batch of the one worker thread that owns
the model (`batching`). Models load in a background thread once the server is up, so
/health answers 503 until they are ready.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import threading
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from importlib import resources
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from convcli.errors import ConvcliError
from convcli.inference.messages import messages_to_turns
from convcli.inference.rows import MMIOptions, RowRequest, RowResult
from convcli.inference.settings import CHAT_SAMPLING, MMISettings, SamplingSettings
from convcli.serving.batching import Batcher
from convcli.serving.responses import Reply
from convcli.serving.settings import ServeSettings
from convcli.serving.validation import (
    APIError,
    ChatRequest,
    MMIRequest,
    check_limits,
    parse_request,
)

if TYPE_CHECKING:
    from convcli.inference.mmi import MMIReranker
    from convcli.inference.model import ConversationModel

Loader = Callable[[], "tuple[ConversationModel, MMIReranker | None]"]
# transformers builds models under process-wide init contexts (meta device, patched
# constructors): two loads at once in one process break each other, so apps take turns.
_LOADING = threading.Lock()


@dataclass
class State:
    """What the routes share: the settings, and the models once loaded."""

    name: str
    serve: ServeSettings
    sampling: SamplingSettings
    mmi: MMISettings
    batcher: Batcher | None = None
    error: str | None = None
    created: int = field(default_factory=lambda: int(time.time()))

    @property
    def model(self) -> ConversationModel:
        assert self.batcher is not None
        return self.batcher.model

    def max_new_tokens(self) -> int:
        """The largest reply this model has room for (`plan_lengths` keeps a quarter for
        the context)."""
        n = self.model.n_positions
        return n - max(3, n // 4)


def create_app(
    load: Loader,
    *,
    name: str,
    serve: ServeSettings | None = None,
    sampling: SamplingSettings | None = None,
    mmi: MMISettings | None = None,
    on_load_error: Callable[[str], None] | None = None,
) -> FastAPI:
    """The app; `load()` runs in a background thread at startup and returns the models."""
    from contextlib import asynccontextmanager

    state = State(name, serve or ServeSettings(), sampling or CHAT_SAMPLING, mmi or MMISettings())

    def load_in_background() -> None:
        try:
            with _LOADING:
                forward, reranker = load()
        except Exception as exc:  # shown on /health and to whoever started the server
            state.error = str(exc) if isinstance(exc, ConvcliError) else repr(exc)
            if on_load_error is not None:
                on_load_error(state.error)
            return
        state.batcher = Batcher(
            forward, reranker,
            window=state.serve.batch_window_ms / 1000, max_rows=state.serve.max_batch_rows,
        )  # fmt: skip

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        loader = threading.Thread(target=load_in_background, name="convcli-load", daemon=True)
        loader.start()
        yield
        # A load still running would go on after the app is gone (and hold _LOADING).
        await asyncio.to_thread(loader.join)
        if state.batcher is not None:
            state.batcher.close()

    app = FastAPI(title="convcli", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.convcli = state
    if state.serve.api_key:
        app.add_middleware(_RequireKey, key=state.serve.api_key)
    if state.serve.cors_origin:  # added last: outermost, so a 401 carries CORS headers too
        from fastapi.middleware.cors import CORSMiddleware

        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(state.serve.cors_origin),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", "Content-Type"],
        )

    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        error = APIError(exc.status_code, str(exc.detail), type="invalid_request_error")
        return JSONResponse(error.body(), status_code=exc.status_code)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        # A bug, not the client's fault: still an error object, so clients can show it.
        error = APIError(500, f"internal error: {type(exc).__name__}", type="server_error")
        return JSONResponse(error.body(), status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        if state.batcher is None:
            status = {"status": "error", "error": state.error} if state.error else {
                "status": "loading"}  # fmt: skip
            return JSONResponse(status, status_code=503)
        mmi = state.batcher.reranker is not None
        return JSONResponse({"status": "ok", "model": state.name, "mmi": mmi})

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(state)]}

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str) -> dict[str, Any]:
        if model_id != state.name:
            raise APIError(404, f"no model {model_id!r} here", param="model",
                           code="model_not_found")  # fmt: skip
        return _model_card(state)

    @app.get("/", response_class=HTMLResponse)
    async def page() -> HTMLResponse:
        html = resources.files("convcli.serving").joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        if state.batcher is None:
            raise APIError(503, "the model is still loading", type="server_error")
        req = parse_request(await _read_body(request, state.serve.max_body_bytes))
        if req.model not in (None, "", state.name):
            raise APIError(404, f"model {req.model!r} is not served here (try {state.name!r})",
                           param="model", code="model_not_found")  # fmt: skip
        check_limits(
            req, max_tokens=state.max_new_tokens(), max_n=state.serve.max_n,
            max_candidates=state.serve.max_candidates,
            has_reverse=state.batcher.reranker is not None,
        )  # fmt: skip
        row = _row_request(req, state)
        reply = Reply(state.name, req)
        if req.stream:
            return await _stream(request, state, row, reply)
        result = await _answer(request, state, row)
        return JSONResponse(reply.completion(result))

    return app


class _RequireKey:
    """`Authorization: Bearer KEY` on /v1/ (401 otherwise). A plain ASGI middleware:
    starlette's `BaseHTTPMiddleware` would hide a client's disconnect from the routes."""

    def __init__(self, app: Any, key: str) -> None:
        self.app, self.expected = app, f"Bearer {key}".encode()

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        if (
            scope["type"] == "http"
            and scope["path"].startswith("/v1/")
            and scope["method"] != "OPTIONS"
        ):
            given = dict(scope["headers"]).get(b"authorization", b"")
            if not secrets.compare_digest(given, self.expected):
                error = APIError(
                    401, "missing or wrong API key (send Authorization: Bearer KEY)",
                    type="authentication_error", code="invalid_api_key",
                )  # fmt: skip
                await JSONResponse(error.body(), status_code=401)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def _model_card(state: State) -> dict[str, Any]:
    return {"id": state.name, "object": "model", "created": state.created, "owned_by": "convcli"}


async def _read_body(request: Request, limit: int) -> bytes:
    """The body, refused with 413 past `limit` bytes (before reading it, when it says so)."""
    declared = request.headers.get("content-length")
    too_big = APIError(413, f"the body is over this server's limit of {limit} bytes",
                       code="request_too_large")  # fmt: skip
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise too_big
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_big
    return bytes(body)


def _row_request(req: ChatRequest, state: State) -> RowRequest:
    """The core's request: turns, the sampling asked for over the server's defaults, MMI."""
    try:
        conversation = messages_to_turns([(m.role, m.content) for m in req.messages])
    except ConvcliError as exc:
        raise _as_api_error(exc) from None
    s = state.sampling
    temperature = req.temperature if req.temperature is not None else (s.temperature or 1.0)
    mmi = None
    reranker = state.batcher.reranker if state.batcher else None
    if reranker is not None and req.mmi is not False:
        asked = req.mmi if isinstance(req.mmi, MMIRequest) else MMIRequest()
        d = state.mmi
        mmi = MMIOptions(
            num_candidates=asked.num_candidates or d.num_candidates,
            temperature=asked.temperature or d.mmi_temperature,
            argmax=asked.argmax if asked.argmax is not None else d.mmi_argmax,
        )
    return RowRequest(
        conversation.turns,
        keep_first=conversation.keep_first,
        n=req.n,
        max_new_tokens=req.max_completion_tokens or req.max_tokens or s.max_new_tokens,
        do_sample=s.do_sample is not False,
        temperature=temperature,
        top_k=req.top_k if req.top_k is not None else (s.top_k or 0),
        top_p=req.top_p if req.top_p is not None else (s.top_p or 1.0),
        seed=req.seed if req.seed is not None else s.seed,
        stop=req.stop_list(),
        mmi=mmi,
        cancelled=threading.Event(),
    )


def _as_api_error(exc: ConvcliError) -> APIError:
    """A core error (it names Python parameters in backquotes) as a 400."""
    message = str(exc).replace("`", "")
    return APIError(400, message, param=exc.params[0] if exc.params else None)


async def _wait(request: Request, future: asyncio.Future[Any], row: RowRequest, timeout: float):
    """The future's result; the row is cancelled if the client leaves or time runs out."""
    deadline = time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        done, _ = await asyncio.wait({future}, timeout=max(0.0, min(0.25, left)))
        if done:
            return future.result()
        if left <= 0:
            assert row.cancelled is not None
            row.cancelled.set()
            raise APIError(504, f"the reply took over {timeout:g} s", type="timeout",
                           code="timeout")  # fmt: skip
        if await request.is_disconnected():
            assert row.cancelled is not None
            row.cancelled.set()
            raise APIError(499, "the client went away")


async def _answer(request: Request, state: State, row: RowRequest) -> RowResult:
    assert state.batcher is not None
    future = asyncio.wrap_future(state.batcher.submit(row))
    result: RowResult = await _wait(request, future, row, state.serve.request_timeout)
    if result.error is not None:
        raise _as_api_error(result.error)
    return result


async def _stream(request: Request, state: State, row: RowRequest, reply: Reply) -> Response:
    """Server-sent events: a role chunk per choice, token deltas as they come, a finish
    chunk per choice, usage if asked, then `data: [DONE]`. A client that goes away
    cancels its rows."""
    assert state.batcher is not None and row.cancelled is not None
    loop = asyncio.get_running_loop()
    events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
    row.on_start = lambda: loop.call_soon_threadsafe(events.put_nowait, ("start", None))
    row.on_text = lambda i, text: loop.call_soon_threadsafe(events.put_nowait, ("text", (i, text)))
    future = state.batcher.submit(row)
    future.add_done_callback(lambda f: loop.call_soon_threadsafe(events.put_nowait, ("done", f)))
    deadline = time.monotonic() + state.serve.request_timeout

    async def next_event() -> tuple[str, Any]:
        left = deadline - time.monotonic()
        try:
            return await asyncio.wait_for(events.get(), timeout=max(0.0, left))
        except asyncio.TimeoutError:
            row.cancelled.set()
            raise APIError(504, "timeout", type="timeout", code="timeout") from None

    # Until the request is accepted, a refusal is still an ordinary 4xx response.
    while True:
        kind, value = await _watch(request, row, next_event())
        if kind == "start":
            break
        if kind == "done":
            if value.cancelled():
                raise APIError(499, "the client went away")
            result = value.result()
            if result.error is not None:
                raise _as_api_error(result.error)
            break  # done at once (cannot happen without a start, but harmless)

    async def body() -> AsyncIterator[str]:
        finished = False
        try:
            for i in range(reply.req.n):
                yield reply.delta(i, {"role": "assistant", "content": ""})
            while True:
                try:
                    kind, value = await next_event()
                except APIError as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                if kind == "text":
                    i, text = value
                    yield reply.delta(i, {"content": text})
                elif kind == "done":
                    try:
                        result: RowResult = value.result()
                    except Exception as exc:  # a bug: an error event, as `bug` gives a 500
                        name = type(exc).__name__
                        error = APIError(500, f"internal error: {name}", type="server_error")
                        yield f"data: {json.dumps(error.body())}\n\n"
                        return
                    for i, c in enumerate(result.choices):
                        yield reply.delta(i, {}, c.finish_reason, **reply.candidates(c))
                    options = reply.req.stream_options
                    if options is not None and options.include_usage:
                        yield reply.chunk([], usage=reply.usage(result))
                    yield "data: [DONE]\n\n"
                    finished = True
                    return
        finally:
            if not finished:
                row.cancelled.set()  # the client left mid-stream: stop decoding its rows

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache"})  # fmt: skip


async def _watch(request: Request, row: RowRequest, awaitable: Any) -> Any:
    """Await while checking that the client is still there."""
    task = asyncio.ensure_future(awaitable)
    while True:
        done, _ = await asyncio.wait({task}, timeout=0.25)
        if done:
            return task.result()
        if await request.is_disconnected():
            task.cancel()
            assert row.cancelled is not None
            row.cancelled.set()
            raise APIError(499, "the client went away")
