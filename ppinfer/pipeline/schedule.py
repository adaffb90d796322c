"""The schedule: lanes in a ring, as data.

Sequences are grouped into batches; each of M lanes holds one batch at a time. The first
stage decides the order of work items (`RingScheduler`), every other stage processes items in
the order it receives them, so each send meets its receive by construction:

- prefill: a batch's left-padded prompt goes through in chunks of at most `chunk` tokens,
  issued back to back (chunks of one lane pipeline behind each other);
- decode: after an item that samples (a batch's last prefill chunk or a decode step), the last
  stage sends the sampled ids back to the first stage; the lane's next step can only start
  when they have arrived. Lanes take turns round-robin, so with M >= S every stage has work at
  every tick after the fill (stage s works on lane (t - s) mod M at tick t);
- a lane whose batch has finished takes the next batch; when none is left it goes idle.

`stage_actions` and `simulate` turn the scheduler's decisions into per-stage action lists and a
timeline without any process, for tests and for the theoretical bubble the runtime reports.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterator


class Kind(IntEnum):
    PREFILL = 1
    DECODE = 2


@dataclass(frozen=True)
class WorkItem:
    """One forward of one lane through every stage."""

    lane: int
    batch: int  # index of the batch of sequences the lane holds
    kind: Kind
    step: int  # prefill chunk index, or decode step index
    start: int  # first cache slot written
    length: int  # tokens per sequence in this item (T)
    samples: bool  # the last stage samples next tokens after this item
    reset: bool  # first item of a batch: every stage starts the lane's cache afresh


@dataclass(frozen=True)
class AwaitTokens:
    """The first stage must receive the lane's sampled ids before it can go on."""

    lane: int


@dataclass
class _Lane:
    batch: int | None = None
    width: int = 0  # left-padded prompt length of the batch
    chunks: deque[tuple[int, int]] = field(default_factory=deque)  # prefill chunks still to issue
    decode_step: int = 0
    awaiting: bool = False


