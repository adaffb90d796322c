"""The server's engine on one process, without HTTP: requests submitted from other threads
while the ring runs, refilled into free slots, each with its own settings.

References: the batch command's own results for the same prompts and settings (a different
lane layout: every prompt in one wave), never the engine's own output of another run.
"""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra import compose, initialize_config_dir

from ppinfer.model import build_stage
from ppinfer.pipeline.batch import run
from ppinfer.pipeline.intake import Intake, QueueFull
from ppinfer.pipeline.job import DistEnv, prepare
from ppinfer.pipeline.runtime import StageRunner, run_first
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequence import Finished, TokenDelta
from ppinfer.pipeline.sequences import Sequences
from ppinfer.pipeline.sinks import SampleSink, grammar_vocab
from ppinfer.sampling.params import GenerationParams
from ppinfer.serving.engine import PromptTooLong
from ppinfer.serving.pipeline_engine import PipelineEngine

CONF = str(Path(__file__).resolve().parent.parent / "conf")
PROMPTS = [
    ("The capital of France is", {"max_new_tokens": 6}),
    ("Once upon a time", {"max_new_tokens": 14, "temperature": 0.9, "seed": 5}),
    ("def fibonacci(n):", {"max_new_tokens": 9, "repetition_penalty": 1.3}),
    ("The three primary colours are", {"max_new_tokens": 11, "stop": [","]}),
    ("A haiku about the sea:", {"max_new_tokens": 3, "top_k": 5, "temperature": 1.5, "seed": 1}),
]
ENV = DistEnv(0, 1, 0, 1)


def _cfg(overrides: list[str]):
    with initialize_config_dir(config_dir=CONF, version_base=None):
        return compose(config_name="config", overrides=overrides)


def _batch_results(tmp_path: Path, smollm2_path: Path) -> list[dict]:
    """The batch command on the same prompts: one lane holding all of them."""
    lines = tmp_path / "prompts.jsonl"
    lines.write_text("\n".join(json.dumps({"prompt": p, **s}) for p, s in PROMPTS) + "\n")
    out = tmp_path / "batch"
    cfg = _cfg([f"model.path={smollm2_path}", f"prompts_file={lines}", f"output.dir={out}",
                "runtime.weights=dequantized", "pipeline.lane_size=5", "pipeline.microbatches=1"])
    assert run(cfg, environ={}) == 0
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


class _Client:
    """Collects one request's events, as the HTTP layer would."""

    def __init__(self) -> None:
        self.deltas: list[TokenDelta] = []
        self.finished: Finished | None = None
        self.done = threading.Event()

    def __call__(self, event) -> None:
        if isinstance(event, Finished):
            self.finished = event
            self.done.set()
        else:
            self.deltas.append(event)


