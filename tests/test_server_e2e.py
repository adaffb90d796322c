"""The server as a user runs it: `torchrun --nproc_per_node=2 launch/serve.py`, spoken to with
the official `openai` client. One server process group for the whole module (they are slow
to start on 2 cores); the shutdown test ends it.

References: the batch command's greedy text for the same prompt (in-process, one stage, a
different lane layout), and the requests' own parameters (token budgets with EOS ignored).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import socket
import subprocess
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import openai
import psutil
import pytest
import torch
from hydra import compose, initialize_config_dir
from torchrun_job import REPO, ProcessTree, command, describe

from ppinfer import load_tokenizer
from ppinfer.pipeline.batch import run

pytestmark = pytest.mark.slow

KEY = "sk-test-ppinfer"
SHUTDOWN_BOUND_S = 5.0
DEAD_RANK_BOUND_S = 10.0
"""A survivor of a dead rank waits `REPORT_GRACE_S` (5 s) before it reports and exits, so
that torchrun names the dead rank as the root cause."""
HEADER_TIMEOUT_S = 2.0
STALL_TIMEOUT_S = 3.0


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, model: Path, tmp: Path, extra: tuple[str, ...] = (), weights: str = "dequantized") -> None:
        self.port = _free_port()
        self.out = tmp
        self.url = f"http://127.0.0.1:{self.port}"
        args = [
            f"model.path={model}", f"server.port={self.port}", f"server.api_key={KEY}", "server.context_length=384",
            "server.max_queue=128", "pipeline.microbatches=2", "pipeline.lane_size=4", f"runtime.weights={weights}",
            f"server.header_timeout_s={HEADER_TIMEOUT_S}", f"server.stall_timeout_s={STALL_TIMEOUT_S}",
            f"output.dir={tmp}", *extra,
        ]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        self.log = (tmp / "server.log").open("w")
        self.proc = subprocess.Popen(
            command(2, args, REPO / "launch" / "serve.py"), cwd=REPO, env=env, stdout=self.log,
            stderr=subprocess.STDOUT, start_new_session=True,
        )
        self.tree = ProcessTree(self.proc.pid)
        self.client = openai.OpenAI(base_url=f"{self.url}/v1", api_key=KEY, max_retries=0, timeout=120)
        deadline = time.monotonic() + 240
        while not self._healthy():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the server did not come up: {(tmp / 'server.log').read_text()[-2000:]}")
            time.sleep(0.5)
        self.model = self.client.models.list().data[0].id

    def worker(self, rank: int) -> psutil.Process:
        """The process of `rank` (a torchrun worker)."""
        workers = [
            p for p in psutil.Process(self.proc.pid).children(recursive=True) if "serve.py" in " ".join(p.cmdline())
        ]
        return next(p for p in workers if p.environ().get("RANK") == str(rank))

    def post(self, body: bytes, timeout_s: float = 30.0) -> httpx.Response:
        """A completion request whose body is sent as given (JSON that a client library would
        not write, say)."""
        return httpx.post(f"{self.url}/v1/completions", content=body, timeout=timeout_s,
                          headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"})

    def health(self) -> str:
        return httpx.get(f"{self.url}/health", timeout=5).json()["status"]

    def _healthy(self) -> bool:
        try:
            return httpx.get(f"{self.url}/health", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    def stop(self) -> None:
        """Kill the agent and its workers (each in a session of its own), whatever state they
        are in."""
        self.tree.kill()
        self.proc.wait(timeout=30)
        self.log.close()


@pytest.fixture(scope="module")
def server(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    srv = Server(smollm2_path, tmp_path_factory.mktemp("server"), ("profile=tensorboard",))
    yield srv
    srv.stop()


def _batch_text(model: Path, prompt: str, tokens: int, out: Path, weights: str = "dequantized") -> str:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        cfg = compose(config_name="config", overrides=[
            f"model.path={model}", f"prompts={json.dumps([prompt])}", f"generation.max_new_tokens={tokens}",
            f"runtime.weights={weights}", f"output.dir={out}",
        ])
    assert run(cfg, environ={}) == 0
    return json.loads((out / "results.jsonl").read_text().splitlines()[0])["text"]


def test_greedy_completion_equals_the_batch_command(server: Server, smollm2_path: Path, tmp_path: Path) -> None:
    prompt = "The lighthouse keeper climbed the stairs and"
    expected = _batch_text(smollm2_path, prompt, 24, tmp_path / "batch")
    done = server.client.completions.create(model=server.model, prompt=prompt, max_tokens=24, temperature=0)
    assert done.choices[0].text == expected
    stream = server.client.completions.create(
        model=server.model, prompt=prompt, max_tokens=24, temperature=0, stream=True
    )
    assert "".join(c.choices[0].text for c in stream if c.choices) == expected
    assert done.usage.completion_tokens <= 24 and done.usage.prompt_tokens > 0


def test_echoed_logprobs_over_two_stages_equal_task_score(server: Server, smollm2_path: Path, tmp_path: Path) -> None:
    """lm-evaluation-harness's request (token ids, echo, logprobs=1, max_tokens=1): the prompt's
    log-probabilities come from the last rank to the first behind the sampled ids and equal
    the one-stage task=score's within 1e-4; so does the generated token's, streamed or not."""
    ids = load_tokenizer(smollm2_path).encode("The capital of France is Paris. The capital of Italy is")
    reply = server.client.completions.create(model=server.model, prompt=ids, max_tokens=1, logprobs=1, echo=True,
                                             temperature=0)
    logprobs = reply.choices[0].logprobs
    assert len(logprobs.token_logprobs) == len(ids) + 1 and logprobs.token_logprobs[0] is None
    cfg_args = [f"model.path={smollm2_path}", "task=score", f"input.token_ids=[{','.join(map(str, ids))}]",
                "runtime.weights=dequantized", f"output.dir={tmp_path}"]
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base=None):
        assert run(compose(config_name="config", overrides=cfg_args), environ={}) == 0
    reference = torch.log_softmax(torch.from_numpy(np.load(tmp_path / "logits.npy")).double(), dim=-1)  # [T, V]
    expected = [reference[p - 1, ids[p]].item() for p in range(1, len(ids))] + [reference[-1].max().item()]
    assert logprobs.token_logprobs[1:] == pytest.approx(expected, abs=1e-4)
    assert all(max(top.values()) == pytest.approx(reference[p].max().item(), abs=1e-4)
               for p, top in enumerate(logprobs.top_logprobs[1:]))

    chunks = list(server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2, stream=True))
    whole = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Name a colour."}], max_tokens=6, temperature=0,
        logprobs=True, top_logprobs=2)
    streamed = [(e.token, e.logprob) for c in chunks if c.choices and c.choices[0].logprobs
                for e in c.choices[0].logprobs.content]
    assert streamed == [(e.token, e.logprob) for e in whole.choices[0].logprobs.content]
    assert len(streamed) == whole.usage.completion_tokens
    assert all(len(e.top_logprobs) == 2 for e in whole.choices[0].logprobs.content)


def test_n_choices_and_prompt_lists(server: Server) -> None:
    reply = server.client.completions.create(model=server.model, prompt=["Once upon a time", "The sea is"], n=3,
                                             max_tokens=5, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert sorted(c.index for c in reply.choices) == list(range(6))
    assert reply.usage.completion_tokens == 6 * 5
    again = server.client.completions.create(model=server.model, prompt=["Once upon a time", "The sea is"], n=3,
                                             max_tokens=5, temperature=1.0, seed=3, extra_body={"ignore_eos": True})
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]  # seeded: reproducible


TOOLS = [
    {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "London", "Rome"]},
                                         "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}},
    {"type": "function", "function": {"name": "add", "description": "The sum of two integers", "parameters": {
        "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
        "additionalProperties": False}}},
]


def _check_call(name: str, arguments: str) -> None:
    """A call of one of `TOOLS` whose arguments follow its schema (checked by hand)."""
    args = json.loads(arguments)
    if name == "get_weather":
        assert list(args) == ["city", "unit"] and args["city"] in ("Paris", "London", "Rome")
        assert args["unit"] in ("celsius", "fahrenheit")
    else:
        assert name == "add" and list(args) == ["a", "b"] and all(isinstance(v, int) for v in args.values())


def _streamed(chunks) -> tuple[str, list[tuple[str, str]], str]:
    """A streamed answer's content, calls (name, arguments) and finish reason, rebuilt from its
    deltas as a client would: a call's first delta has its id, type and name; then arguments."""
    content, calls, reason = "", [], None
    for chunk in chunks:
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for delta in choice.delta.tool_calls or []:
            if delta.id is not None:
                assert delta.index == len(calls) and delta.type == "function" and delta.function.arguments == ""
                calls.append([delta.function.name, ""])
            else:
                assert delta.function.name is None
                calls[delta.index][1] += delta.function.arguments
        reason = choice.finish_reason or reason
    return content, [tuple(c) for c in calls], reason


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "add"}}, "auto",
                                         "none"])
