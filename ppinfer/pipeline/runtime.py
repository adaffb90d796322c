"""The per-rank loop: the first stage drives the ring, middle stages relay, the last stage
samples. With one stage the same code runs without any process group."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import dataclass, field

import torch

from ppinfer.model import KVCache, PipelineStage
from ppinfer.pipeline.intake import Intake
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequences import Sequences
from ppinfer.pipeline.sinks import Sampled, Sink
from ppinfer.pipeline.transport import Transport
from ppinfer.pipeline.wire import (
    Admission,
    Control,
    Msg,
    decode_admissions,
    decode_logprobs,
    encode_admissions,
    encode_logprobs,
)
from ppinfer.pipeline.work import AwaitTokens, ItemKind, WorkItem, item_positions
from ppinfer.profiling.trace import NULL_TRACER, Tracer


@dataclass
class Span:
    """One compute interval of this stage (for the timeline and the bubble)."""

    start: float
    end: float
    lane: int
    kind: ItemKind


@dataclass
class StageClock:
    """Where this rank's time went during the loop."""

    compute_s: float = 0.0
    spans: list[Span] = field(default_factory=list)
    loop_start: float = 0.0
    loop_end: float = 0.0

    @property
    def wall_s(self) -> float:
        return self.loop_end - self.loop_start

    def decode_idle_fraction(self) -> float:
        """Idle share of this stage in the decode phase after the fill: from the moment every
        lane has started decoding to the last decode computation (0 without decode)."""
        decode = [s for s in self.spans if s.kind is ItemKind.DECODE]
        if not decode:
            return 0.0
        first_by_lane: dict[int, float] = {}
        for span in decode:
            first_by_lane.setdefault(span.lane, span.start)
        start, end = max(first_by_lane.values()), decode[-1].end
        busy = sum(min(s.end, end) - max(s.start, start) for s in self.spans if s.end > start and s.start < end)
        return max(0.0, 1.0 - busy / (end - start)) if end > start else 0.0


