"""The HTTP layer against a scripted engine: uvicorn in a thread on a free port, driven by
the official `openai` client (and httpx where status codes, headers or raw SSE lines matter).

Expected texts and counts come from the fake engine's script (`SCRIPT`), never from the
server's own output.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ppinfer.pipeline.intake import IntakeStats, KVStats, QueueFull, Unavailable
from ppinfer.pipeline.sequence import Finished, TokenDelta
from ppinfer.sampling.logprobs import TokenLogprob
from ppinfer.sampling.params import GenerationParams
from ppinfer.serving.app import create_app
from ppinfer.serving.http import ConnectionLimits, HttpServer
from ppinfer.serving.metrics import ServerMetrics
from ppinfer.text.tools import ToolFormat, ToolSyntax

MODEL = "fake-model"
CONTEXT = 64
DEFAULT_MAX = 16
SCRIPT = ["Hel", "lo", ",", " wor", "ld", "!", " ça", " va"]
"""What the fake engine generates, one token each, then an end-of-generation token."""
FULL = "".join(SCRIPT)
SAMPLED = len(SCRIPT) + 1
"""Tokens the fake engine samples for a request that runs to the script's end (its end token
included)."""
ANSWER_TOKENS = len(SCRIPT)
"""Completion tokens of such a request: the end-of-generation token is not counted."""
PARTIAL = 7
"""A token id whose bytes are not a whole UTF-8 character."""
ROLES = {"system", "user", "assistant", "tool"}
MAX_BYTES = 64 * 1024
"""The servers' request body limit (`server.max_request_bytes`)."""


@dataclass
class FakeEngine:
    """Emits `SCRIPT` from a thread per request; the last token's text comes in `Finished`
    (as held-back text). `endless`: tokens "x" until cancelled; `fail_after`: an error after
    that many tokens. Prompt ids: a BOS then one id per word. Log-probabilities when asked:
    `_entry` for script token n (id 100 + n), -1 for every prompt token after the first."""

    model_id: str = MODEL
    context_length: int = CONTEXT
    vocab_size: int = 1000
    defaults: GenerationParams = field(default_factory=lambda: GenerationParams(max_new_tokens=DEFAULT_MAX))
    interval_s: float = 0.002
    is_ready: bool = True
    failed: str | None = None
    stalled: str | None = None
    full: bool = False
    endless: bool = False
    fail_after: int | None = None
    script: list[str] = field(default_factory=lambda: list(SCRIPT))
    """The tokens' texts of every answer (then an end-of-generation token)."""
    tool_syntax: ToolSyntax = field(default_factory=lambda: ToolSyntax(ToolFormat.HERMES, False))
    chat_tools: list = field(default_factory=list)
    """The `tools` each encode_chat call was given."""
    chats: list = field(default_factory=list)
    """The messages each encode_chat call was given."""
    submitted: dict[int, tuple[list[int], GenerationParams]] = field(default_factory=dict)
    special: list[bool] = field(default_factory=list)
    """Each submit's render_special."""
    cancelled: dict[int, float] = field(default_factory=dict)
    """Request id -> when cancel() was called (time.monotonic)."""

    def __post_init__(self) -> None:
        self._lock = threading.Lock()
        self._stops: dict[int, threading.Event] = {}
        self._threads: list[threading.Thread] = []

    def ready(self) -> bool:
        return self.is_ready

    def failure(self) -> str | None:
        return self.failed

    def stall(self) -> str | None:
        return self.stalled

    def encode_prompt(self, text: str) -> list[int]:
        text.encode("utf-8")  # a lone surrogate raises, as the real tokenizer does
        words = [2 + len(word) for word in text.split()]
        return [1, *words] if words else []

    def encode_chat(self, messages: list[dict[str, str]], tools: list | None = None) -> list[int]:
        self.chat_tools.append(tools)
        self.chats.append(messages)
        ids = [1]
        for i, message in enumerate(messages):
            if message["role"] not in ROLES:
                raise ValueError(f"messages[{i}].role={message['role']!r}: unknown role")
            ids += [0, *self.encode_prompt(message["content"])[1:]]
        return ids

    def control_token(self, text: str) -> int | None:
        return None

    def token_bytes(self, token_id: int) -> bytes:
        if 100 <= token_id < 100 + len(SCRIPT):
            return SCRIPT[token_id - 100].encode()
        return b"\xe2\x80" if token_id == PARTIAL else f"<{token_id}>".encode()

    def decode(self, ids: list[int]) -> str:
        return b"".join(self.token_bytes(i) for i in ids).decode("utf-8", "replace")

    def submit(self, prompt_ids, params, emit, choice=0, render_special=False) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(f"{len(prompt_ids)} prompt tokens + max_tokens={params.max_new_tokens} "
                             f"exceed the context length of {self.context_length}")
        if self.failed or not self.is_ready:
            raise Unavailable(self.failed or "loading")
        if self.full:
            raise QueueFull("8 requests are waiting already (server.max_queue)")
        with self._lock:
            request_id = len(self.submitted)
            self.submitted[request_id] = (list(prompt_ids), params)
            self.special.append(render_special)
            self._stops[request_id] = stop = threading.Event()
        thread = threading.Thread(target=self._generate, args=(list(prompt_ids), params, emit, stop), daemon=True)
        self._threads.append(thread)
        thread.start()
        return request_id

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self.cancelled.setdefault(request_id, time.monotonic())
            self._stops[request_id].set()

    def stats(self) -> IntakeStats:
        return IntakeStats(waiting=3, running=2, stage_busy_seconds=(1.0, 3.0), uptime_s=4.0,
                           kv=KVStats(blocks_used=5, blocks_total=64, prefix_hit_rate=0.5, preemptions=2))

    def close(self) -> None:
        for stop in self._stops.values():
            stop.set()
        for thread in self._threads:
            thread.join(5.0)

    def _generate(self, prompt_ids: list[int], params: GenerationParams, emit, stop: threading.Event) -> None:
        prompt = len(prompt_ids)
        sampled = len(self.script) + 1
        count = sampled if params.max_new_tokens >= sampled else params.max_new_tokens
        texts = ["x"] * 10**6 if self.endless else self.script[:count]
        k = params.logprobs
        lps = (lambda n: (_entry(n, k),)) if k is not None else (lambda n: ())
        told = None
        if params.prompt_logprobs is not None:
            told = (None, *(TokenLogprob(i, -1.0, ((i, -1.0),)[:params.prompt_logprobs]) for i in prompt_ids[1:]))
        for n, text in enumerate(texts[:-1]):
            if stop.wait(self.interval_s):
                emit(Finished("cancelled", "", prompt, n))
                return
            if self.fail_after == n:
                emit(Finished("error", "", prompt, n, error="rank 1 died"))
                return
            emit(TokenDelta(text, (100 + n,), lps(n), told if n == 0 else None))
        last = len(texts) - 1
        reason = "stop" if count == sampled else "length"
        emit(Finished(reason, texts[-1], prompt, len(texts), token_ids=(100 + last,), logprobs=lps(last),
                      prompt_logprobs=told if last == 0 else None))


