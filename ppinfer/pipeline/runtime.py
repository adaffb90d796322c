"""The per-rank loop: the first stage drives the ring, middle stages relay, the last stage
samples. With one stage the same code runs without any process group."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ppinfer.model import PipelineStage, StageState
from ppinfer.pipeline.batches import Batch
from ppinfer.pipeline.schedule import AwaitTokens, Kind, RingScheduler, WorkItem
from ppinfer.pipeline.sinks import Sink
from ppinfer.pipeline.transport import Msg, Transport
from ppinfer.profiling.trace import NULL_TRACER, Tracer


@dataclass
class Span:
    """One compute interval of this stage (for the timeline and the bubble)."""

    start: float
    end: float
    lane: int
    kind: Kind


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
        decode = [s for s in self.spans if s.kind is Kind.DECODE]
        if not decode:
            return 0.0
        first_by_lane: dict[int, float] = {}
        for span in decode:
            first_by_lane.setdefault(span.lane, span.start)
        start, end = max(first_by_lane.values()), decode[-1].end
        busy = sum(min(s.end, end) - max(s.start, start) for s in self.spans if s.end > start and s.start < end)
        return max(0.0, 1.0 - busy / (end - start)) if end > start else 0.0


class StageRunner:
    """Runs work items through this rank's stage, owning one KV cache per lane; on the last
    stage its `sink` (lm_head, sampling or scoring) runs inside the same timed span."""

    def __init__(
        self,
        stage: PipelineStage,
        batches: list[Batch],
        capacity: dict[int, int],
        n_lanes: int,
        sink: Sink | None = None,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self.stage, self.batches, self.capacity, self.sink, self.tracer = stage, batches, capacity, sink, tracer
        self.states: list[StageState | None] = [None] * n_lanes
        self.clock = StageClock()

    def state_for(self, item: WorkItem) -> StageState:
        batch = self.batches[item.batch]
        state = self.states[item.lane]
        if item.reset:
            need = self.capacity[item.batch]
            if state is None or state.batch != batch.size or state.max_len < need:
                state = self.stage.new_state(batch.size, need)
                self.states[item.lane] = state
            state.reset()
        if state is None or state.length != item.start:
            raise RuntimeError(f"lane {item.lane}: cache at slot {state and state.length}, item starts at {item.start}")
        return state

    def run(self, item: WorkItem, hidden: torch.Tensor | None, ids: torch.Tensor | None = None) -> StepResult:
        """Embed `ids` [B, T] (first stage) or take `hidden` [B, T, E]; run this stage's
        layers, then the sink if this is the last stage."""
        start = time.perf_counter()
        state = self.state_for(item)
        positions = self.batches[item.batch].positions(item.start, item.length).to(self.stage.device)
        if ids is not None:
            with self.tracer.range("embed"):
                hidden = self.stage.embed(ids.to(self.stage.device))
        assert hidden is not None
        with self.tracer.range("layers"):
            out = self.stage.forward(hidden, positions, state)
        result = StepResult(out)
        if self.sink is not None:
            result.tokens, result.finished = self.sink.consume(self.stage, item, out)
        end = time.perf_counter()
        self.clock.compute_s += end - start
        self.clock.spans.append(Span(start, end, item.lane, item.kind))
        return result


@dataclass
class StepResult:
    """What one work item produced on this stage."""

    hidden: torch.Tensor  # [B, T, E]
    tokens: torch.Tensor | None = None  # last stage: sampled ids [B] after a sampling item
    finished: bool = False  # last stage: the lane's batch is done


def _first_stage_ids(item: WorkItem, batch: Batch, last_tokens: dict[int, torch.Tensor]) -> torch.Tensor:
    if item.kind is Kind.PREFILL:
        return batch.prompt_tokens(item.start, item.length)
    return last_tokens[item.lane][:, None]  # [B, 1]


def run_first(runner: StageRunner, scheduler: RingScheduler, transport: Transport | None) -> None:
    """Rank 0: drive the ring. With `transport` None this rank is the whole pipeline: the
    runner's sink samples in place and the ids go straight back to the scheduler."""
    last_tokens: dict[int, torch.Tensor] = {}
    local: dict[int, tuple[torch.Tensor, bool]] = {}  # one-stage run: lane -> (ids, finished)
    runner.clock.loop_start = time.perf_counter()
    while (action := scheduler.next()) is not None:
        if isinstance(action, AwaitTokens):
            if transport is None:
                tokens, finished = local.pop(action.lane)
            else:
                header, tokens = transport.recv_tokens()
                if header.item is None or header.item.lane != action.lane:
                    raise RuntimeError(f"expected tokens of lane {action.lane}, got {header}")
                finished = header.finished
            last_tokens[action.lane] = tokens
            scheduler.tokens_arrived(action.lane, finished)
            if transport is not None and scheduler.awaiting():
                transport.expect_tokens()
            continue
        item = action
        result = runner.run(item, None, _first_stage_ids(item, runner.batches[item.batch], last_tokens))
        if transport is not None:
            transport.send_item(item, result.hidden)
            if item.samples:
                transport.expect_tokens()
        elif result.tokens is not None:
            local[item.lane] = (result.tokens, result.finished)
        runner.tracer.step()
    if transport is not None:
        transport.send_stop()
        transport.flush()
    runner.clock.loop_end = time.perf_counter()


def run_relay(runner: StageRunner, transport: Transport) -> None:
    """Ranks 1..S-1: receive, compute, pass on (middle) or send sampled ids back (last)."""
    runner.clock.loop_start = time.perf_counter()
    while True:
        header, hidden = transport.recv_item()
        if header.msg is Msg.STOP:
            transport.send_stop()
            break
        item = header.item
        assert item is not None and hidden is not None
        result = runner.run(item, hidden)
        if runner.sink is None:
            transport.send_item(item, result.hidden)
        elif result.tokens is not None:
            transport.send_tokens(item, result.tokens, result.finished)
        runner.tracer.step()
    transport.flush()
    runner.clock.loop_end = time.perf_counter()