@pytest.fixture(scope="module")
def served(smollm2_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """An engine on a 2-lane x 2-slot ring in a background thread (so 5 prompts must refill)."""
    cfg = _cfg([f"model.path={smollm2_path}", "runtime.weights=dequantized", "pipeline.microbatches=2",
                "pipeline.lane_size=2", "server.context_length=256", "server.max_queue=8",
                f"output.dir={tmp_path_factory.mktemp('serve')}"])
    job = prepare(cfg, ENV, False, False, serve=True)
    stage = build_stage(job.model_path, job.plan, job.dtype, job.device, weights="dequantized")
    intake = Intake(rows=job.n_lanes * job.lane_size, max_queue=cfg.server.max_queue)
    engine = PipelineEngine("smollm2", job.tokenizer, job.capacity, job.params[0], intake)
    sink = SampleSink(grammar=lambda: grammar_vocab(job.tokenizer))
    runner = StageRunner(stage, job.n_lanes, job.lane_size, job.capacity, job.kv_tokens, job.kv_dtype, sink=sink)
    scheduler = job.scheduler()

    def loop() -> None:
        with torch.inference_mode():
            run_first(runner, scheduler, Sequences(), None, intake)

    intake.start()
    thread = threading.Thread(target=loop, daemon=True)
    thread.start()
    yield engine
    intake.stop()
    thread.join(timeout=20)
    assert not thread.is_alive(), "the engine loop did not end after stop()"


def test_concurrent_requests_match_the_batch_command(
    served: PipelineEngine, tmp_path: Path, smollm2_path: Path
) -> None:
    expected = _batch_results(tmp_path, smollm2_path)
    clients = []
    for text, settings in PROMPTS:
        client = _Client()
        served.submit(served.encode_prompt(text), served.defaults.updated(settings), client)
        clients.append(client)
    for client, want in zip(clients, expected):
        assert client.done.wait(60), "a request never finished"
        assert client.finished is not None
        streamed = "".join(d.text for d in client.deltas) + client.finished.text
        assert streamed == want["text"]
        assert client.finished.reason == want["finish_reason"]
        # An end-of-generation token that ended the answer is neither counted nor reported.
        answer = want["token_ids"]
        if want["finish_reason"] == "stop" and answer[-1] in served.tokenizer.eog_ids:
            answer = answer[:-1]
        assert client.finished.completion_tokens == len(answer)
        assert client.finished.prompt_tokens == len(want["prompt_ids"])
        ids = [i for d in client.deltas for i in d.token_ids] + list(client.finished.token_ids)
        assert ids == answer


def _score_logprobs(smollm2_path: Path, ids: list[int], out: Path) -> torch.Tensor:
    """`task=score`'s logits for `ids`, log-softmaxed in float64: [T, V]."""
    cfg = _cfg([f"model.path={smollm2_path}", "task=score", f"input.token_ids=[{','.join(map(str, ids))}]",
                "runtime.weights=dequantized", f"output.dir={out}"])
    assert run(cfg, environ={}) == 0
    return torch.log_softmax(torch.from_numpy(np.load(out / "logits.npy")).double(), dim=-1)


def test_echoed_prompt_logprobs_equal_task_score(served: PipelineEngine, smollm2_path: Path, tmp_path: Path) -> None:
    """A prompt longer than one prefill chunk (the last position of a chunk predicts the next
    chunk's first token), next to a request that decodes: every prompt token's log-probability,
    the top alternatives and the first generated token's equal task=score's within 1e-4."""
    text = " ".join(f"Line {i}: the quick brown fox jumps over the lazy dog." for i in range(12))
    ids = served.encode_prompt(text)
    assert 128 < len(ids) < 250
    neighbour = _Client()
    served.submit(served.encode_prompt("Count to ten:"), served.defaults.updated({"max_new_tokens": 30}), neighbour)
    client = _Client()
    served.submit(ids, served.defaults.updated({"max_new_tokens": 2, "logprobs": 3, "prompt_logprobs": 2}), client)
    assert client.done.wait(60) and neighbour.done.wait(60)
    events = [*client.deltas, client.finished]
    prompt = next(e.prompt_logprobs for e in events if e.prompt_logprobs)
    assert len(prompt) == len(ids) and prompt[0] is None
    reference = _score_logprobs(smollm2_path, ids, tmp_path)  # [T, V]
    for position, entry in enumerate(prompt[1:], start=1):
        assert entry.token == ids[position]
        assert abs(entry.logprob - reference[position - 1, ids[position]].item()) < 1e-4
        top = reference[position - 1].topk(2)
        assert [t for t, _ in entry.top] == top.indices.tolist()
        assert [v for _, v in entry.top] == pytest.approx(top.values.tolist(), abs=1e-4)
    generated = [lp for e in events for lp in e.logprobs]
    first = generated[0]
    assert abs(first.logprob - reference[len(ids) - 1, first.token].item()) < 1e-4
    assert first.top[0][0] == first.token  # greedy: the chosen token is the most likely
    assert len(first.top) == 3


def test_logit_bias_forces_a_token(served: PipelineEngine) -> None:
    forced = served.encode_prompt(" banana")[-1]
    client = _Client()
    params = served.defaults.updated({"max_new_tokens": 5, "logit_bias": {str(forced): 100}, "ignore_eos": True})
    served.submit(served.encode_prompt("Hello"), params, client)
    assert client.done.wait(60)
    assert [i for d in client.deltas for i in d.token_ids] + list(client.finished.token_ids) == [forced] * 5


def test_penalties_follow_openais_formula_on_task_score_logits(
    served: PipelineEngine, smollm2_path: Path, tmp_path: Path
) -> None:
    """Greedy decoding with presence and frequency penalties, step by step against task=score's
    logits with OpenAI's formula applied by hand (counts over the generated tokens)."""
    presence, frequency, steps = 2.0, 2.0, 6
    prompt = served.encode_prompt("Say it again and again: yes yes yes yes")
    expected: list[int] = []
    flipped = False
    for step in range(steps):
        logits = _score_logprobs(smollm2_path, prompt + expected, tmp_path / f"s{step}")[-1]  # [V]
        penalized = logits.clone()
        for token in set(expected):
            penalized[token] -= expected.count(token) * frequency + presence
        flipped |= int(penalized.argmax()) != int(logits.argmax())
        expected.append(int(penalized.argmax()))
    assert flipped, "the case must be one where the penalties change the answer"
    client = _Client()
    params = served.defaults.updated({"max_new_tokens": steps, "presence_penalty": presence,
                                      "frequency_penalty": frequency, "ignore_eos": True})
    served.submit(prompt, params, client)
    assert client.done.wait(60)
    assert [i for d in client.deltas for i in d.token_ids] + list(client.finished.token_ids) == expected


SCHEMA = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "maxLength": 20},
        "kind": {"enum": ["capital", "port", "village"]},
        "population": {"type": "integer", "minimum": 0, "maximum": 99999999},
        "districts": {
            "type": "array", "maxItems": 2,
            "items": {"type": "object", "properties": {"name": {"type": "string", "maxLength": 30}},
                      "required": ["name"], "additionalProperties": False},
        },
    },
    "required": ["city", "kind", "population", "districts"],
    "additionalProperties": False,
}