def _entry(n: int, k: int) -> TokenLogprob:
    """Script token n's log-probability: -0.25 (n + 1), behind the partial token at -0.1 for
    odd n (so the chosen token is not always the most likely), then id 8 at -5."""
    own = (100 + n, -0.25 * (n + 1))
    ranked = [(PARTIAL, -0.1), own] if n % 2 else [own, (PARTIAL, -3.0)]
    return TokenLogprob(100 + n, own[1], tuple([*ranked, (8, -5.0)][:k]))


@dataclass
class Served:
    server: HttpServer
    engine: FakeEngine
    url: str
    app: object

    def client(self, api_key: str = "unused") -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=api_key, max_retries=0, timeout=10.0)


@pytest.fixture
def serve():
    """Starts the app for an engine; every server is stopped at the end of the test."""
    started: list[Served] = []

    def start(engine: FakeEngine | None = None, api_key: str | None = None,
              limits: ConnectionLimits | None = None) -> Served:
        engine = engine or FakeEngine()
        limits = limits or ConnectionLimits()
        app = create_app(engine, api_key, ServerMetrics(), max_request_bytes=MAX_BYTES)
        server = HttpServer(app, "127.0.0.1", 0, limits)
        server.start()
        started.append(Served(server, engine, f"http://127.0.0.1:{server.port}", app))
        return started[-1]

    yield start
    for served in started:
        served.server.stop(2.0)
        served.engine.close()


@pytest.fixture(scope="module")
def shared():
    """One server for the tests that leave its engine as it was."""
    engine = FakeEngine()
    server = HttpServer(create_app(engine, None, ServerMetrics(), max_request_bytes=MAX_BYTES), "127.0.0.1", 0)
    server.start()
    yield Served(server, engine, f"http://127.0.0.1:{server.port}", None)
    server.stop(2.0)
    engine.close()


def _words(n: int) -> str:
    return " ".join(["word"] * n)


def _post(served: Served, path: str, body: dict, **kwargs) -> httpx.Response:
    return httpx.post(f"{served.url}{path}", json=body, timeout=10.0, **kwargs)


def _sse_data(response: httpx.Response) -> list[str]:
    return [line[len("data: "):] for line in response.iter_lines() if line.startswith("data: ")]


# ---- answers ---------------------------------------------------------------------------------


def test_completion_whole(serve):
    client = serve().client()
    reply = client.completions.create(model=MODEL, prompt="one two three")
    assert reply.object == "text_completion" and reply.model == MODEL and reply.id
    assert reply.choices[0].text == FULL
    assert reply.choices[0].finish_reason == "stop"
    assert (reply.usage.prompt_tokens, reply.usage.completion_tokens) == (4, ANSWER_TOKENS)
    assert reply.usage.total_tokens == 4 + ANSWER_TOKENS

    short = client.completions.create(model=MODEL, prompt=["one"], max_tokens=3)
    assert short.choices[0].text == "".join(SCRIPT[:3])
    assert short.choices[0].finish_reason == "length"
    assert short.usage.completion_tokens == 3