class StageRunner:
    """Runs work items through this rank's stage, owning one KV cache per lane (rows of
    `lane_size` sequences, `capacity` slots each); on the last stage its `sink` (lm_head,
    sampling or scoring) runs inside the same timed span."""

    def __init__(
        self,
        stage: PipelineStage,
        n_lanes: int,
        lane_size: int,
        capacity: int,
        sink: Sink | None = None,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self.stage, self.sink, self.tracer = stage, sink, tracer
        self.lane_size, self.capacity = lane_size, capacity
        self.caches: list[KVCache | None] = [None] * n_lanes
        self.clock = StageClock()

    def cache_for(self, item: WorkItem) -> KVCache:
        cache = self.caches[item.lane]
        if cache is None:
            cache = self.caches[item.lane] = self.stage.new_cache(self.lane_size, self.capacity)
        for step in item.rows:
            if step.reset:
                cache.reset(step.row, step.row + 1)
        return cache

    def admit(self, admissions: list[Admission]) -> None:
        """Sequences about to start (last stage: their sampling settings)."""
        if self.sink is not None:
            self.sink.admit(admissions)

    def run(self, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor | None) -> StepResult:
        """Embed `ids` [b, T] (first stage) or take `hidden` [b, T, E]; run this stage's
        layers for the item's rows, then the sink if this is the last stage."""
        start = time.perf_counter()
        cache = self.cache_for(item)
        positions = item_positions(item).to(self.stage.device)
        if hidden is None:
            with self.tracer.range("embed"):
                hidden = self.stage.embed(ids.to(self.stage.device))
        with self.tracer.range("layers"):
            out = self.stage.forward(hidden, positions, cache, item.row_ids)
        result = StepResult(out)
        if self.sink is not None:
            result.sampled = self.sink.consume(self.stage, item, ids, out)
        end = time.perf_counter()
        self.clock.compute_s += end - start
        self.clock.spans.append(Span(start, end, item.lane, item.kind))
        return result

    def busy(self, rank: int, upstream: tuple[float, ...], world: int) -> tuple[float, ...]:
        """Every stage's busy seconds as known here: `upstream`'s, with this rank's own."""
        busy = list(upstream) + [0.0] * (world - len(upstream))
        busy[rank] = self.clock.compute_s
        return tuple(busy)


@dataclass
class StepResult:
    """What one work item produced on this stage."""

    hidden: torch.Tensor  # [b, T, E]
    sampled: Sampled | None = None  # last stage: sampled ids [b] after a sampling item


def run_first(
    runner: StageRunner,
    scheduler: Scheduler,
    sequences: Sequences,
    transport: Transport | None,
    intake: Intake,
) -> None:
    """Rank 0: drive the ring until the intake is closed (or stopped) and nothing is left.
    With `transport` None this rank is the whole pipeline: the runner's sink samples in place
    and the ids go straight back to the scheduler."""
    local: deque[Sampled] = deque()  # one-stage run: sampled ids in issue order
    world = transport.world if transport is not None else 1
    ping = transport.send_ping if transport is not None else None
    runner.clock.loop_start = time.perf_counter()
    while True:
        intake.pull(scheduler, sequences)
        action = scheduler.next()
        if action is None:
            if not intake.wait(scheduler, ping):
                break
            continue
        if isinstance(action, AwaitTokens):
            item = scheduler.in_flight(action.lane)
            if transport is None:
                sampled = local.popleft()
                busy = runner.busy(0, (), 1)
            else:
                control, tokens, extra = transport.recv_tokens()
                if control.item != item:
                    raise RuntimeError(f"expected the ids of {item}, got {control.item}")
                sampled = Sampled(tokens, decode_logprobs(extra) if extra else None)
                busy = runner.busy(0, control.busy_s, world)
            intake.progress(busy)
            sequences.tokens_arrived(item, sampled.tokens.tolist(), sampled.logprobs)
            scheduler.tokens_arrived(action.lane)
            if transport is not None and scheduler.awaiting():
                transport.expect_tokens()
            continue
        item = action
        admissions = sequences.admissions(item)
        if admissions:
            runner.admit(admissions)
            if transport is not None:
                transport.send_admit(encode_admissions(admissions))
        ids = sequences.input_ids(item)
        result = runner.run(item, ids, None)
        if transport is not None:
            transport.send_item(Control(Msg.ITEM, item, runner.busy(0, (), world)), ids, result.hidden)
            if item.samples:
                transport.expect_tokens()
        elif result.sampled is not None:
            local.append(result.sampled)
        runner.tracer.step()
    if transport is not None:
        transport.send_stop()
        transport.flush()
    runner.clock.loop_end = time.perf_counter()


def run_relay(runner: StageRunner, transport: Transport) -> None:
    """Ranks 1..S-1: receive, compute, pass on (middle) or send sampled ids back (last)."""
    runner.clock.loop_start = time.perf_counter()
    last = runner.sink is not None
    while True:
        received = transport.recv_item()
        control = received.control
        if control.msg is Msg.STOP:
            transport.send_stop()
            break
        if control.msg is Msg.PING:
            transport.send_ping()
            continue
        if control.msg is Msg.ADMIT:
            if last:
                runner.admit(decode_admissions(received.payload))
            else:
                transport.send_admit(received.payload)
            continue
        item = control.item
        assert item is not None and received.ids is not None and received.hidden is not None
        result = runner.run(item, received.ids, received.hidden)
        passed = Control(control.msg, item, runner.busy(transport.rank, control.busy_s, transport.world))
        if not last:
            transport.send_item(passed, received.ids, result.hidden)
        elif result.sampled is not None:
            logprobs = result.sampled.logprobs
            transport.send_tokens(passed, result.sampled.tokens, encode_logprobs(logprobs) if logprobs else b"")
        runner.tracer.step()
    transport.flush()
    runner.clock.loop_end = time.perf_counter()
