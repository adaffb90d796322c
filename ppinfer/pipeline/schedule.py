"""The schedule: lanes of slots in a ring, as data.

Each of M lanes holds up to `lane_size` sequences, one per row (slot) of its KV cache. The
first stage decides the order of work items (`Scheduler`); every other stage processes items
in the order it receives them, so each send meets its receive by construction:

- admission: when a lane has free rows and sequences wait, its free rows take the oldest
  waiting sequences, as one prefill group (prompts left-padded to the group's longest); a
  row's cache is reset by the group's first chunk;
- prefill: a group's prompts go through in chunks of at most `chunk` tokens, or of at most
  `refill_chunk` when the group joins rows that are decoding (a refill): spread over several
  turns, a newcomer's prompt never holds one stage long while the others run out of work.
  The last chunk samples each member's first token;
- decode: one step for every decoding row of the lane, and only those (rows between them that
  are free or still in prefill are left out: an item's rows need not be consecutive). After a
  sampling item the last stage sends the ids back to the first stage; the lane's next step can
  only start when they have arrived;
- a lane's turn issues its decode step and then its group's next prefill chunk, so a
  newcomer's prompt is interleaved with its neighbours' decoding; a lane with nothing to
  decode issues all of its group's chunks back to back;
- a finished (or cancelled) sequence frees its row when its last ids arrive; the row is
  refilled at the lane's next turn. Lanes take turns round-robin, so with M >= S every stage
  has work at every tick after the fill (stage s works on lane (t - s) mod M at tick t).

Sampled ids come back in issue order (every stage is FIFO), and a lane's outstanding items
are always the oldest in flight when its turn comes back, so `AwaitTokens(lane)` receives
exactly that lane's ids.

`run_order`, `stage_actions` and `simulate` turn the scheduler's decisions into per-stage
action lists and a timeline without any process, for tests and for the theoretical bubble the
runtime reports; `occupancy` measures how full the decode steps keep the slots.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from enum import IntEnum
from typing import Callable, Iterable, Iterator

import torch


class Kind(IntEnum):
    PREFILL = 1
    DECODE = 2


@dataclass(frozen=True)
class RowStep:
    """What one cache row does in a work item."""

    row: int  # the row of the lane's cache
    seq: int  # the sequence in the row
    first_pos: int  # rope position of the item's first token (negative: left padding)
    reset: bool = False  # a new sequence starts here: forget the row's previous one


@dataclass(frozen=True)
class WorkItem:
    """One forward of some rows of one lane (in increasing row order) through every stage,
    `length` tokens per row."""

    lane: int
    kind: Kind
    rows: tuple[RowStep, ...]
    length: int  # tokens per row in this item (T)
    samples: bool  # the last stage samples each row's next token after this item

    @property
    def seqs(self) -> list[int]:
        """The sequences computed by this item, one per row."""
        return [r.seq for r in self.rows]

    @property
    def row_ids(self) -> list[int]:
        """The lane's cache rows this item computes."""
        return [r.row for r in self.rows]


@dataclass(frozen=True)
class AwaitTokens:
    """The first stage must receive the lane's oldest sampled ids before it can go on."""

    lane: int


@dataclass(frozen=True)
class Request:
    """What the scheduler knows of a sequence: its id, prompt length and token budget."""

    seq: int
    prompt_len: int
    max_new_tokens: int  # 0 for a scored sequence (prefill only)


@dataclass
class _Row:
    seq: int
    next_pos: int  # rope position of the next token fed to this row
    decoding: bool = False  # prefill done: its first token has been sampled


@dataclass
class _Group:
    """Sequences admitted together into `rows`, left-padded to the longest prompt."""

    rows: list[int]
    seqs: list[int]
    pads: list[int]
    chunks: deque[tuple[int, int]]


@dataclass
class _Lane:
    rows: list[_Row | None]
    group: _Group | None = None
    outstanding: deque[WorkItem] = field(default_factory=deque)  # sampling items in flight