def test_chat_whole(serve):
    served = serve()
    reply = served.client().chat.completions.create(
        model=MODEL, messages=[{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi there"}],
        max_completion_tokens=20,
    )
    assert reply.object == "chat.completion"
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].message.content == FULL
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.prompt_tokens == 1 + (1 + 2) + (1 + 2)
    assert served.engine.submitted[0][1].max_new_tokens == 20


def test_completion_stream(serve):
    served = serve()
    chunks = list(served.client().completions.create(
        model=MODEL, prompt="one two", stream=True, stream_options={"include_usage": True}))
    assert "".join(c.choices[0].text for c in chunks if c.choices) == FULL
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == ["stop"]
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == (3, ANSWER_TOKENS)

    with httpx.stream("POST", f"{served.url}/v1/completions", json={"prompt": "a", "stream": True}) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        data = _sse_data(response)
    assert data[-1] == "[DONE]"
    assert "usage" not in json.loads(data[-2])
    assert len(data) == (len(SCRIPT) - 1) + 1 + 1 + 1  # deltas, held-back text, final chunk, [DONE]


def test_chat_stream(serve):
    chunks = list(serve().client().chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hi"}], stream=True, max_tokens=4))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "".join(SCRIPT[:4])
    assert chunks[-1].choices[0].finish_reason == "length"
    assert all(c.object == "chat.completion.chunk" for c in chunks)


def test_prompts_as_lists_and_token_ids_and_n_choices(serve):
    served = serve()
    client = served.client()
    reply = client.completions.create(model=MODEL, prompt=["one two", [1, 5, 6, 7]], n=2, max_tokens=3, seed=9)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert all(c.text == "".join(SCRIPT[:3]) for c in reply.choices)
    assert reply.usage.prompt_tokens == 3 + 4  # each prompt once, whatever n
    assert reply.usage.completion_tokens == 4 * 3
    submitted = sorted(served.engine.submitted.values(), key=lambda s: s[0])
    assert [ids for ids, _ in submitted] == [[1, 5, 5], [1, 5, 5], [1, 5, 6, 7], [1, 5, 6, 7]]

    chunks = list(client.completions.create(model=MODEL, prompt="x", n=3, max_tokens=2, stream=True,
                                            stream_options={"include_usage": True}))
    for index in range(3):
        mine = [c.choices[0] for c in chunks if c.choices and c.choices[0].index == index]
        assert "".join(c.text for c in mine) == "".join(SCRIPT[:2])
        assert [c.finish_reason for c in mine if c.finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 3 * 2

    chat = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "hi"}], n=2)
    assert [c.message.content for c in chat.choices] == [FULL, FULL]


def _completion_logprobs(n_tokens: int, k: int) -> tuple[list, list, list]:
    """The fake engine's script as OpenAI's completion logprobs: tokens, their log-probabilities
    and each one's top-k dictionary (the chosen token always in it)."""
    tokens = SCRIPT[:n_tokens]
    logprobs = [-0.25 * (n + 1) for n in range(n_tokens)]
    tops = []
    for n in range(n_tokens):
        ranked = [("bytes:\\xe2\\x80", -0.1), (SCRIPT[n], logprobs[n])] if n % 2 else \
            [(SCRIPT[n], logprobs[n]), ("bytes:\\xe2\\x80", -3.0)]
        top = dict([*ranked, ("<8>", -5.0)][:k])
        top.setdefault(SCRIPT[n], logprobs[n])
        tops.append(top)
    return tokens, logprobs, tops


def test_completion_logprobs(serve):
    served = serve()
    client = served.client()
    reply = client.completions.create(model=MODEL, prompt="a b", max_tokens=4, logprobs=2)
    tokens, logprobs, tops = _completion_logprobs(4, 2)
    got = reply.choices[0].logprobs
    assert (got.tokens, got.token_logprobs, got.top_logprobs) == (tokens, logprobs, tops)
    assert got.text_offset == [0, 3, 5, 6]
    assert served.engine.submitted[0][1].logprobs == 2 and served.engine.submitted[0][1].prompt_logprobs is None

    # Streamed: the same lists, chunk by chunk; the end-of-generation token is not reported.
    chunks = list(client.completions.create(model=MODEL, prompt="a b", logprobs=0, stream=True))
    parts = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    tokens, logprobs, tops = _completion_logprobs(ANSWER_TOKENS, 0)
    assert [t for p in parts for t in p.tokens] == tokens
    assert [t for p in parts for t in p.token_logprobs] == logprobs
    assert [t for p in parts for t in p.top_logprobs] == tops
    assert [t for p in parts for t in p.text_offset] == [len("".join(SCRIPT[:n])) for n in range(ANSWER_TOKENS)]