def test_tool_choices_with_the_openai_client(server: Server, tool_choice) -> None:
    """SmolLM2's template has no tools: the fallback describes them and asks for hermes calls.
    Required and named choices always give calls that parse and follow the schema; streamed
    (greedy) gives the same content and calls as whole."""
    messages = [{"role": "user", "content": "What is 17 plus 25?"}]
    # One call at most: a 135M model asked for calls repeats them until max_tokens otherwise.
    args = {"model": server.model, "messages": messages, "tools": TOOLS, "tool_choice": tool_choice,
            "max_tokens": 80, "temperature": 0, "parallel_tool_calls": False}
    whole = server.client.chat.completions.create(**args).choices[0]
    calls = [(c.function.name, c.function.arguments) for c in whole.message.tool_calls or []]
    assert _streamed(server.client.chat.completions.create(**args, stream=True)) == (
        whole.message.content or "", calls, whole.finish_reason)
    if tool_choice == "none":
        plain = server.client.chat.completions.create(model=server.model, messages=messages, max_tokens=80,
                                                      temperature=0).choices[0]
        assert (whole.message.content, whole.finish_reason, calls) == (plain.message.content, plain.finish_reason, [])
        return
    if tool_choice == "auto" and not calls:
        assert whole.finish_reason in ("stop", "length") and whole.message.content
        return
    assert calls and whole.finish_reason == "tool_calls"
    assert all(c.id.startswith("call_") and c.type == "function" for c in whole.message.tool_calls)
    for name, arguments in calls:
        _check_call(name, arguments)
    assert len(calls) == 1
    if isinstance(tool_choice, dict):
        assert [name for name, _ in calls] == ["add"]

    # the call and its result go back to the model as history
    history = [*messages, whole.message.model_dump(exclude_none=True),
               *({"role": "tool", "tool_call_id": c.id, "content": "42"} for c in whole.message.tool_calls)]
    after = server.client.chat.completions.create(model=server.model, messages=history, tools=TOOLS, max_tokens=20,
                                                  temperature=0)
    assert after.choices[0].finish_reason in ("stop", "length", "tool_calls")