def prefill_chunks(width: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a `width`-token prompt, all of `chunk` tokens but the
    last."""
    if width < 1 or chunk < 1:
        raise ValueError(f"prompt width {width} and chunk {chunk} must be >= 1")
    return [(s, min(chunk, width - s)) for s in range(0, width, chunk)]


class Scheduler:
    """The first stage's order of work. `add` sequences, drive it with `next()`; after an
    `AwaitTokens`, report the ids' arrival with `tokens_arrived(lane, finished_seqs)` and call
    `next()` again. `next()` returns None when no lane has anything to do (more sequences may
    still be added: the server does)."""

    def __init__(
        self, n_lanes: int, lane_size: int, chunk: int, capacity: int, refill_chunk: int | None = None
    ) -> None:
        refill_chunk = chunk if refill_chunk is None else refill_chunk
        if n_lanes < 1 or lane_size < 1 or chunk < 1 or refill_chunk < 1:
            raise ValueError(
                "need lanes, lane size, chunk and refill chunk >= 1, "
                f"got {n_lanes}, {lane_size}, {chunk}, {refill_chunk}"
            )
        self.n_lanes, self.lane_size, self.chunk = n_lanes, lane_size, chunk
        self.refill_chunk = min(refill_chunk, chunk)
        self.capacity = capacity  # cache slots of one row
        self._lanes = [_Lane([None] * lane_size) for _ in range(n_lanes)]
        self._waiting: deque[Request] = deque()
        self._ready: deque[WorkItem] = deque()  # items of the current turn not yet returned
        self._turn = 0

    # ---- sequences ------------------------------------------------------------------------

    def add(self, request: Request) -> None:
        """Queue a sequence; it must fit one row (padding of a group included, see `_admit`)."""
        if request.prompt_len < 1 or request.prompt_len + max(request.max_new_tokens - 1, 0) > self.capacity:
            raise ValueError(
                f"sequence {request.seq}: {request.prompt_len} prompt tokens + {request.max_new_tokens} "
                f"new do not fit a row of {self.capacity} slots"
            )
        self._waiting.append(request)

    def withdraw(self, seq: int) -> bool:
        """Drop a sequence that is still waiting; False if it is not (a running sequence is
        ended by reporting it finished when its next ids arrive)."""
        for request in self._waiting:
            if request.seq == seq:
                self._waiting.remove(request)
                return True
        return False

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    @property
    def running(self) -> int:
        return sum(row is not None for lane in self._lanes for row in lane.rows)

    def awaiting(self) -> bool:
        """Whether any lane waits for sampled ids (so more token messages will come)."""
        return any(lane.outstanding for lane in self._lanes)

    def in_flight(self, lane_id: int) -> WorkItem:
        """The lane's oldest sampling item whose ids have not arrived yet."""
        lane = self._lanes[lane_id]
        if not lane.outstanding:
            raise RuntimeError(f"lane {lane_id} was not waiting for tokens")
        return lane.outstanding[0]

    def idle(self) -> bool:
        """Nothing running, nothing waiting, nothing in flight."""
        return not self._waiting and not self._ready and self.running == 0 and not self.awaiting()

    # ---- the order of work -----------------------------------------------------------------

    def next(self) -> WorkItem | AwaitTokens | None:
        """The next action of the first stage, or None when there is nothing to do now."""
        if self._ready:
            return self._ready.popleft()
        for _ in range(self.n_lanes):
            lane_id = self._turn
            lane = self._lanes[lane_id]
            if lane.outstanding:
                return AwaitTokens(lane_id)  # the same lane continues once the ids arrive
            self._turn = (self._turn + 1) % self.n_lanes
            self._ready.extend(self._lane_turn(lane_id, lane))
            if self._ready:
                return self._ready.popleft()
        return None

    def tokens_arrived(self, lane_id: int, finished: Iterable[int] = ()) -> WorkItem:
        """The ids of lane `lane_id`'s oldest sampling item arrived; `finished` are the
        sequences that ended with them. Returns that item."""
        item = self.in_flight(lane_id)
        lane = self._lanes[lane_id]
        lane.outstanding.popleft()
        ended = set(finished)
        for step in item.rows:
            row = lane.rows[step.row]
            if row is None or row.seq != step.seq:
                continue
            row.decoding = True
            if step.seq in ended:
                # A row is in at most one item in flight (a lane's decode step and its
                # group's chunk hold different rows), so nothing of it is in flight now.
                lane.rows[step.row] = None
        return item

    def _lane_turn(self, lane_id: int, lane: _Lane) -> list[WorkItem]:
        self._admit(lane)
        items = []
        decode = self._decode_item(lane_id, lane)
        if decode is not None:
            items.append(decode)
        if lane.group is not None:
            while lane.group is not None and (decode is None or len(items) < 2):
                items.append(self._prefill_item(lane_id, lane))
        for item in items:
            if item.samples:
                lane.outstanding.append(item)
        return items

    def _admit(self, lane: _Lane) -> None:
        """Place the oldest waiting sequences into the lane's free rows."""
        if lane.group is not None or not self._waiting:
            return
        free = [r for r, row in enumerate(lane.rows) if row is None]
        if not free:
            return
        members: list[Request] = []
        for request in self._waiting:
            if len(members) == len(free):
                break
            width = max([m.prompt_len for m in members] + [request.prompt_len])
            budget = max([m.max_new_tokens for m in members] + [request.max_new_tokens])
            if members and width + max(budget - 1, 0) > self.capacity:
                break  # the padded group would overflow a row: admit it with the next group
            members.append(request)
        for _ in members:
            self._waiting.popleft()
        width = max(m.prompt_len for m in members)
        refill = any(row is not None and row.decoding for row in lane.rows)
        rows = free[: len(members)]
        for r, m in zip(rows, members):
            lane.rows[r] = _Row(m.seq, next_pos=m.prompt_len)
        lane.group = _Group(
            rows, [m.seq for m in members], [width - m.prompt_len for m in members],
            deque(prefill_chunks(width, self.refill_chunk if refill else self.chunk)),
        )

    def _prefill_item(self, lane_id: int, lane: _Lane) -> WorkItem:
        group = lane.group
        assert group is not None
        start, length = group.chunks.popleft()
        last = not group.chunks
        rows = tuple(
            RowStep(r, seq, start - pad, reset=start == 0) for r, seq, pad in zip(group.rows, group.seqs, group.pads)
        )
        if last:
            lane.group = None
        return WorkItem(lane_id, Kind.PREFILL, rows, length, samples=last)

    def _decode_item(self, lane_id: int, lane: _Lane) -> WorkItem | None:
        steps = []
        for r, row in enumerate(lane.rows):
            if row is not None and row.decoding:
                steps.append(RowStep(r, row.seq, row.next_pos))
                row.next_pos += 1
        if not steps:
            return None
        return WorkItem(lane_id, Kind.DECODE, tuple(steps), 1, samples=True)


def item_positions(item: WorkItem) -> torch.Tensor:
    """Rope positions of `item`'s tokens: [b, T] int64, -1 on left padding."""
    first = torch.tensor([s.first_pos for s in item.rows], dtype=torch.int64)
    pos = first[:, None] + torch.arange(item.length, dtype=torch.int64)[None, :]  # [b, T]
    return pos.masked_fill(pos < 0, -1)


def run_order(
    scheduler: Scheduler, requests: Iterable[Request], samples: Callable[[int], int]
) -> Iterator[WorkItem | AwaitTokens]:
    """Drive `scheduler` offline over `requests`: sequence s finishes after `samples(s)`
    sampled tokens (its first comes from prefill; a scored sequence (no budget) after
    prefill)."""
    for request in requests:
        scheduler.add(request)
    sampled: dict[int, int] = {}
    while (action := scheduler.next()) is not None:
        yield action
        if isinstance(action, AwaitTokens):
            item = scheduler.in_flight(action.lane)
            done = []
            for seq in item.seqs:
                sampled[seq] = sampled.get(seq, 0) + 1
                if sampled[seq] >= samples(seq):
                    done.append(seq)
            scheduler.tokens_arrived(action.lane, done)


def occupancy(order: Iterable[WorkItem | AwaitTokens], lane_size: int) -> float:
    """Mean share of a lane's slots that compute a sequence in its decode steps."""
    steps = [a for a in order if isinstance(a, WorkItem) and a.kind is Kind.DECODE]
    if not steps:
        return 0.0
    return sum(len(s.seqs) for s in steps) / (len(steps) * lane_size)


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
    outstanding: dict[int, deque[int]] = {}  # lane -> its sampling items awaiting receipt
    i = 0
    for action in order:
        if isinstance(action, AwaitTokens):
            idx = outstanding[action.lane].popleft()
            if n_stages > 1:
                acts[0].append(Action("recv", last, idx))
            continue
        acts[0].append(Action("compute", -1, i))
        if n_stages > 1:
            acts[0].append(Action("send", 1, i))
        if action.samples:
            outstanding.setdefault(action.lane, deque()).append(i)
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