def test_echo_with_prompt_logprobs(serve):
    served = serve()
    client = served.client()
    reply = client.completions.create(model=MODEL, prompt=[1, 5, 6], max_tokens=1, logprobs=1, echo=True)
    got = reply.choices[0]
    assert got.text == "<1><5><6>" + SCRIPT[0]
    assert got.logprobs.tokens == ["<1>", "<5>", "<6>", SCRIPT[0]]
    assert got.logprobs.token_logprobs == [None, -1.0, -1.0, -0.25]
    assert got.logprobs.top_logprobs == [None, {"<5>": -1.0}, {"<6>": -1.0}, {SCRIPT[0]: -0.25}]
    assert got.logprobs.text_offset == [0, 3, 6, 9]
    assert served.engine.submitted[0][1].prompt_logprobs == 1

    plain = client.completions.create(model=MODEL, prompt="one two", max_tokens=2, echo=True)
    assert plain.choices[0].text == "one two" + "".join(SCRIPT[:2]) and plain.choices[0].logprobs is None

    chunks = list(client.completions.create(model=MODEL, prompt=[1, 5], max_tokens=2, logprobs=0, echo=True,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == "<1><5>" + "".join(SCRIPT[:2])
    first = chunks[0].choices[0].logprobs
    assert first.tokens[:3] == ["<1>", "<5>", SCRIPT[0]] and first.token_logprobs[:3] == [None, -1.0, -0.25]


def test_chat_logprobs(serve):
    client = serve().client()
    messages = [{"role": "user", "content": "hi"}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2, logprobs=True,
                                           top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert [c.token for c in content] == SCRIPT[:2]
    assert [c.logprob for c in content] == [-0.25, -0.5]
    assert content[0].bytes == list(SCRIPT[0].encode())
    assert [(t.token, t.logprob, t.bytes) for t in content[1].top_logprobs] == [
        ("bytes:\\xe2\\x80", -0.1, [0xE2, 0x80]), (SCRIPT[1], -0.5, list(SCRIPT[1].encode())),
        ("<8>", -5.0, list(b"<8>")),
    ]

    without_top = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1, logprobs=True)
    assert without_top.choices[0].logprobs.content[0].top_logprobs == []
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=1).choices[0].logprobs is None

    chunks = list(client.chat.completions.create(model=MODEL, messages=messages, logprobs=True, stream=True))
    streamed = [e for c in chunks if c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    assert [e.token for e in streamed] == SCRIPT
    assert [e.logprob for e in streamed] == [-0.25 * (n + 1) for n in range(ANSWER_TOKENS)]


def test_response_format_reaches_the_engine(serve):
    served = serve()
    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    response_format = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema, "strict": True}}
    served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            response_format=response_format)
    served.client().chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}],
                                            response_format={"type": "text"})
    assert served.engine.submitted[0][1].response_format == response_format
    assert served.engine.submitted[1][1].response_format == {"type": "text"}


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_SCRIPT = ["Let me check.", "\n<tool", "_call>\n{\"name\": \"get_", "weather\", \"arguments\": ",
               "{\"city\": ", "\"Paris\"}", "}\n</tool_call>"]
"""A hermes-syntax answer: content, then one call whose arguments are `{"city": "Paris"}`."""


def test_tool_calls_whole_and_streamed(serve):
    served = serve(FakeEngine(script=TOOL_SCRIPT))
    messages = [{"role": "user", "content": "Weather in Paris?"}]
    done = served.client().chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    choice = done.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content == "Let me check."
    [call] = choice.message.tool_calls
    assert (call.type, call.function.name, call.function.arguments) == ("function", "get_weather", '{"city": "Paris"}')
    assert call.id.startswith("call_")
    assert served.engine.chat_tools == [[WEATHER]] and served.engine.special == [True]
    assert served.engine.submitted[0][1].grammar is None  # auto: unconstrained

    chunks = list(served.client().chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER],
                                                          stream=True))
    deltas = [c.choices[0].delta for c in chunks]
    assert "".join(d.content or "" for d in deltas) == "Let me check."
    calls = [d.tool_calls[0] for d in deltas if d.tool_calls]
    first, rest = calls[0], calls[1:]
    assert (first.index, first.type, first.function.name, first.function.arguments) == (0, "function",
                                                                                     "get_weather", "")
    assert first.id.startswith("call_") and rest
    assert all(c.id is None and c.function.name is None and c.index == 0 for c in rest)
    assert "".join(c.function.arguments for c in rest) == '{"city": "Paris"}'
    assert [c.choices[0].finish_reason for c in chunks][-1] == "tool_calls"


def test_tool_choice_modes_reach_the_engine(serve):
    served = serve()
    messages = [{"role": "user", "content": "x"}]
    client = served.client()
    for choice in ("none", "auto", "required", {"type": "function", "function": {"name": "get_weather"}}):
        done = client.chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER], tool_choice=choice)
        assert done.choices[0].message.content == FULL and done.choices[0].finish_reason == "stop"  # no call
    assert served.engine.chat_tools == [None, [WEATHER], [WEATHER], [WEATHER]]
    assert served.engine.special == [False, True, True, True]
    grammars = [params.grammar for _, params in served.engine.submitted.values()]
    assert grammars[:2] == [None, None] and all("get_weather" in g for g in grammars[2:])