def prefill_chunks(width: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a `width`-token prompt, all of `chunk` tokens but the
    last."""
    if width < 1 or chunk < 1:
        raise ValueError(f"prompt width {width} and chunk {chunk} must be >= 1")
    return [(s, min(chunk, width - s)) for s in range(0, width, chunk)]


@dataclass
class RingScheduler:
    """The first stage's order of work. Drive it with `next()`; after an `AwaitTokens`, report
    the lane's sampled step with `tokens_arrived(lane, finished)` and call `next()` again."""

    widths: list[int]  # left-padded prompt width of each batch, in batch order
    n_lanes: int
    chunk: int
    score_only: bool = False  # prefill only: no decode steps (the score task)
    _lanes: list[_Lane] = field(init=False)
    _pending: deque[int] = field(init=False)  # batches not yet started
    _turn: int = field(default=0, init=False)

    def __post_init__(self) -> None:
        if self.n_lanes < 1:
            raise ValueError(f"need at least one lane, got {self.n_lanes}")
        self._lanes = [_Lane() for _ in range(self.n_lanes)]
        self._pending = deque(range(len(self.widths)))

    def next(self) -> WorkItem | AwaitTokens | None:
        """The next action of the first stage, or None when every batch is done."""
        for _ in range(self.n_lanes):
            lane_id = self._turn
            self._turn = (self._turn + 1) % self.n_lanes
            action = self._lane_action(lane_id)
            if action is not None:
                if isinstance(action, AwaitTokens):
                    self._turn = lane_id  # the same lane continues after the tokens arrive
                return action
        return None

    def batch_of(self, lane_id: int) -> int | None:
        """The batch lane `lane_id` holds (None when idle)."""
        return self._lanes[lane_id].batch

    def awaiting(self) -> bool:
        """Whether any lane waits for sampled ids (so more token messages will come)."""
        return any(lane.awaiting for lane in self._lanes)

    def decode_steps_issued(self, lane_id: int) -> int:
        return self._lanes[lane_id].decode_step

    def tokens_arrived(self, lane_id: int, finished: bool) -> None:
        lane = self._lanes[lane_id]
        if not lane.awaiting:
            raise RuntimeError(f"lane {lane_id} was not waiting for tokens")
        lane.awaiting = False
        if finished or self.score_only:
            lane.batch = None

    def _lane_action(self, lane_id: int) -> WorkItem | AwaitTokens | None:
        lane = self._lanes[lane_id]
        if lane.awaiting:
            return AwaitTokens(lane_id)
        if lane.batch is None:
            if not self._pending:
                return None
            lane.batch = self._pending.popleft()
            lane.width, lane.decode_step = self.widths[lane.batch], 0
            lane.chunks = deque(prefill_chunks(lane.width, self.chunk))
        if lane.chunks:
            start, length = lane.chunks.popleft()
            last = not lane.chunks
            lane.awaiting = last
            return WorkItem(lane_id, lane.batch, Kind.PREFILL, start // self.chunk, start, length, last, start == 0)
        lane.awaiting = True
        lane.decode_step += 1
        start = lane.width + lane.decode_step - 1
        return WorkItem(lane_id, lane.batch, Kind.DECODE, lane.decode_step - 1, start, 1, True, False)


def run_order(
    scheduler: RingScheduler, decode_steps: Callable[[int], int]
) -> Iterator[WorkItem | AwaitTokens]:
    """Drive `scheduler` offline: batch b finishes after `decode_steps(b)` decode steps
    (a batch's first token comes from prefill, so 1 means it stops right after prefill)."""
    while (action := scheduler.next()) is not None:
        yield action
        if isinstance(action, AwaitTokens):
            batch = scheduler.batch_of(action.lane)
            assert batch is not None
            done = scheduler.decode_steps_issued(action.lane) + 1 >= decode_steps(batch)
            scheduler.tokens_arrived(action.lane, done)


@dataclass(frozen=True)
class Action:
    """One step of one stage: 'recv' / 'send' on a channel (src, dst), or 'compute'."""

    op: str  # "compute" | "send" | "recv"
    peer: int  # other stage for send/recv, -1 for compute
    item: int  # index of the work item in issue order


def stage_actions(order: list[WorkItem | AwaitTokens], n_stages: int) -> list[list[Action]]:
    """Per-stage action lists as the runtime executes them: activations flow s -> s + 1, and
    after each sampling item the last stage sends ids to stage 0, which receives them at the
    lane's next AwaitTokens."""
    items = [a for a in order if isinstance(a, WorkItem)]
    acts: list[list[Action]] = [[] for _ in range(n_stages)]
    last = n_stages - 1
    outstanding: dict[int, int] = {}  # lane -> index of its sampling item awaiting receipt
    i = 0
    for action in order:
        if isinstance(action, AwaitTokens):
            idx = outstanding.pop(action.lane)
            if n_stages > 1:
                acts[0].append(Action("recv", last, idx))
            continue
        acts[0].append(Action("compute", -1, i))
        if n_stages > 1:
            acts[0].append(Action("send", 1, i))
        if action.samples:
            outstanding[action.lane] = i
        i += 1
    for s in range(1, n_stages):
        for idx, item in enumerate(items):
            acts[s].append(Action("recv", s - 1, idx))
            acts[s].append(Action("compute", -1, idx))
            if s < last:
                acts[s].append(Action("send", s + 1, idx))
            elif item.samples:
                acts[s].append(Action("send", 0, idx))
    return acts


@dataclass
class Timeline:
    """Simulated busy intervals per stage: (start, end, item index)."""

    busy: list[list[tuple[float, float, int]]]
    makespan: float

    def bubble_fraction(self, stage: int) -> float:
        work = sum(end - start for start, end, _ in self.busy[stage])
        return 1.0 - work / self.makespan if self.makespan > 0 else 0.0


def simulate(acts: list[list[Action]], cost: Callable[[int, int], float]) -> Timeline:
    """Execute action lists with blocking receives and free sends; `cost(stage, item)` is the
    compute time. Raises RuntimeError on deadlock or on a message that is never received."""
    n = len(acts)
    pc = [0] * n
    clock = [0.0] * n
    channels: dict[tuple[int, int], deque[tuple[int, float]]] = {}
    busy: list[list[tuple[float, float, int]]] = [[] for _ in range(n)]
    while any(pc[s] < len(acts[s]) for s in range(n)):
        progressed = False
        for s in range(n):
            while pc[s] < len(acts[s]):
                act = acts[s][pc[s]]
                if act.op == "compute":
                    start = clock[s]
                    clock[s] += cost(s, act.item)
                    busy[s].append((start, clock[s], act.item))
                elif act.op == "send":
                    channels.setdefault((s, act.peer), deque()).append((act.item, clock[s]))
                else:
                    queue = channels.get((act.peer, s))
                    if not queue:
                        break
                    item, sent_at = queue.popleft()
                    if item != act.item:
                        raise RuntimeError(f"stage {s} expected item {act.item} from {act.peer}, got {item}")
                    clock[s] = max(clock[s], sent_at)
                pc[s] += 1
                progressed = True
        if not progressed:
            stuck = {s: acts[s][pc[s]] for s in range(n) if pc[s] < len(acts[s])}
            raise RuntimeError(f"deadlock: stages blocked at {stuck}")
    leftover = {k: list(v) for k, v in channels.items() if v}
    if leftover:
        raise RuntimeError(f"messages never received: {leftover}")
    return Timeline(busy, max(clock))


def theoretical_bubble(n_stages: int, n_items: int) -> float:
    """Idle fraction of each stage when n_items equal-cost items fill and drain the pipe."""
    return (n_stages - 1) / (n_items + n_stages - 1)
