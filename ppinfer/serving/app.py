"""The OpenAI-compatible HTTP API over an `Engine` (see docs/serving.md): /v1/models,
/v1/completions, /v1/chat/completions (whole or streamed as server-sent events), /health and
/metrics. Every error has OpenAI's JSON shape.

A request's tokens come from the engine's thread through `bridge.RequestEvents`; a client
that goes away cancels its request in the engine. `app.state.live` holds the requests in
flight, which `http.HttpServer` drains at shutdown.
"""

from __future__ import annotations

import asyncio
import json
import secrets
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect

from ppinfer.pipeline.intake import QueueFull, Unavailable
from ppinfer.pipeline.sequence import Finished, TokenDelta
from ppinfer.sampling.params import GenerationParams
from ppinfer.serving.bridge import SHUTDOWN, LiveRequests, RequestEvents
from ppinfer.serving.engine import Engine, PromptTooLong
from ppinfer.serving.metrics import ABANDONED, CLIENT_GONE, CONTENT_TYPE, CountRequests, ServerMetrics
from ppinfer.serving.protocol import ApiError, Endpoint, ParsedRequest, Reply, bad_request, error_body, parse_request

RETRY_AFTER_S = 1
"""The Retry-After of a 503 when the engine's queue is full."""

MAX_REQUEST_BYTES = 8 * 2**20
"""The default largest request body (`server.max_request_bytes`)."""