def test_tool_history_reaches_the_template(serve):
    served = serve()
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
    messages = [{"role": "user", "content": "Weather in Rome?"}, {"role": "assistant", "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "sunny"}]
    served.client().chat.completions.create(model=MODEL, messages=messages, tools=[WEATHER])
    assert served.engine.chats == [[messages[0], {"role": "assistant", "content": "", "tool_calls": [call]},
                                    messages[2]]]


def test_penalties_and_bias_reach_the_engine(serve):
    served = serve()
    served.client().completions.create(model=MODEL, prompt="p", presence_penalty=0.5, frequency_penalty=-1.25,
                                       logit_bias={"5": -100, "17": 2.5})
    params = served.engine.submitted[0][1]
    assert (params.presence_penalty, params.frequency_penalty) == (0.5, -1.25)
    assert params.logit_bias == {"5": -100.0, "17": 2.5}


def test_concurrent_streams(serve):
    served = serve()
    client = served.client()

    def one(i: int) -> str:
        n = 1 + i % len(SCRIPT)
        if i % 2:
            stream = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "q"}],
                                                    max_tokens=n, stream=True)
            return "".join(c.choices[0].delta.content or "" for c in stream)
        stream = client.completions.create(model=MODEL, prompt="q", max_tokens=n, stream=True)
        return "".join(c.choices[0].text for c in stream)

    with ThreadPoolExecutor(16) as pool:
        texts = list(pool.map(one, range(16)))
    assert texts == ["".join(SCRIPT[:1 + i % len(SCRIPT)]) for i in range(16)]
    assert len(served.engine.submitted) == 16


def test_settings_reach_the_engine(serve):
    served = serve()
    client = served.client()
    client.completions.create(
        model=MODEL, prompt="p", max_tokens=5, temperature=0.7, top_p=0.9, seed=42, stop=["\n\n", "END"],
        extra_body={"top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True, "user": "ignored"},
    )
    client.completions.create(model=MODEL, prompt="p")
    client.completions.create(model=MODEL, prompt=_words(58))
    settings = [params for _, params in served.engine.submitted.values()]
    assert settings[0] == GenerationParams(
        max_new_tokens=5, temperature=0.7, top_p=0.9, seed=42, stop=["\n\n", "END"],
        top_k=40, min_p=0.05, repetition_penalty=1.1, ignore_eos=True)
    assert settings[1] == GenerationParams(max_new_tokens=DEFAULT_MAX, seed=None)  # no seed: a fresh stream
    assert settings[2].max_new_tokens == CONTEXT - 59  # the rest of the context


# ---- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("kwargs, field", [
    ({"temperature": -1}, "temperature"),
    ({"n": 0}, "n"),
    ({"n": 129}, "n"),
    ({"n": True}, "n"),
    ({"logprobs": 6}, "logprobs"),
    ({"logprobs": True}, "logprobs"),
    ({"extra_body": {"logit_bias": {"1000": 1}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"-1": 1}}}, "logit_bias"),
    ({"extra_body": {"logit_bias": {"5": 101}}}, "logit_bias"),
    ({"frequency_penalty": -2.5}, "frequency_penalty"),
    ({"suffix": "tail"}, "suffix"),
    ({"best_of": True}, "best_of"),
    ({"frequency_penalty": False}, "frequency_penalty"),
    ({"echo": 0}, "echo"),
    ({"extra_body": {"top_k": 2**64}}, "top_k"),
    ({"extra_body": {"repetition_penalty": 1e-300}}, "repetition_penalty"),
    ({"temperature": 10**400}, "temperature"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"extra_body": {"top_k": -3}}, "top_k"),
    ({"presence_penalty": 2.5}, "presence_penalty"),
    ({"best_of": 2}, "best_of"),
    ({"extra_body": {"frobnicate": 1}}, "frobnicate"),
    ({"extra_body": {"max_completion_tokens": 3}}, "max_completion_tokens"),
])
def test_bad_settings(shared, kwargs, field):
    with pytest.raises(openai.BadRequestError) as caught:
        shared.client().completions.create(model=MODEL, prompt="p", **kwargs)
    assert caught.value.status_code == 400
    assert caught.value.body["message"].startswith(field)
    assert caught.value.param == field


def test_neutral_values_of_the_right_type_are_accepted(shared):
    done = shared.client().completions.create(
        model=MODEL, prompt="p", n=1, best_of=1, frequency_penalty=0, presence_penalty=0.0, echo=False,
        stream_options=None, extra_body={"logit_bias": {}},
    )
    assert done.choices[0].text == FULL
    streamed = _post(
        shared, "/v1/completions", {"prompt": "p", "stream": True, "stream_options": {"include_usage": None}}
    )
    assert streamed.status_code == 200 and streamed.text.rstrip().endswith("[DONE]")


def test_unknown_model(shared):
    with pytest.raises(openai.NotFoundError) as caught:
        shared.client().completions.create(model="gpt-4", prompt="p")
    assert caught.value.code == "model_not_found"
    assert "gpt-4" in caught.value.body["message"]


