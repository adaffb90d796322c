"""The OpenAI-compatible HTTP API over an `Engine` (see docs/serving.md): /v1/models,
/v1/completions, /v1/chat/completions (whole or streamed as server-sent events), /health and
/metrics. Every error has OpenAI's JSON shape.

A request's tokens come from the engine's thread through `bridge.RequestEvents`; a client
that goes away cancels its request in the engine. `app.state.live` holds the requests in
flight, which `http.HttpServer` drains at shutdown.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
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
from ppinfer.pipeline.sequence import Finished
from ppinfer.sampling.params import GenerationParams
from ppinfer.serving.bridge import SHUTDOWN, LiveRequests, RequestEvents
from ppinfer.serving.engine import Engine, PromptTooLong
from ppinfer.serving.metrics import ABANDONED, CLIENT_GONE, CONTENT_TYPE, CountRequests, ServerMetrics
from ppinfer.serving.protocol import ApiError, Endpoint, ParsedRequest, bad_request, error_body, parse_request
from ppinfer.serving.responses import Choice, Reply
from ppinfer.serving.tools import ToolDeltas, tool_grammar

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
        parsed = self._with_tool_grammar(
            parse_request(kind, await _json_body(request, self.max_request_bytes), self.engine.model_id))
        prompts = [await self._encode(parsed, i, prompt) for i, prompt in enumerate(parsed.prompts)]
        params = [self._params(parsed, ids) for ids in prompts]
        choices = [
            Choice(i * parsed.n + j, self._echoed(parsed, i) if parsed.echo else "", tuple(ids))
            for i, ids in enumerate(prompts) for j in range(parsed.n)
        ]
        events = RequestEvents(asyncio.get_running_loop(), [self.metrics.timer(arrived) for _ in choices])
        self._submit(events, prompts, params, parsed)
        prompt_tokens = sum(len(ids) for ids in prompts)
        self.metrics.prompt_tokens.inc(prompt_tokens)
        prefix = "chatcmpl" if kind == "chat" else "cmpl"
        calls = parsed.tools is not None and parsed.tools.offered is not None
        reply = Reply(kind, f"{prefix}-{secrets.token_hex(12)}", int(time.time()), self.engine.model_id,
                      self.engine.token_bytes, logprobs=parsed.logprobs is not None,
                      tools=self.engine.tool_syntax if calls else None,
                      most_calls=parsed.tools.most_calls if parsed.tools is not None else None)
        if parsed.stream:
            return _EventStream(
                self._chunks(events, reply, choices, prompt_tokens, parsed.include_usage),
                lambda: self._finish(events), request,
            )
        return await self._whole(request, events, reply, choices, prompt_tokens)

    def _with_tool_grammar(self, parsed: ParsedRequest) -> ParsedRequest:
        """`parsed` with the grammar of its tool choice (required or a named function)."""
        if parsed.tools is None:
            return parsed
        grammar = tool_grammar(self.engine.tool_syntax, parsed.tools, self.engine.control_token)
        if grammar is None:
            return parsed
        return dataclasses.replace(parsed, overrides={**parsed.overrides, "grammar": grammar})

    def _check_open(self) -> None:
        failure = self.engine.failure()
        if self.live.draining or failure is not None:
            raise ApiError(503, SHUTDOWN if self.live.draining else f"the engine failed: {failure}")
        if not self.engine.ready():
            raise ApiError(503, "the model is still loading")

    async def _encode(self, parsed: ParsedRequest, index: int, prompt: Any) -> list[int]:
        """A prompt's token ids (text is tokenized in a worker thread, off the event loop)."""
        field = parsed.prompt_field
        if isinstance(prompt, list) and parsed.kind == "completion":
            vocab = self.engine.vocab_size
            bad = next((i for i in prompt if not 0 <= i < vocab), None)
            if bad is not None:
                where = f"prompt[{index}]" if len(parsed.prompts) > 1 else "prompt"
                raise bad_request(f"{where}: token id {bad} is outside the vocabulary (0..{vocab - 1})", param=field)
            return list(prompt)
        if parsed.kind == "completion":
            encode: Callable[[Any], list[int]] = self.engine.encode_prompt
        else:
            encode = functools.partial(self.engine.encode_chat, tools=parsed.tools.offered if parsed.tools else None)
        try:
            return await run_in_threadpool(encode, prompt)
        except PromptTooLong as exc:
            raise bad_request(str(exc), param=field, code="context_length_exceeded") from exc
        except ValueError as exc:
            message = str(exc) if str(exc).startswith(field) else f"{field}: {exc}"
            raise bad_request(message, param=field) from exc

    def _params(self, parsed: ParsedRequest, prompt_ids: list[int]) -> GenerationParams:
        params = parsed.params(self.engine.defaults, len(prompt_ids), self.engine.context_length)
        try:
            params.check_vocabulary(self.engine.vocab_size)
        except ValueError as exc:
            raise bad_request(str(exc), param="logit_bias") from exc
        return params

    def _echoed(self, parsed: ParsedRequest, index: int) -> str:
        prompt = parsed.prompts[index]
        return prompt if isinstance(prompt, str) else self.engine.decode(prompt)

    def _submit(self, events: RequestEvents, prompts: list[list[int]], params: list[GenerationParams],
                parsed: ParsedRequest) -> None:
        """Every choice's sequence, or none (a refusal cancels those already queued)."""
        if not self.live.add(events):
            raise ApiError(503, SHUTDOWN)
        calls = parsed.tools is not None and parsed.tools.offered is not None
        try:
            for i, (ids, settings) in enumerate(zip(prompts, params)):
                for j in range(parsed.n):
                    choice = i * parsed.n + j
                    try:
                        events.request_ids[choice] = self.engine.submit(
                            ids, settings, events.emitter(choice), j, render_special=calls)
                    except (ValueError, QueueFull, Unavailable) as exc:
                        raise self._refusal(exc, len(ids), settings, parsed) from exc
        except BaseException:
            self._finish(events)
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
        for request_id in events.running():
            self.engine.cancel(request_id)

    async def _whole(self, request: Request, events: RequestEvents, reply: Reply, choices: list[Choice],
                     prompt_tokens: int) -> Response:
        collect = asyncio.ensure_future(_collect(events, choices))
        gone = asyncio.ensure_future(_client_gone(request))
        try:
            done, _ = await asyncio.wait({collect, gone}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            gone.cancel()
            collect.cancel()
            self._finish(events)
        if collect not in done:
            return Response(status_code=CLIENT_GONE)
        failed = collect.result()
        if failed is not None:
            raise self._ended_badly(failed)
        return JSONResponse(reply.body(choices, prompt_tokens))

    async def _chunks(self, events: RequestEvents, reply: Reply, choices: list[Choice], prompt_tokens: int,
                      include_usage: bool) -> AsyncIterator[str]:
        if reply.kind == "chat":
            for choice in choices:
                yield _sse(reply.chunk(choice.index, role=True))
        offsets = [0] * len(choices)  # where each choice's next text starts (completion logprobs)
        calls = [ToolDeltas(reply.tools, reply.most_calls) for _ in choices] if reply.tools is not None else None
        running = len(choices)
        while running:
            index, event = await events.next()
            if index is None or (isinstance(event, Finished) and event.reason not in ("stop", "length")):
                assert isinstance(event, Finished)
                yield _sse(self._ended_badly(event).body())
                return
            choice = choices[index]
            first = not choice.parts
            choice.add(event)
            text, positions = event.text, list(zip(event.token_ids, event.logprobs))
            if first and choice.prompt_text:  # echo: the prompt comes first
                text, positions = choice.prompt_text + text, choice.prompt_positions + positions
            if calls is not None:
                end = event if isinstance(event, Finished) else None
                for chunk in reply.tool_chunks(index, calls[index], text, end, positions):
                    yield _sse(chunk)
            elif text or (positions and reply.logprobs):
                yield _sse(reply.chunk(index, text, positions if reply.logprobs else None, offsets[index]))
                offsets[index] += len(text)
            if isinstance(event, Finished):
                running -= 1
                called = calls is not None and calls[index].called and event.reason == "stop"
                yield _sse(reply.chunk(index, finish_reason="tool_calls" if called else event.reason))
        if include_usage:
            completion = sum(c.end.completion_tokens for c in choices if c.end is not None)
            yield _sse(reply.usage_chunk(prompt_tokens, completion))
        yield "data: [DONE]\n\n"

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


async def _collect(events: RequestEvents, choices: list[Choice]) -> Finished | None:
    """Every choice's events; the end of a choice that failed (the request fails), else None."""
    running = len(choices)
    while running:
        index, event = await events.next()
        if index is None:
            assert isinstance(event, Finished)
            return event
        choices[index].add(event)
        if isinstance(event, Finished):
            if event.reason not in ("stop", "length"):
                return event
            running -= 1
    return None


async def _client_gone(request: Request) -> None:
    """Returns when the client closes its connection."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def _sse(body: dict[str, Any]) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"