@pytest.mark.parametrize("temperature", [0.0, 1.2])
def test_json_schema_output_parses_and_follows_the_schema(served: PipelineEngine, temperature: float) -> None:
    """Nested objects, an enum, an array: the answer is JSON of that shape, checked by hand
    (greedy and sampled), and ends when the document does."""
    client = _Client()
    params = served.defaults.updated({
        "max_new_tokens": 120, "temperature": temperature, "seed": 4,
        "response_format": {"type": "json_schema", "json_schema": {"name": "town", "schema": SCHEMA, "strict": True}},
    })
    prompt = served.encode_chat([{"role": "user", "content": "Describe Paris as JSON."}])
    served.submit(prompt, params, client)
    assert client.done.wait(120)
    text = "".join(d.text for d in client.deltas) + client.finished.text
    assert client.finished.reason == "stop", text
    answer = json.loads("".join(d.text for d in client.deltas) + client.finished.text)
    assert list(answer) == ["city", "kind", "population", "districts"]
    assert isinstance(answer["city"], str) and len(answer["city"]) <= 20
    assert answer["kind"] in ("capital", "port", "village") and isinstance(answer["population"], int)
    assert len(answer["districts"]) <= 2 and all(list(d) == ["name"] for d in answer["districts"])

    free = _Client()
    served.submit(prompt, served.defaults.updated({"max_new_tokens": 30, "response_format": {"type": "json_object"}}),
                  free)
    assert free.done.wait(60)
    text = "".join(d.text for d in free.deltas) + free.finished.text
    assert text.startswith("{")
    if free.finished.reason == "stop":
        assert isinstance(json.loads(text), dict)


def test_a_repeated_prompt_starts_on_cached_blocks(served: PipelineEngine) -> None:
    """The second time a long prompt comes, its row starts on the blocks the first left in the
    pool (the hit rate moves) and the greedy answer is the same."""
    prompt = served.encode_prompt(
        "Summarise in one line: the lighthouse keeper climbed the narrow stairs every evening, trimmed the "
        "wick and polished the great lens until it shone over the harbour and the rocks."
    )
    assert len(prompt) > 32
    params = served.defaults.updated({"max_new_tokens": 12, "ignore_eos": True})
    answers = []
    for _ in range(2):
        client = _Client()
        served.submit(prompt, params, client)
        assert client.done.wait(60) and client.finished is not None
        answers.append("".join(d.text for d in client.deltas) + client.finished.text)
        if not answers[1:]:
            before = served.stats().kv
    after = served.stats().kv
    assert after.blocks_total > 0 and after.prefix_hit_rate > before.prefix_hit_rate
    assert answers[0] == answers[1]