def create_app(
    engine: Engine, api_key: str | None, metrics: ServerMetrics, max_request_bytes: int = MAX_REQUEST_BYTES
) -> FastAPI:
    app = FastAPI(title="ppinfer", docs_url=None, redoc_url=None, openapi_url=None, redirect_slashes=False)
    app.state.live = live = LiveRequests()
    metrics.watch(engine)
    completions = _Completions(engine, live, metrics, max_request_bytes)
    created = int(time.time())

    v1 = APIRouter(prefix="/v1", dependencies=[Depends(_authorize(api_key))])

    @v1.get("/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(engine.model_id, created)]}

    @v1.get("/models/{model}")
    async def model(model: str) -> dict[str, Any]:
        if model != engine.model_id:
            raise ApiError(404, f"model={model!r}: no such model", param="model", code="model_not_found")
        return _model_card(engine.model_id, created)

    @v1.post("/completions")
    async def complete(request: Request) -> Response:
        return await completions(request, "completion")

    @v1.post("/chat/completions")
    async def chat(request: Request) -> Response:
        return await completions(request, "chat")

    @app.get("/health")
    async def health() -> JSONResponse:
        status, error = _health(engine, live)
        if status != "ok":
            return JSONResponse({"status": status, "error": error}, status_code=503)
        return JSONResponse({"status": "ok"})

    @app.get("/metrics")
    async def scrape() -> Response:
        return Response(metrics.render(), media_type=CONTENT_TYPE)

    app.include_router(v1)
    _add_error_handlers(app)
    app.add_middleware(CountRequests, metrics=metrics)
    app.add_middleware(_OneTrailingSlash)
    return app


def _health(engine: Engine, live: LiveRequests) -> tuple[str, str | None]:
    """The server's state for /health, the most serious first, and why when not "ok"."""
    failure = engine.failure()
    if failure is not None:
        return "failed", failure
    if live.draining:
        return "draining", SHUTDOWN
    if not engine.ready():
        return "loading", "the model is still loading"
    stall = engine.stall()
    if stall is not None:
        return "stalled", stall
    return "ok", None


class _OneTrailingSlash:
    """Routes `/v1/models/` as `/v1/models`: the same answer, rather than a redirect whose
    Location would be built from the client's Host header."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        path = scope.get("path", "")
        if scope["type"] == "http" and len(path) > 1 and path.endswith("/"):
            scope = dict(scope, path=path[:-1], raw_path=scope.get("raw_path", b"/").removesuffix(b"/"))
        await self.app(scope, receive, send)


def _model_card(model_id: str, created: int) -> dict[str, Any]:
    return {"id": model_id, "object": "model", "created": created, "owned_by": "ppinfer"}


def _authorize(api_key: str | None) -> Callable[[Request], None]:
    def authorize(request: Request) -> None:
        if api_key is None:
            return
        given = request.headers.get("authorization", "")
        scheme, _, token = given.partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), api_key.encode()):
            raise ApiError(401, "a valid API key is required (Authorization: Bearer <key>)", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    return authorize


def _add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, exc: HTTPException) -> JSONResponse:
        where = f"{request.method} {request.url.path}"
        message = {404: f"{where}: no such route", 405: f"{where}: method not allowed"}.get(exc.status_code, exc.detail)
        return JSONResponse(error_body(message, exc.status_code), status_code=exc.status_code, headers=exc.headers)

    @app.exception_handler(ClientDisconnect)
    async def client_gone(request: Request, exc: ClientDisconnect) -> Response:
        return Response(status_code=CLIENT_GONE)

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors())
        return JSONResponse(error_body(problems, 400), status_code=400)

    @app.exception_handler(Exception)
    async def bug(request: Request, exc: Exception) -> JSONResponse:
        return JSONResponse(error_body(f"internal error ({type(exc).__name__})", 500), status_code=500)


class _Completions:
    """POST /v1/completions and /v1/chat/completions."""

    def __init__(self, engine: Engine, live: LiveRequests, metrics: ServerMetrics, max_request_bytes: int) -> None:
        self.engine, self.live, self.metrics = engine, live, metrics
        self.max_request_bytes = max_request_bytes

    async def __call__(self, request: Request, kind: Endpoint) -> Response:
        arrived = time.monotonic()
        self._check_open()
        parsed = parse_request(kind, await _json_body(request, self.max_request_bytes), self.engine.model_id)
        prompt_ids = await self._encode(parsed)
        params = parsed.params(self.engine.defaults, len(prompt_ids), self.engine.context_length)
        events = RequestEvents(asyncio.get_running_loop(), self.metrics.timer(arrived))
        self._submit(events, prompt_ids, params, parsed)
        self.metrics.prompt_tokens.inc(len(prompt_ids))
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        reply = Reply(kind, f"{prefix}-{secrets.token_hex(12)}", int(time.time()), self.engine.model_id)
        if parsed.stream:
            return _EventStream(
                self._chunks(events, reply, parsed.include_usage), lambda: self._finish(events), request
            )
        return await self._whole(request, events, reply)

    def _check_open(self) -> None:
        failure = self.engine.failure()
        if self.live.draining or failure is not None:
            raise ApiError(503, SHUTDOWN if self.live.draining else f"the engine failed: {failure}")
        if not self.engine.ready():
            raise ApiError(503, "the model is still loading")

    async def _encode(self, parsed: ParsedRequest) -> list[int]:
        """The prompt's token ids (tokenized in a worker thread, off the event loop)."""
        field = parsed.prompt_field
        encode = self.engine.encode_prompt if parsed.kind == "completion" else self.engine.encode_chat
        try:
            return await run_in_threadpool(encode, parsed.prompt)
        except PromptTooLong as exc:
            raise bad_request(str(exc), param=field, code="context_length_exceeded") from exc
        except ValueError as exc:
            message = str(exc) if str(exc).startswith(field) else f"{field}: {exc}"
            raise bad_request(message, param=field) from exc

    def _submit(self, events: RequestEvents, prompt_ids: list[int], params: GenerationParams,
                parsed: ParsedRequest) -> None:
        if not self.live.add(events):
            raise ApiError(503, SHUTDOWN)
        try:
            events.request_id = self.engine.submit(prompt_ids, params, events.emit)
        except (ValueError, QueueFull, Unavailable) as exc:
            self.live.remove(events)
            raise self._refusal(exc, len(prompt_ids), params, parsed) from exc
        except BaseException:
            self.live.remove(events)
            raise

    def _refusal(self, exc: Exception, prompt_tokens: int, params: GenerationParams,
                 parsed: ParsedRequest) -> ApiError:
        """The answer to a request `Engine.submit` refused."""
        if isinstance(exc, QueueFull):
            return ApiError(503, f"the server is busy: {exc}", code="server_overloaded",
                            headers={"Retry-After": str(RETRY_AFTER_S)})
        if isinstance(exc, Unavailable):
            return ApiError(503, f"the engine is unavailable: {exc}")
        too_long = prompt_tokens + params.max_new_tokens > self.engine.context_length
        field = "max_tokens" if too_long and parsed.max_tokens is not None else parsed.prompt_field
        return bad_request(str(exc), param=field, code="context_length_exceeded" if too_long else None)

    def _finish(self, events: RequestEvents) -> None:
        """The request's answer is over (sent, failed or abandoned): cancel what still runs."""
        events.close()
        self.live.remove(events)
        if events.request_id is not None and not events.engine_done:
            self.engine.cancel(events.request_id)

    async def _whole(self, request: Request, events: RequestEvents, reply: Reply) -> Response:
        collect = asyncio.ensure_future(_collect(events))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collect.cancel()
            self._finish(events)
        if collect not in done:
            return Response(status_code=CLIENT_GONE)
        text, end = collect.result()
        if end.reason not in ("stop", "length"):
            raise self._ended_badly(end)
        return JSONResponse(reply.body(text, end.reason, end.prompt_tokens, end.completion_tokens))

    async def _chunks(self, events: RequestEvents, reply: Reply, include_usage: bool) -> AsyncIterator[str]:
        if reply.kind == "chat":
            yield _sse(reply.chunk(role=True))
        while True:
            event = await events.next()
            if isinstance(event, TokenDelta):
                if event.text:
                    yield _sse(reply.chunk(event.text))
                continue
            if event.reason not in ("stop", "length"):
                yield _sse(self._ended_badly(event).body())
                return
            if event.text:
                yield _sse(reply.chunk(event.text))
            yield _sse(reply.chunk(finish_reason=event.reason))
            if include_usage:
                yield _sse(reply.usage_chunk(event.prompt_tokens, event.completion_tokens))
            yield "data: [DONE]\n\n"
            return

    def _ended_badly(self, end: Finished) -> ApiError:
        """A request that ended with an error (or was cancelled by the engine): 503 when the
        server shuts down or the engine failed, else 500."""
        unavailable = self.live.draining or self.engine.failure() is not None or end.reason == "cancelled"
        return ApiError(503 if unavailable else 500, end.error or f"the request was {end.reason}")


class _EventStream(StreamingResponse):
    """Server-sent events that call `on_close` however the response ends (also when the
    client left before the first chunk); a stream its client left before the end is marked
    `ABANDONED` in the request's state, for the request counter."""

    def __init__(self, chunks: AsyncIterator[str], on_close: Callable[[], None], request: Request) -> None:
        super().__init__(self._to_the_end(chunks), media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close, self._request = on_close, request
        self._ended = False

    async def _to_the_end(self, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
        async for chunk in chunks:
            yield chunk
        self._ended = True

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            if not self._ended:
                setattr(self._request.state, ABANDONED, True)
            self._on_close()


async def _json_body(request: Request, max_bytes: int) -> Any:
    """The request's JSON body, read up to `max_bytes` (413 beyond); ClientDisconnect if the
    client leaves before sending it."""
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes:
        raise _too_large(max_bytes)
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > max_bytes:
            raise _too_large(max_bytes)
    try:
        return json.loads(body)
    except ValueError as exc:
        raise bad_request(f"the request body is not valid JSON ({exc})") from exc
    except RecursionError as exc:
        raise bad_request("the request body is not valid JSON (nested too deeply)") from exc


def _too_large(max_bytes: int) -> ApiError:
    return ApiError(413, f"the request body is larger than {max_bytes} bytes (server.max_request_bytes)",
                    code="request_too_large")


async def _collect(events: RequestEvents) -> tuple[str, Finished]:
    """A whole request's text and its end."""
    parts = []
    while True:
        event = await events.next()
        parts.append(event.text)
        if isinstance(event, Finished):
            return "".join(parts), event


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