def test_bad_tools_are_400s_naming_the_field(server: Server) -> None:
    messages = [{"role": "user", "content": "hi"}]
    for extra, field in [({"tool_choice": {"type": "function", "function": {"name": "nope"}}}, "tool_choice"),
                         ({"tools": [{"type": "function", "function": {"name": "has space"}}]}, "tools")]:
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.chat.completions.create(model=server.model, messages=messages, **({"tools": TOOLS} | extra))
        assert caught.value.param == field and caught.value.body["message"].startswith(field)
    assert server.client.chat.completions.create(model=server.model, messages=messages, max_tokens=2).choices


def _one(server: Server, i: int, results: dict) -> None:
    """One client of the load test: a random budget, EOS ignored, streamed or not."""
    rng = random.Random(i)
    tokens, streamed = rng.randint(1, 40), rng.random() < 0.5
    extra = {"ignore_eos": True}
    messages = [{"role": "user", "content": f"Tell me fact number {i} about the sea."}]
    if streamed:
        stream = server.client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=tokens, temperature=0.7, seed=i, stream=True,
            stream_options={"include_usage": True}, extra_body=extra,
        )
        text, usage, reasons = "", None, []
        for chunk in stream:
            if chunk.usage is not None:
                usage = chunk.usage
            for choice in chunk.choices:
                text += choice.delta.content or ""
                if choice.finish_reason:
                    reasons.append(choice.finish_reason)
        results[i] = (tokens, usage.completion_tokens if usage else None, reasons)
    else:
        done = server.client.chat.completions.create(
            model=server.model, messages=messages, max_tokens=tokens, temperature=0.7, seed=i, extra_body=extra,
        )
        results[i] = (tokens, done.usage.completion_tokens, [done.choices[0].finish_reason])