def test_stream_never_shows_a_stop_string_prefix_that_gets_cut(served: PipelineEngine) -> None:
    client = _Client()
    params = served.defaults.updated({"max_new_tokens": 40, "stop": [" the"]})
    served.submit(served.encode_prompt("Write one sentence about the moon and the sun."), params, client)
    assert client.done.wait(60)
    streamed = "".join(d.text for d in client.deltas)
    assert " the" not in streamed + client.finished.text
    assert streamed == (streamed + client.finished.text)[: len(streamed)]


def test_cancel_frees_the_slot_and_others_continue(served: PipelineEngine) -> None:
    long_running = _Client()
    rid = served.submit(
        served.encode_prompt("Count slowly:"),
        served.defaults.updated({"max_new_tokens": 200, "ignore_eos": True}),
        long_running,
    )
    served.cancel(rid)
    assert long_running.done.wait(30)
    assert long_running.finished.reason == "cancelled"
    after = _Client()
    served.submit(served.encode_prompt("Hello"), served.defaults.updated({"max_new_tokens": 3}), after)
    assert after.done.wait(30) and after.finished.reason in ("stop", "length")


def test_bad_requests_are_refused_before_they_queue(served: PipelineEngine) -> None:
    with pytest.raises(ValueError, match="context length of 256"):
        served.submit([1] * 250, served.defaults.updated({"max_new_tokens": 10}), _Client())
    with pytest.raises(ValueError, match="empty"):
        served.submit([], served.defaults, _Client())


def _engine(smollm2_path: Path, context: int, intake: Intake) -> PipelineEngine:
    return PipelineEngine("m", _tokenizer(smollm2_path), context, GenerationParams(), intake)


def test_queue_limit(smollm2_path: Path) -> None:
    """A burst first fills the free rows; only what waits beyond them counts against
    server.max_queue (no loop runs, so nothing drains it)."""
    intake = Intake(rows=3, max_queue=2)
    engine = _engine(smollm2_path, 64, intake)
    intake.start()
    for _ in range(3 + 2):
        engine.submit([1, 2], GenerationParams(max_new_tokens=2), _Client())
    with pytest.raises(QueueFull, match=r"server.max_queue"):
        engine.submit([1, 2], GenerationParams(max_new_tokens=2), _Client())


def test_a_prompt_too_long_for_any_tokenization_is_refused_before_tokenizing(smollm2_path: Path) -> None:
    engine = _engine(smollm2_path, 64, Intake(rows=1))
    tokenizer = engine.tokenizer
    fits = "x" * (63 * tokenizer.max_token_bytes)  # one token per longest entry still fits
    assert len(engine.encode_prompt("Hello there")) == len(tokenizer.encode("Hello there"))
    assert engine.encode_prompt(fits) == tokenizer.encode(fits)
    for prompt in (fits + "x", [{"role": "user", "content": fits + "x"}]):
        encode = engine.encode_prompt if isinstance(prompt, str) else engine.encode_chat
        with pytest.raises(PromptTooLong, match="context length is 64"):
            encode(prompt)


def test_stall_is_reported_while_work_makes_no_progress(smollm2_path: Path) -> None:
    intake = Intake(rows=2, max_queue=2, stall_timeout_s=0.2)
    engine = _engine(smollm2_path, 64, intake)
    intake.start()
    scheduler = Scheduler(1, 2, 8, 64)
    sequences = Sequences()
    time.sleep(0.3)
    assert engine.stall() is None  # idle for a while: nothing is stuck
    engine.submit([1, 2], GenerationParams(max_new_tokens=4), _Client())
    intake.pull(scheduler, sequences)
    assert engine.stall() is None  # the clock starts when the work does
    time.sleep(0.3)
    assert "no sampled token" in engine.stall()
    intake.progress((0.1,))
    assert engine.stall() is None


def _tokenizer(path: Path):
    from ppinfer.text.tokenizer import load_tokenizer

    return load_tokenizer(path)


def test_a_port_in_use_is_a_one_line_config_error() -> None:
    import socket

    from ppinfer.errors import ConfigError
    from ppinfer.serving.launch import check_port

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(ConfigError, match=f"server.port={port}: cannot listen there \\(Address already in use\\)"):
            check_port("127.0.0.1", port)