@pytest.mark.parametrize("words, max_tokens", [(60, 10), (CONTEXT, None)])
def test_prompt_too_long(shared, words, max_tokens):
    client = shared.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.completions.create(model=MODEL, prompt=_words(words), max_tokens=max_tokens)
    assert caught.value.code == "context_length_exceeded"
    assert str(CONTEXT) in caught.value.body["message"]


@pytest.mark.parametrize("path, body, needle", [
    ("/v1/completions", {"prompt": [1, 2, 1000]}, "prompt: token id 1000 is outside the vocabulary"),
    ("/v1/completions", {"prompt": ["a", [3000]]}, "prompt[1]: token id 3000"),
    ("/v1/completions", {"prompt": ["a", 3]}, "prompt"),
    ("/v1/completions", {"prompt": []}, "prompt"),
    ("/v1/completions", {}, "prompt"),
    ("/v1/chat/completions", {"messages": []}, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "robot", "content": "x"}]}, "messages[0].role='robot'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]},
     "tools"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "top_logprobs": 2},
     "top_logprobs=2: needs logprobs=true"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "logprobs": True, "top_logprobs": 21},
     "top_logprobs"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "echo": True}, "echo"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tool_choice": "none"},
     "tool_choice"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                              "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "tool_choice.function.name='nope': no such function"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                              "tool_choice": "sometimes"}, "tool_choice='sometimes'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER, WEATHER]},
     "tools[1].function.name='get_weather': a second function"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameters": {"type": "nonsense"}}}]},
     "tools[0].function.parameters"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [
        {"type": "function", "function": {"name": "f", "parameter": {}}}]}, "tools[0].function.parameter:"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": []}, "tools: must be"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": [WEATHER],
                              "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined"),
    ("/v1/chat/completions", {"messages": [{"role": "tool", "content": "x"}]}, "messages[0].tool_call_id"),
    ("/v1/chat/completions", {"messages": [{"role": "assistant", "tool_calls": [{"id": "1"}]}]},
     "messages[0].tool_calls[0]"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "response_format": {"type": "xml"}}, "response_format.type='xml'"),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "response_format": {
        "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "nonsense"}}}},
     "response_format.json_schema"),
])
def test_bad_bodies(shared, path, body, needle):
    response = _post(shared, path, body)
    assert response.status_code == 400
    error = response.json()["error"]
    assert needle in error["message"]
    assert error["type"] == "invalid_request_error"


@pytest.mark.parametrize("body, field", [({"prompt": ""}, "prompt"), ({"prompt": "a\ud800"}, "prompt")])
def test_unusable_prompts_name_the_prompt(shared, body, field):
    """An empty prompt is the prompt's fault (not max_tokens'); one the tokenizer cannot
    take (a lone surrogate, which JSON can carry) is a 400, not a 500."""
    raw = json.dumps(body | {"max_tokens": 2}).encode()  # ASCII: the surrogate stays an escape
    response = httpx.post(f"{shared.url}/v1/completions", content=raw, timeout=10.0)
    assert response.status_code == 400, response.text
    assert response.json()["error"]["param"] == field


def test_deeply_nested_json_is_a_400(shared):
    body = b'{"prompt": "p", "x": ' + b"[" * 5000 + b"]" * 5000 + b"}"
    response = httpx.post(f"{shared.url}/v1/completions", content=body, timeout=10.0)
    assert response.status_code == 400
    assert "nested" in response.json()["error"]["message"]