def test_load_64_concurrent_clients_each_get_exactly_their_tokens(server: Server) -> None:
    results: dict[int, tuple] = {}
    threads = [threading.Thread(target=_one, args=(server, i, results)) for i in range(64)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert sorted(results) == list(range(64)), f"lost clients: {sorted(set(range(64)) - set(results))}"
    for i, (wanted, got, reasons) in results.items():
        assert got == wanted, f"client {i} asked for {wanted} tokens, got {got}"
        assert reasons == ["length"], f"client {i}: finish reasons {reasons}"
    after = server.client.completions.create(model=server.model, prompt="Hello", max_tokens=2, temperature=0)
    assert after.usage.completion_tokens == 2


def test_quantized_greedy_tokens_alone_equal_those_among_16_concurrent_requests(smollm2_path: Path,
                                                                               tmp_path: Path) -> None:
    """With the default (quantized) weights every product row is the same bits whatever shares
    it, so a prompt's greedy tokens are the same sent alone, among 15 other requests in flight
    (2 lanes of 8: its rows beside different neighbours, prefill and decode) and from the batch
    command (one stage, one sequence)."""
    srv = Server(smollm2_path, tmp_path, ("pipeline.lane_size=8",), weights="quantized")
    try:
        prompt, tokens = "The lighthouse keeper climbed the stairs and", 16

        def greedy() -> tuple[list[str], str]:
            done = srv.client.completions.create(model=srv.model, prompt=prompt, max_tokens=tokens, temperature=0,
                                                 logprobs=1)
            return done.choices[0].logprobs.tokens, done.choices[0].text

        alone = greedy()
        among: dict[int, tuple[list[str], str] | str] = {}

        def client(i: int) -> None:
            if i == 0:
                among[i] = greedy()
                return
            done = srv.client.completions.create(  # neighbours of other lengths, greedy and sampled
                model=srv.model, prompt=f"Fact {i}: the sea " + "is deep and " * (i % 5), max_tokens=8 + i % 9,
                temperature=0.0 if i % 2 else 0.8, seed=i, extra_body={"ignore_eos": True})
            among[i] = done.choices[0].text
        threads = [threading.Thread(target=client, args=(i,)) for i in range(16)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
        assert sorted(among) == list(range(16))
        assert among[0] == alone
    finally:
        srv.stop()
    assert alone[1] == _batch_text(smollm2_path, prompt, tokens, tmp_path / "batch", weights="quantized")


def test_closing_a_stream_cancels_it_and_the_server_goes_on(server: Server) -> None:
    stream = server.client.chat.completions.create(
        model=server.model, messages=[{"role": "user", "content": "Count to a thousand."}], max_tokens=300,
        temperature=0, stream=True, extra_body={"ignore_eos": True},
    )
    for _ in stream:
        break
    stream.close()
    after = server.client.completions.create(model=server.model, prompt="Hi", max_tokens=3, temperature=0)
    assert after.usage.completion_tokens >= 1
    metrics = httpx.get(f"{server.url}/metrics", timeout=10).text
    assert "ppinfer_" in metrics


def test_auth_is_required(server: Server) -> None:
    anonymous = openai.OpenAI(base_url=f"{server.url}/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.models.list()


def test_bad_parameters_are_400_and_the_server_answers_after(server: Server) -> None:
    with pytest.raises(openai.BadRequestError, match="temperature"):
        server.client.completions.create(model=server.model, prompt="x", max_tokens=2, temperature=-1)
    with pytest.raises(openai.BadRequestError, match="context"):
        server.client.completions.create(model=server.model, prompt="word " * 500, max_tokens=2)
    with pytest.raises(openai.NotFoundError):
        server.client.completions.create(model="no-such-model", prompt="x", max_tokens=2)
    assert server.client.completions.create(model=server.model, prompt="x", max_tokens=1).usage.completion_tokens == 1


def test_requests_that_used_to_end_the_job_are_answered(server: Server) -> None:
    """Values a JSON number or string can carry, each of which once killed every rank."""
    nucleus_of_nothing = server.client.completions.create(
        model=server.model, prompt="Hi", max_tokens=1, temperature=1, top_p=1e-300)
    assert nucleus_of_nothing.usage.completion_tokens == 1
    for extra, field in (({"top_k": 2**64}, "top_k"), ({"repetition_penalty": 1e-300}, "repetition_penalty")):
        with pytest.raises(openai.BadRequestError) as caught:
            server.client.completions.create(
                model=server.model, prompt="Hi", max_tokens=2, temperature=1, extra_body=extra
            )
        assert caught.value.param == field
    surrogate = server.post(json.dumps({"model": server.model, "prompt": "a\ud800", "max_tokens": 2}).encode())
    nested = server.post(b'{"prompt": ' + b"[" * 1000 + b"]" * 1000 + b"}")
    assert (surrogate.status_code, nested.status_code) == (400, 400), (surrogate.text, nested.text)
    assert server.client.completions.create(model=server.model, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def _stream_tokens(server: Server, tokens: int, out: dict) -> None:
    """A streamed completion of `tokens` tokens (EOS ignored); `out` gets its SSE lines."""
    body = {"model": server.model, "prompt": "Once upon a time", "max_tokens": tokens, "stream": True,
            "ignore_eos": True, "stream_options": {"include_usage": True}}
    with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=120,
                      headers={"Authorization": f"Bearer {KEY}"}) as response:
        out["lines"] = [line for line in response.iter_lines() if line]


def _status_of_declared_body(server: Server, size: int) -> tuple[int, float]:
    """The status the server answers to headers announcing a `size`-byte body (none of which
    is sent), and how long it took."""
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}\r\n"
                     f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n".encode())
        status_line = sock.recv(4096).split(b"\r\n", 1)[0]
    return int(status_line.split()[1]), time.monotonic() - start


def test_huge_prompts_are_refused_quickly_beside_a_running_stream(server: Server) -> None:
    out: dict = {}
    reader = threading.Thread(target=_stream_tokens, args=(server, 60, out))
    reader.start()
    time.sleep(1.0)
    status, took = _status_of_declared_body(server, 100 * 2**20)
    assert (status, took < 5) == (413, True), (status, took)
    start = time.monotonic()
    with pytest.raises(openai.BadRequestError) as caught:  # under the byte limit, far over the context
        server.client.completions.create(model=server.model, prompt="word " * 400_000, max_tokens=2)
    assert caught.value.code == "context_length_exceeded" and time.monotonic() - start < 5
    reader.join(timeout=120)
    lines = out["lines"]
    assert lines[-1] == "data: [DONE]", lines[-3:]
    assert json.loads(lines[-2][len("data: "):])["usage"]["completion_tokens"] == 60


def test_800_idle_sockets_are_closed_by_the_server(server: Server) -> None:
    idle = [socket.create_connection(("127.0.0.1", server.port)) for _ in range(800)]
    try:
        deadline = time.monotonic() + HEADER_TIMEOUT_S + 10
        for sock in idle:
            sock.settimeout(max(0.1, deadline - time.monotonic()))
            with contextlib.suppress(ConnectionResetError):
                assert sock.recv(16) == b"", "the server answered a request that was never sent"
    finally:
        for sock in idle:
            sock.close()
    assert server.client.completions.create(model=server.model, prompt="Hi", max_tokens=2).usage.completion_tokens >= 1


def test_a_stalled_ring_shows_on_health_and_recovers(server: Server) -> None:
    out: dict = {}
    reader = threading.Thread(target=_stream_tokens, args=(server, 80, out))
    reader.start()
    time.sleep(1.0)
    last = server.worker(1)
    last.suspend()
    try:
        deadline = time.monotonic() + STALL_TIMEOUT_S + 10
        while server.health() != "stalled":
            assert time.monotonic() < deadline, "/health never said stalled"
            time.sleep(0.2)
    finally:
        last.resume()
    reader.join(timeout=120)
    assert out["lines"][-1] == "data: [DONE]"
    assert server.health() == "ok"


def test_sigterm_ends_every_rank_within_5_s(server: Server) -> None:
    """Last: the shutdown ends the module's server. An open stream ends (an error event or its
    last token), no process of the job is left, and `profile=tensorboard` means what it means
    for the batch command: every rank wrote its TensorBoard events."""
    events: list[str] = []

    def long_stream() -> None:
        body = {"model": server.model, "prompt": "Once", "max_tokens": 300, "stream": True, "ignore_eos": True}
        try:
            with httpx.stream("POST", f"{server.url}/v1/completions", json=body, timeout=60,
                              headers={"Authorization": f"Bearer {KEY}"}) as response:
                events.extend(line for line in response.iter_lines() if line)
        except httpx.HTTPError as exc:
            events.append(f"transport error: {exc}")

    reader = threading.Thread(target=long_stream)
    reader.start()
    time.sleep(2.0)
    start = time.monotonic()
    os.killpg(server.proc.pid, signal.SIGTERM)
    server.proc.wait(timeout=SHUTDOWN_BOUND_S + 10)
    took = time.monotonic() - start
    reader.join(timeout=10)
    assert took < SHUTDOWN_BOUND_S, f"shutdown took {took:.1f} s"
    assert len(server.tree.alive()) == 0, describe(server.tree.alive())
    assert events, "the open stream received nothing"
    assert events[-1] == "data: [DONE]" or any('"error"' in e for e in events), events[-3:]
    for rank in (0, 1):
        assert list((server.out / "tensorboard" / f"rank{rank}").glob("events.out.tfevents.*")), rank


def test_a_dead_rank_makes_the_server_answer_503_and_the_job_exit(smollm2_path: Path, tmp_path: Path) -> None:
    srv = Server(smollm2_path, tmp_path)
    try:
        srv.worker(1).kill()
        statuses = set()
        deadline = time.monotonic() + DEAD_RANK_BOUND_S
        while srv.proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                statuses.add(httpx.get(f"{srv.url}/health", timeout=1).status_code)
            time.sleep(0.2)
        assert srv.proc.poll() is not None, "the job outlived its dead rank"
        assert 503 in statuses, f"/health answered {statuses}"
        assert len(srv.tree.alive()) == 0, describe(srv.tree.alive())
    finally:
        srv.stop()


def test_an_idle_server_outlives_the_ranks_timeout(smollm2_path: Path, tmp_path: Path) -> None:
    """With nothing to do, the first rank pings the ring, so the other ranks' receives
    (bounded by runtime.timeout_s) never expire."""
    srv = Server(smollm2_path, tmp_path, ("runtime.timeout_s=1",))
    try:
        time.sleep(6)
        done = srv.client.completions.create(model=srv.model, prompt="Hello", max_tokens=3, temperature=0)
        assert done.usage.completion_tokens == 3 or done.choices[0].finish_reason == "stop"
        assert srv.proc.poll() is None
        start = time.monotonic()  # and an idle server ends within the bound
        os.killpg(srv.proc.pid, signal.SIGTERM)
        srv.proc.wait(timeout=SHUTDOWN_BOUND_S + 10)
        assert time.monotonic() - start < SHUTDOWN_BOUND_S
        assert len(srv.tree.alive()) == 0, describe(srv.tree.alive())
    finally:
        srv.stop()
