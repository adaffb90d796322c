"""The per-rank loop: the first stage drives the ring, middle stages relay, the last stage
samples. With one stage the same code runs without any process group."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ppinfer.model import KVCache, KVPool, PipelineStage
from ppinfer.model.kvquant import KVType
from ppinfer.pipeline.heap import trim_heap
from ppinfer.pipeline.intake import Intake, KVStats
from ppinfer.pipeline.prefix import PrefixIndex
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequence import Sequence
from ppinfer.pipeline.sequences import Sequences
from ppinfer.pipeline.sinks import Sampled, Sink
from ppinfer.pipeline.transport import Transport
from ppinfer.pipeline.wire import (
    Admission,
    Control,
    Msg,
    decode_admissions,
    decode_attach,
    decode_logprobs,
    decode_release,
    encode_admissions,
    encode_attach,
    encode_logprobs,
    encode_release,
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
    """Runs work items through this rank's stage, owning its KV pool (`kv_tokens` slots of
    `kv_dtype`) and one KV cache per lane (rows of `lane_size` sequences, up to `capacity`
    slots each, drawing blocks from the pool); on the last stage its `sink` (lm_head, sampling
    or scoring) runs inside the same timed span."""

    def __init__(
        self,
        stage: PipelineStage,
        n_lanes: int,
        lane_size: int,
        capacity: int,
        kv_tokens: int,
        kv_dtype: KVType,
        sink: Sink | None = None,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self.stage, self.sink, self.tracer = stage, sink, tracer
        self.lane_size, self.capacity = lane_size, capacity
        self.kv_tokens, self.kv_dtype = kv_tokens, kv_dtype
        self.pool: KVPool | None = None
        self.on_evict: Callable[[int], None] | None = None  # the pool's hook (the prefix index's)
        self.caches: list[KVCache | None] = [None] * n_lanes
        self.clock = StageClock()

    def lane_cache(self, lane: int) -> KVCache:
        """The lane's KV cache (the pool and the lane's rows made on first use)."""
        cache = self.caches[lane]
        if cache is None:
            if self.pool is None:
                self.pool = self.stage.new_pool(self.kv_tokens, self.kv_dtype)
                self.pool.on_evict = self.on_evict
            cache = self.caches[lane] = KVCache(self.pool, self.lane_size, self.capacity)
        return cache

    def cache_for(self, item: WorkItem) -> KVCache:
        cache = self.lane_cache(item.lane)
        for part in item.parts:
            for step in part.rows:
                if step.reset and step.first_pos <= 0:  # (first_pos > 0: attached to cached blocks)
                    cache.reset(step.row, step.row + 1)
        return cache

    def attach(self, rows: list[tuple[int, int, list[int]]]) -> None:
        """Start these (lane, row) pairs on the cached KV blocks given for each."""
        for lane, row, blocks in rows:
            self.lane_cache(lane).attach(row, blocks)

    def release(self, rows: list[tuple[int, int]]) -> None:
        """Give the KV blocks of these (lane, row) pairs back to the pool. When no row holds a
        sequence any more, the working memory of the last steps goes back to the system."""
        for lane, row in rows:
            cache = self.caches[lane]
            if cache is not None:
                cache.reset(row, row + 1)
        if rows and not any(cache is not None and any(cache.lengths) for cache in self.caches):
            self._trim_heap()

    def _trim_heap(self) -> None:
        """Return the free C heap to the system (CPU only; see `ppinfer.pipeline.heap`)."""
        if self.stage.device.type == "cpu":
            with self.tracer.range("trim_heap"):
                trim_heap()

    def admit(self, admissions: list[Admission]) -> None:
        """Sequences about to start (last stage: their sampling settings)."""
        if self.sink is not None:
            self.sink.admit(admissions)

    def run(self, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor | None) -> StepResult:
        """Embed `ids` [b, T] (first stage) or take `hidden` [b, T, E] ([1, N] and [1, N, E]
        for an item with a folded chunk); run this stage's layers for the item's rows, then
        the sink, part by part, if this is the last stage."""
        start = time.perf_counter()
        cache = self.cache_for(item)
        device = self.stage.device
        if hidden is None:
            with self.tracer.range("embed"):
                hidden = self.stage.embed(ids.to(device))
        with self.tracer.range("layers"):
            if item.folded is None:
                out = self.stage.forward(hidden, item_positions(item).to(device), cache, item.row_ids)
            else:
                pieces = [(item_positions(part).to(device), part.row_ids) for part in item.parts]
                out = self.stage.forward_ragged(hidden, pieces, cache)
        result = StepResult(out)
        if self.sink is not None:
            for part, part_ids, part_out in zip(item.parts, _split(item, ids), _split(item, out)):
                sampled = self.sink.consume(self.stage, part, part_ids, part_out)
                if sampled is not None:
                    result.sampled.append((part, sampled))
        if any(part.kind is ItemKind.PREFILL and part.samples for part in item.parts):
            # A group's last chunk: the heap its chunks' activations left goes back, so that
            # resident memory follows the cached tokens.
            self._trim_heap()
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

    hidden: torch.Tensor  # [b, T, E] ([1, N, E] with a folded chunk)
    sampled: list[tuple[WorkItem, Sampled]] = field(default_factory=list)
    """Last stage: each sampling part of the item with its sampled ids [b], in part order."""


def _split(item: WorkItem, x: torch.Tensor) -> list[torch.Tensor]:
    """x [b, T, ...] of `item`, or [1, N, ...] with a folded chunk -> one [b_i, T_i, ...]
    tensor per part."""
    if item.folded is None:
        return [x]
    parts = x[0].split([len(part.rows) * part.length for part in item.parts])
    return [t.view(len(part.rows), part.length, *t.shape[1:]) for t, part in zip(parts, item.parts)]


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
    if scheduler.prefix is not None:
        runner.on_evict = scheduler.prefix.evicted
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
            intake.progress(busy, kv_stats(runner, scheduler))
            sequences.tokens_arrived(item, sampled.tokens.tolist(), sampled.logprobs)
            scheduler.tokens_arrived(action.lane)
            release(runner, scheduler, transport)
            if transport is not None and scheduler.awaiting():
                transport.expect_tokens()
            continue
        item = action
        release(runner, scheduler, transport)  # rows preempted by this turn, before its items
        attached = scheduler.attached()
        if attached:
            runner.attach(attached)
            if transport is not None:
                transport.send_attach(encode_attach(attached))
        admissions = sequences.admissions(item)
        if admissions:
            runner.admit(admissions)
            if transport is not None:
                transport.send_admit(encode_admissions(admissions))
        ids = sequences.input_ids(item)
        result = runner.run(item, ids, None)
        if scheduler.prefix is not None:
            for part in item.parts:
                if part.kind is ItemKind.PREFILL and part.samples:
                    register_prefixes(scheduler.prefix, runner, sequences.get, part)
        if transport is not None:
            transport.send_item(Control(Msg.ITEM, item, runner.busy(0, (), world)), ids, result.hidden)
            if any(part.samples for part in item.parts):
                transport.expect_tokens()
        else:
            local.extend(sampled for _, sampled in result.sampled)
        runner.tracer.step()
    if transport is not None:
        transport.send_stop()
        transport.flush()
    runner.clock.loop_end = time.perf_counter()
    if scheduler.prefix is not None:
        sequences.counts.looked_up_tokens = scheduler.prefix.looked_up_tokens
        sequences.counts.cached_tokens = scheduler.prefix.hit_tokens
    sequences.counts.preemptions = scheduler.preemptions


def release(runner: StageRunner, scheduler: Scheduler, transport: Transport | None) -> None:
    """Give back, on every stage, the KV blocks of the rows the scheduler freed."""
    released = scheduler.released()
    if released:
        runner.release(released)
        if transport is not None:
            transport.send_release(encode_release(released))


def kv_stats(runner: StageRunner, scheduler: Scheduler) -> KVStats:
    """The first stage's KV pool use and prefix hit rate, for monitoring."""
    pool, prefix = runner.pool, scheduler.prefix
    return KVStats(
        blocks_used=pool.used if pool is not None else 0,
        blocks_total=pool.n_blocks if pool is not None else 0,
        prefix_hit_rate=prefix.hit_rate if prefix is not None else 0.0,
        preemptions=scheduler.preemptions,
    )


def register_prefixes(
    prefix: PrefixIndex, runner: StageRunner, sequence_of: Callable[[int], Sequence | None], item: WorkItem
) -> None:
    """After a group's last prefill chunk (`item`, run here): the full blocks of each prompt
    that starts at its row's first slot (no left padding) go into the prefix index."""
    cache = runner.lane_cache(item.lane)
    for step in item.rows:
        sequence = sequence_of(step.seq)
        if sequence is not None and not sequence.scored and cache.lengths[step.row] == sequence.prompt_len:
            prefix.register(sequence.prompt, cache.tables[step.row])


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
        if control.msg is Msg.ATTACH:
            runner.attach(decode_attach(received.payload))
            if not last:
                transport.send_attach(received.payload)
            continue
        if control.msg is Msg.RELEASE:
            runner.release(decode_release(received.payload))
            if not last:
                transport.send_release(received.payload)
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
        else:
            for part, sampled in result.sampled:
                logprobs = sampled.logprobs
                answered = Control(control.msg, part, passed.busy_s)
                transport.send_tokens(answered, sampled.tokens, encode_logprobs(logprobs) if logprobs else b"")
        runner.tracer.step()
    transport.flush()
    runner.clock.loop_end = time.perf_counter()