def test_bodies_over_the_limit_are_413(shared):
    declared = httpx.post(f"{shared.url}/v1/completions", json={"prompt": "a " * MAX_BYTES}, timeout=10.0)
    assert declared.status_code == 413
    assert "server.max_request_bytes" in declared.json()["error"]["message"]

    def chunks():  # no Content-Length: the limit applies as the body is read
        yield b'{"prompt": "'
        for _ in range(MAX_BYTES // 1024 + 2):
            yield b"a" * 1024
        yield b'"}'

    streamed = httpx.post(f"{shared.url}/v1/completions", content=chunks(), timeout=10.0)
    assert streamed.status_code == 413
    assert _post(shared, "/v1/completions", {"prompt": "p"}).status_code == 200


def test_a_trailing_slash_is_the_same_route(shared):
    response = httpx.get(f"{shared.url}/v1/models/", headers={"Host": "evil.example"}, timeout=10.0)
    assert response.status_code == 200
    assert response.json()["data"][0]["id"] == MODEL
    assert "location" not in response.headers


def test_errors_have_openai_shape(serve):
    served = serve()

    def probe(n: int) -> dict:
        return {"n": n}

    served.app.add_api_route("/probe", probe)
    bad_json = httpx.post(f"{served.url}/v1/completions", content=b"{not json", timeout=10.0)
    unknown = httpx.get(f"{served.url}/v2/nothing", timeout=10.0)
    validation = httpx.get(f"{served.url}/probe?n=abc", timeout=10.0)
    assert (bad_json.status_code, unknown.status_code, validation.status_code) == (400, 404, 400)
    for response in (bad_json, unknown, validation):
        assert set(response.json()["error"]) == {"message", "type", "param", "code"}
    assert "JSON" in bad_json.json()["error"]["message"]
    assert "/v2/nothing" in unknown.json()["error"]["message"]
    assert "n" in validation.json()["error"]["message"]


def test_engine_full_is_503_with_retry_after(serve):
    served = serve(FakeEngine(full=True))
    response = _post(served, "/v1/completions", {"prompt": "p"})
    assert response.status_code == 503
    assert int(response.headers["retry-after"]) >= 1
    assert "server.max_queue" in response.json()["error"]["message"]


def test_failed_engine_is_503(serve):
    served = serve(FakeEngine(failed="rank 2 died"))
    response = _post(served, "/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}]})
    assert response.status_code == 503
    assert "rank 2 died" in response.json()["error"]["message"]


def test_error_during_generation(serve):
    served = serve(FakeEngine(fail_after=2))
    whole = _post(served, "/v1/completions", {"prompt": "p"})
    assert whole.status_code == 500
    assert whole.json()["error"]["message"] == "rank 1 died"

    with httpx.stream("POST", f"{served.url}/v1/completions", json={"prompt": "p", "stream": True}) as response:
        data = _sse_data(response)
    assert [json.loads(d)["choices"][0]["text"] for d in data[:-1]] == SCRIPT[:2]
    assert json.loads(data[-1])["error"]["message"] == "rank 1 died"
    with pytest.raises(openai.APIError, match="rank 1 died"):
        list(served.client().completions.create(model=MODEL, prompt="p", stream=True))


# ---- auth, health, metrics -------------------------------------------------------------------


def test_api_key(serve):
    served = serve(api_key="s3cret")
    with pytest.raises(openai.AuthenticationError):
        served.client(api_key="wrong").models.list()
    no_key = httpx.get(f"{served.url}/v1/models", timeout=10.0)
    assert no_key.status_code == 401
    assert no_key.json()["error"]["code"] == "invalid_api_key"
    assert _post(served, "/v1/completions", {"prompt": "p"}).status_code == 401
    assert [m.id for m in served.client(api_key="s3cret").models.list()] == [MODEL]
    assert served.client(api_key="s3cret").completions.create(model=MODEL, prompt="p").choices[0].text == FULL
    assert httpx.get(f"{served.url}/health", timeout=10.0).status_code == 200
    assert httpx.get(f"{served.url}/metrics", timeout=10.0).status_code == 200


def test_health(serve):
    engine = FakeEngine(is_ready=False)
    served = serve(engine)
    loading = httpx.get(f"{served.url}/health", timeout=10.0)
    assert (loading.status_code, loading.json()["status"]) == (503, "loading")
    assert _post(served, "/v1/completions", {"prompt": "p"}).status_code == 503
    engine.is_ready = True
    ok = httpx.get(f"{served.url}/health", timeout=10.0)
    assert (ok.status_code, ok.json()) == (200, {"status": "ok"})
    engine.stalled = "no sampled token has come back for 31 s"
    stalled = httpx.get(f"{served.url}/health", timeout=10.0)
    assert (stalled.status_code, stalled.json()["status"]) == (503, "stalled")
    assert "31 s" in stalled.json()["error"]
    engine.failed = "rank 1 died"
    served.server.drain()  # a failed pipeline drains the server too: "failed" is what /health says
    failed = httpx.get(f"{served.url}/health", timeout=10.0)
    assert (failed.status_code, failed.json()["status"], failed.json()["error"]) == (503, "failed", "rank 1 died")


def _samples(text: str) -> dict[tuple[str, tuple], float]:
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for family in text_string_to_metric_families(text) for s in family.samples}


def test_metrics(serve):
    served = serve()
    client = served.client()
    client.completions.create(model=MODEL, prompt="a b c")
    list(client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}], stream=True))
    with pytest.raises(openai.BadRequestError):
        client.completions.create(model=MODEL, prompt="p", temperature=-1)
    samples = _samples(httpx.get(f"{served.url}/metrics", timeout=10.0).text)

    def requests(endpoint: str, status: str) -> float:
        return samples.get(("ppinfer_requests_total", (("endpoint", endpoint), ("status", status))), 0.0)

    assert requests("/v1/completions", "200") == 1
    assert requests("/v1/completions", "400") == 1
    assert requests("/v1/chat/completions", "200") == 1
    assert samples[("ppinfer_prompt_tokens_total", ())] == 4 + 3
    assert samples[("ppinfer_generation_tokens_total", ())] == 2 * ANSWER_TOKENS
    assert samples[("ppinfer_time_to_first_token_seconds_count", ())] == 2
    # Every token but a request's first is one inter-token latency, the ones only Finished
    # reports (the last token's text and the end-of-generation token) included.
    assert samples[("ppinfer_inter_token_latency_seconds_count", ())] == 2 * (ANSWER_TOKENS - 1)
    assert 0 < samples[("ppinfer_time_to_first_token_seconds_sum", ())] < 2
    assert samples[("ppinfer_queue_length", ())] == 3
    assert samples[("ppinfer_running_sequences", ())] == 2
    assert samples[("ppinfer_kv_blocks_used", ())] == 5 and samples[("ppinfer_kv_blocks_total", ())] == 64
    assert samples[("ppinfer_prefix_cache_hit_rate", ())] == 0.5
    assert samples[("ppinfer_kv_preemptions_total", ())] == 2
    assert samples[("ppinfer_stage_busy_fraction", (("stage", "0"),))] == 0.25
    assert samples[("ppinfer_stage_busy_fraction", (("stage", "1"),))] == 0.75


