"""The `Engine` the HTTP layer talks to, on the pipeline's first rank: requests submitted
from the server's thread are handed to the scheduler between two steps of the ring (the
`Arrivals` of `run_first`), and their tokens go back through each request's `emit`."""

from __future__ import annotations

import secrets
import threading
import time
from collections import deque

from ppinfer.generation.params import GenerationParams
from ppinfer.generation.sampling import stream_seed
from ppinfer.generation.stopping import StopState
from ppinfer.generation.tokenizer import Tokenizer
from ppinfer.pipeline.job import encode_prompt
from ppinfer.pipeline.requests import Requests, Sequence
from ppinfer.pipeline.schedule import Scheduler
from ppinfer.pipeline.transport import Transport
from ppinfer.serving.engine import Emit, EngineFull, EngineStats, EngineUnavailable, PromptTooLong

PING_INTERVAL_S = 1.0
"""An idle first rank pings the ring this often (or 4 times per `runtime.timeout_s` when that
is shorter), so the other ranks' receives never expire while the server waits for requests."""

SHUTDOWN = "the server is shutting down"


class PipelineEngine:
    """Requests in, events out; `run_first` drives it through `pull`, `wait` and `busy`."""

    def __init__(
        self,
        model_id: str,
        tokenizer: Tokenizer,
        context_length: int,
        defaults: GenerationParams,
        max_queue: int,
        rows: int,
        chat_template: str | None = None,
        peer_timeout_s: float = float("inf"),
        stall_timeout_s: float = float("inf"),
    ) -> None:
        self.model_id, self.tokenizer, self.context_length = model_id, tokenizer, context_length
        self.defaults, self.max_queue, self.chat_template = defaults, max_queue, chat_template
        self.rows = rows  # sequences the lanes hold at once
        self._ping_s = min(PING_INTERVAL_S, peer_timeout_s / 4)
        self._stall_s = stall_timeout_s
        self._eog = frozenset(tokenizer.eog_ids)
        self._lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._cancels: list[int] = []
        self._next_id = 0
        self._waiting = 0  # admitted to the scheduler, not yet in a row
        self._running = 0
        self._busy: tuple[float, ...] = ()
        self._started = time.monotonic()
        self._progress_at = time.monotonic()  # last sampled ids, or when work began
        self._ready = False
        self._stopping = False
        self._failure: str | None = None

    # ---- the HTTP side (any thread) --------------------------------------------------------

    def ready(self) -> bool:
        return self._ready and not self._stopping and self._failure is None

    def failure(self) -> str | None:
        return self._failure

    def stall(self) -> str | None:
        with self._lock:
            working = self._waiting + self._running > 0
            quiet = time.monotonic() - self._progress_at
        if working and quiet > self._stall_s:
            return f"no sampled token has come back for {quiet:.0f} s while sequences run"
        return None

    def encode_prompt(self, text: str) -> list[int]:
        self._check_fits(text)
        return encode_prompt(self.tokenizer, text, chat=False)

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        self._check_fits("".join(m["content"] for m in messages))
        text = self.tokenizer.apply_chat_template(messages, template=self.chat_template)
        return encode_prompt(self.tokenizer, text, chat=True)

    def _check_fits(self, text: str) -> None:
        """Refuse, before tokenizing it, text too long for the context whatever its tokens:
        no token covers more bytes of text than the longest vocabulary entry holds."""
        size = len(text.encode("utf-8", "surrogatepass"))
        fewest = -(-size // self.tokenizer.max_token_bytes)
        if fewest >= self.context_length:
            raise PromptTooLong(
                f"the prompt's {size} bytes make at least {fewest} tokens; the context length is "
                f"{self.context_length}"
            )

    def submit(self, prompt_ids: list[int], params: GenerationParams, emit: Emit) -> int:
        if not prompt_ids:
            raise ValueError("the prompt is empty after tokenization")
        if len(prompt_ids) + params.max_new_tokens > self.context_length:
            raise ValueError(
                f"{len(prompt_ids)} prompt tokens + max_tokens={params.max_new_tokens} exceed the "
                f"context length of {self.context_length}"
            )
        with self._lock:
            if self._failure is not None or self._stopping or not self._ready:
                raise EngineUnavailable(self._failure or (SHUTDOWN if self._stopping else "the model is still loading"))
            # Only requests that will not find a free row count as queued.
            queued = len(self._incoming) + self._waiting - (self.rows - self._running)
            if queued >= self.max_queue:
                raise EngineFull(f"{self.max_queue} requests are waiting already (server.max_queue)")
            seq = self._next_id
            self._next_id += 1
            seed = stream_seed(params.seed, 0) if params.seed is not None else secrets.randbits(63)
            stop = StopState(params.stop_conditions(self._eog), self._decode)
            self._incoming.append(Sequence(seq, list(prompt_ids), params, seed, stop=stop, emit=emit))
            self._lock.notify()
        return seq

    def cancel(self, request_id: int) -> None:
        with self._lock:
            self._cancels.append(request_id)
            self._lock.notify()

    def stats(self) -> EngineStats:
        with self._lock:
            waiting = len(self._incoming) + self._waiting
            return EngineStats(waiting, self._running, self._busy, time.monotonic() - self._started)

    def stop(self) -> None:
        """Stop accepting; requests still waiting or running end with an error event."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    # ---- the pipeline side (the first rank's loop) -----------------------------------------

    def started(self) -> None:
        with self._lock:
            self._ready = True
            self._started = time.monotonic()

    def failed(self, why: str, requests: Requests) -> None:
        """The pipeline stopped under the requests: every one ends with an error."""
        with self._lock:
            self._failure = why
            pending = list(self._incoming)
            self._incoming.clear()
        for sequence in pending:
            requests.add(sequence)
        requests.fail_all(why)

    def pull(self, scheduler: Scheduler, requests: Requests) -> None:
        with self._lock:
            arrived, self._incoming = list(self._incoming), deque()
            cancels, self._cancels = self._cancels, []
            stopping = self._stopping
        for sequence in arrived:
            scheduler.add(requests.add(sequence))
        if stopping:
            cancels = requests.live()
        for seq in cancels:
            if scheduler.withdraw(seq):
                requests.cancel(seq, SHUTDOWN if stopping else None)
                requests.drop(seq)
            else:
                requests.cancel(seq, SHUTDOWN if stopping else None)
        with self._lock:
            if self._waiting + self._running == 0:
                self._progress_at = time.monotonic()  # work starts now
            self._waiting, self._running = scheduler.waiting, scheduler.running

    def wait(self, scheduler: Scheduler, requests: Requests, transport: Transport | None) -> bool:
        with self._lock:
            if self._stopping and scheduler.idle():
                return False
            if not self._incoming and not self._cancels and not self._stopping:
                if not self._lock.wait(self._ping_s) and transport is not None:
                    transport.send_ping()
        return True

    def busy(self, stages: tuple[float, ...]) -> None:
        with self._lock:
            self._busy = stages
            self._progress_at = time.monotonic()

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special=True)