def test_a_request_ending_on_its_first_token_is_timed(serve):
    served = serve()
    served.client().completions.create(model=MODEL, prompt="p", max_tokens=1)
    samples = _samples(httpx.get(f"{served.url}/metrics", timeout=10.0).text)
    assert samples[("ppinfer_time_to_first_token_seconds_count", ())] == 1
    assert samples[("ppinfer_inter_token_latency_seconds_count", ())] == 0


def test_clients_that_leave_count_as_499(serve, caplog):
    """A client gone before its body arrived, and one that left a stream, are 499s (nobody
    read an answer), with no traceback in the log."""
    served = serve(FakeEngine(endless=True))
    with socket.create_connection(("127.0.0.1", served.server.port)) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Content-Length: 100\r\n\r\n{\"prompt\"")
    stream = served.client().completions.create(model=MODEL, prompt="p", stream=True)
    next(iter(stream))
    stream.close()

    def counted() -> float:
        samples = _samples(httpx.get(f"{served.url}/metrics", timeout=10.0).text)
        return samples.get(("ppinfer_requests_total", (("endpoint", "/v1/completions"), ("status", "499"))), 0.0)

    assert _wait_for(lambda: counted() == 2, 2.0), counted()
    assert not [r for r in caplog.records if r.exc_info], [r.getMessage() for r in caplog.records]


def _closed_by_server(sock: socket.socket, timeout_s: float = 5.0) -> bool:
    """Whether the server closes `sock` within `timeout_s` (an orderly close or a reset)."""
    sock.settimeout(timeout_s)
    try:
        return sock.recv(1024) == b""
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_idle_connections_are_closed_and_capped(serve):
    served = serve(limits=ConnectionLimits(header_timeout_s=0.5, max_connections=20))
    idle = [socket.create_connection(("127.0.0.1", served.server.port)) for _ in range(30)]
    slow = socket.create_connection(("127.0.0.1", served.server.port))
    slow.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # headers never finished
    try:
        assert all(_closed_by_server(sock) for sock in [*idle, slow]), "the server kept an idle connection open"
    finally:
        for sock in [*idle, slow]:
            sock.close()
    assert httpx.get(f"{served.url}/health", timeout=10.0).status_code == 200


# ---- cancellation and shutdown ---------------------------------------------------------------


def _wait_for(condition, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_closed_stream_is_cancelled(serve):
    engine = FakeEngine(endless=True)
    served = serve(engine)
    stream = served.client().completions.create(model=MODEL, prompt="p", stream=True)
    assert next(iter(stream)).choices[0].text == "x"
    stream.close()
    closed = time.monotonic()
    assert _wait_for(lambda: 0 in engine.cancelled, 1.0)
    assert engine.cancelled[0] - closed < 1.0
    engine.endless = False
    assert served.client().completions.create(model=MODEL, prompt="p").choices[0].text == FULL


def test_abandoned_request_is_cancelled(serve):
    engine = FakeEngine(endless=True)
    served = serve(engine)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{served.url}/v1/completions", json={"prompt": "p"}, timeout=0.3)
    assert _wait_for(lambda: 0 in engine.cancelled, 1.0)


def test_stop_drains(serve):
    engine = FakeEngine(endless=True)
    served = serve(engine)
    bound_s = 2.0
    with httpx.stream("POST", f"{served.url}/v1/completions", json={"prompt": "p", "stream": True},
                      timeout=10.0) as response:
        lines = response.iter_lines()
        assert next(line for line in lines if line.startswith("data: "))
        started = time.monotonic()
        stopper = threading.Thread(target=served.server.stop, args=(bound_s,))
        stopper.start()
        assert _wait_for(lambda: served.server.draining, 1.0)
        refused = _post(served, "/v1/completions", {"prompt": "p"})
        assert refused.status_code == 503
        assert "shutting down" in refused.json()["error"]["message"]
        assert httpx.get(f"{served.url}/health", timeout=10.0).json()["status"] == "draining"
        rest = [line[len("data: "):] for line in lines if line.startswith("data: ")]
    assert "shutting down" in json.loads(rest[-1])["error"]["message"]
    stopper.join(bound_s + 1.0)
    assert not stopper.is_alive()
    assert time.monotonic() - started < bound_s + 0.5
    assert 0 in engine.cancelled
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{served.url}/health", timeout=2.0)
