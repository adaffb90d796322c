"""The schedule: lanes of rows in a ring, as data.

Each of M lanes holds up to `lane_size` sequences, one per row of its KV cache. The
first stage decides the order of work items (`Scheduler`); every other stage processes items
in the order it receives them, so each send meets its receive by construction:

- admission: when a lane has free rows and sequences wait, its free rows take the oldest
  waiting sequences, as one prefill group (prompts left-padded to the group's longest); a
  row's cache is reset by the group's first chunk. With prefix caching, a prompt that starts
  in cached blocks is admitted alone, and one whose first block is the first block of a prompt
  still in prefill (the n choices of a request, chats sharing a system prompt) waits for that
  prefill to end and starts on its blocks, so shared blocks are computed once;
- prefill: a group's prompts go through in chunks of at most `chunk` tokens, or of at most
  `refill_chunk` when the group joins rows that are decoding (a refill): spread over several
  turns, a newcomer's prompt never holds one stage long while the others run out of work.
  The last chunk samples each member's first token;
- decode: one step for every decoding row of the lane, and only those (rows between them that
  are free or still in prefill are left out: an item's rows need not be consecutive). After a
  sampling item the last stage sends the ids back to the first stage; the lane's next step can
  only start when they have arrived;
- a lane's turn issues its decode step with its group's next prefill chunk folded in (one
  forward computes both, streaming each weight once: `WorkItem.folded`; or, with `fold` off,
  the chunk as an item of its own right after), so a newcomer's prompt is interleaved with
  its neighbours' decoding; a lane with nothing to decode issues all of its group's chunks
  back to back;
- a finished (or cancelled) sequence frees its row when its last ids arrive (`released()`
  lists the rows whose KV blocks every stage gives back then); the row is refilled at the
  lane's next turn.
- the KV pool: every stage holds the same `pool_blocks` blocks and takes and frees them at
  the same points of the same order of work, so the first stage's accounting holds for all.
  Each row counts the blocks it holds or has reserved (`_Row.held`). A sequence that can be
  preempted (`Sequence.preemptable`: every generated one) reserves its padded context only,
  and a group of them is admitted when that, plus one block for every preemptable row running
  after it (room to grow for the next 16 tokens), fits beside what the rows hold: admission by
  current need. A scored sequence reserves its prompt (it generates nothing).
- preemption: before a lane's decode step, if its rows need more new blocks than are free, the
  newest preemptable sequence whose row has nothing in flight (a row of this lane, or of a
  lane with no sampling item out; rows of a group still in prefill excepted) gives its blocks
  back (`released()`, before the step) and waits again, first in line; it resumes by a
  prefill of its prompt and the tokens it has generated, which samples its next token. Its
  row's own need always makes it a candidate, so a step is never short of blocks.

Lanes take turns round-robin, so with M >= S every stage has work at every tick after the fill
(stage s works on lane (t - s) mod M at tick t).

Sampled ids come back in issue order (every stage is FIFO), and a lane's outstanding items
are always the oldest in flight when its turn comes back, so `AwaitTokens(lane)` receives
exactly that lane's ids.

The scheduler reads each sequence's `status` (see `ppinfer.pipeline.sequence`): admission
makes it PREFILLING; whoever records the sampled ids makes it DECODING or FINISHED before
telling the scheduler they arrived. `ppinfer.pipeline.simulate` drives it without any process.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field, replace

from ppinfer.model.cache import BLOCK_SIZE, blocks_for
from ppinfer.pipeline.prefix import PrefixIndex
from ppinfer.pipeline.sequence import Sequence, Status
from ppinfer.pipeline.work import AwaitTokens, ItemKind, RowStep, WorkItem


@dataclass
class _Row:
    seq: Sequence
    next_pos: int  # rope position of the next token fed to this row
    floor: int  # KV blocks reserved from admission: the padded context (preemptable), else the worst case
    slots: int  # cache slots the row has been given (left padding and cached prefix included)
    order: int  # admission order: the highest is the newest
    in_group: bool = True  # its group's prefill is still going

    @property
    def held(self) -> int:
        """KV blocks the row holds or has reserved."""
        return max(blocks_for(self.slots), self.floor)


@dataclass
class _Group:
    """Sequences admitted together into `rows`, left-padded to the longest prompt."""

    rows: list[int]
    seqs: list[Sequence]
    pads: list[int]
    chunks: deque[tuple[int, int]]
    cached: int = 0  # prompt tokens already in cached blocks (a group of one): prefill starts there


@dataclass
class _Lane:
    rows: list[_Row | None]
    group: _Group | None = None
    outstanding: deque[WorkItem] = field(default_factory=deque)  # sampling items in flight


def _row_blocks(width: int, sequence: Sequence) -> int:
    """KV blocks a sequence may fill in a group padded to `width`: the padded context and every
    token it may still generate but the last (which is sampled, never fed back)."""
    return blocks_for(width + max(sequence.remaining - 1, 0))


def _floor(width: int, sequence: Sequence) -> int:
    """KV blocks a sequence reserves when admitted in a group padded to `width`."""
    return blocks_for(width) if sequence.preemptable else _row_blocks(width, sequence)


def prefill_chunks(width: int, chunk: int) -> list[tuple[int, int]]:
    """(start, length) of each chunk of a `width`-token prompt, all of `chunk` tokens but the
    last."""
    if width < 1 or chunk < 1:
        raise ValueError(f"prompt width {width} and chunk {chunk} must be >= 1")
    return [(s, min(chunk, width - s)) for s in range(0, width, chunk)]


class Scheduler:
    """The first stage's order of work. `add` sequences, drive it with `next()`; after an
    `AwaitTokens`, record the ids (setting the sequences' status), report their arrival with
    `tokens_arrived(lane)` and call `next()` again. `next()` returns None when no lane has
    anything to do (more sequences may still be added: the server does)."""

    def __init__(
        self,
        n_lanes: int,
        lane_size: int,
        chunk: int,
        capacity: int,
        refill_chunk: int | None = None,
        pool_blocks: int | None = None,
        prefix: PrefixIndex | None = None,
        fold: bool = True,
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
        self.pool_blocks = pool_blocks  # KV blocks of each stage (None: no limit)
        if pool_blocks is not None and pool_blocks < blocks_for(capacity):
            raise ValueError(f"a pool of {pool_blocks} KV blocks cannot hold one row of {capacity} slots")
        self._released: list[tuple[int, int]] = []  # (lane, row) freed since `released()`
        self.preemptions = 0  # sequences sent back to the queue for want of KV blocks
        self._admitted = 0  # sequences placed in rows so far (their admission order)
        self.prefix = prefix
        self.fold = fold  # a refill chunk rides in its lane's decode step
        self._attached: list[tuple[int, int, list[int]]] = []  # (lane, row, blocks) since `attached()`
        self._lanes = [_Lane([None] * lane_size) for _ in range(n_lanes)]
        self._waiting: deque[Sequence] = deque()
        self._ready: deque[WorkItem] = deque()  # items of the current turn not yet returned
        self._turn = 0

    # ---- sequences ------------------------------------------------------------------------

    def add(self, sequence: Sequence) -> None:
        """Queue a sequence; it must fit one row (padding of a group included, see `_admit`)."""
        if sequence.prompt_len < 1 or sequence.prompt_len + max(sequence.budget - 1, 0) > self.capacity:
            raise ValueError(
                f"sequence {sequence.id}: {sequence.prompt_len} prompt tokens + {sequence.budget} "
                f"new do not fit a row of {self.capacity} slots"
            )
        self._waiting.append(sequence)

    def withdraw(self, seq: int) -> bool:
        """Drop a sequence that is still waiting; False if it is not (a running sequence ends
        when its next ids arrive)."""
        for sequence in self._waiting:
            if sequence.id == seq:
                self._waiting.remove(sequence)
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

    def sequence_in(self, lane_id: int, row: int) -> Sequence | None:
        """The sequence that holds `row` of lane `lane_id`, if any."""
        placed = self._lanes[lane_id].rows[row]
        return placed.seq if placed is not None else None

    def held_blocks(self) -> int:
        """KV blocks the running sequences hold or have reserved."""
        return sum(row.held for lane in self._lanes for row in lane.rows if row is not None)

    def released(self) -> list[tuple[int, int]]:
        """The (lane, row) pairs freed since the last call: every stage gives their KV blocks
        back before the next item."""
        freed, self._released = self._released, []
        return freed

    def attached(self) -> list[tuple[int, int, list[int]]]:
        """The (lane, row, blocks) of rows admitted since the last call whose prompt starts in
        cached blocks: every stage attaches them before the next item."""
        attached, self._attached = self._attached, []
        return attached

    def _uses_cache(self, sequence: Sequence) -> bool:
        """Whether the sequence may start on cached blocks: not a scored sequence nor one that
        wants its prompt's log-probabilities (every position's logits are wanted), nor one with
        a repetition penalty (the last stage counts the prompt's tokens as they go through)."""
        params = sequence.params
        return (
            self.prefix is not None and not sequence.scored and params.prompt_logprobs is None
            and params.repetition_penalty == 1.0
        )

    def _cached_blocks(self, sequence: Sequence) -> list[int]:
        """Cached blocks the sequence may start on."""
        if self.prefix is None or not self._uses_cache(sequence):
            return []
        return self.prefix.lookup(sequence.prompt)

    def _awaits_prefix(self, sequence: Sequence, members: list[Sequence]) -> bool:
        """Whether `sequence`'s first block is the first block of a prompt now being prefilled
        (by a lane's group, or in `members`, the group being formed) that will be registered
        when its prefill ends: the sequence then waits and starts on those blocks instead of
        computing them once more (the n choices of one request, chats sharing a system prompt)."""
        if not self._uses_cache(sequence) or sequence.prompt_len <= BLOCK_SIZE:
            return False
        head = sequence.prompt[:BLOCK_SIZE]
        pending = [*members]
        for lane in self._lanes:
            if lane.group is not None:
                pending += [m for m, pad in zip(lane.group.seqs, lane.group.pads) if pad == 0]
        return any(
            not m.scored and m.generated == 0 and m.prompt_len >= BLOCK_SIZE and m.prompt[:BLOCK_SIZE] == head
            for m in pending
        )

    def idle(self) -> bool:
        """Nothing running, nothing waiting, nothing in flight."""
        return not self._waiting and not self._ready and self.running == 0 and not self.awaiting()

    # ---- the order of work -----------------------------------------------------------------

    def next(self) -> WorkItem | AwaitTokens | None:
        """The next action of the first stage, or None when there is nothing to do now."""
        if self._ready:
            return self._ready.popleft()
        # Two rounds: a lane whose turn only preempted (its rows went back to the queue) is
        # visited again to admit what waits.
        for _ in range(2 * self.n_lanes):
            lane_id = self._turn
            lane = self._lanes[lane_id]
            if lane.outstanding:
                return AwaitTokens(lane_id)  # the same lane continues once the ids arrive
            self._turn = (self._turn + 1) % self.n_lanes
            self._ready.extend(self._lane_turn(lane_id, lane))
            if self._ready:
                return self._ready.popleft()
        return None

    def tokens_arrived(self, lane_id: int) -> WorkItem:
        """The ids of lane `lane_id`'s oldest sampling item arrived (and its sequences' status
        says which of them finished). Returns that item."""
        item = self.in_flight(lane_id)
        lane = self._lanes[lane_id]
        lane.outstanding.popleft()
        for step in item.rows:
            row = lane.rows[step.row]
            if row is not None and row.seq.id == step.seq and row.seq.finished:
                # A row is in at most one item in flight (a lane's decode step and its
                # group's chunk hold different rows), so nothing of it is in flight now.
                lane.rows[step.row] = None
                self._released.append((lane_id, step.row))
        return item

    def _lane_turn(self, lane_id: int, lane: _Lane) -> list[WorkItem]:
        self._admit(lane_id, lane)
        self._make_room(lane_id, lane)
        items = []
        decode = self._decode_item(lane_id, lane)
        if decode is None:
            while lane.group is not None:
                items.append(self._prefill_item(lane_id, lane))
        elif lane.group is None:
            items.append(decode)
        elif self.fold:
            items.append(replace(decode, folded=self._prefill_item(lane_id, lane)))
        else:
            items += [decode, self._prefill_item(lane_id, lane)]
        for item in items:
            lane.outstanding.extend(part for part in item.parts if part.samples)
        return items

    def _admit(self, lane_id: int, lane: _Lane) -> None:
        """Place the oldest waiting sequences into the lane's free rows."""
        if lane.group is not None or not self._waiting:
            return
        free = [r for r, row in enumerate(lane.rows) if row is None]
        if not free:
            return
        members: list[Sequence] = []
        spare = None if self.pool_blocks is None else self.pool_blocks - self.held_blocks()
        growing = sum(row.seq.preemptable for ln in self._lanes for row in ln.rows if row is not None)
        cached = self._cached_blocks(self._waiting[0])
        for sequence in self._waiting:
            if len(members) == len(free) or (members and (cached or self._cached_blocks(sequence))):
                break  # a prompt that starts in cached blocks goes alone, without left padding
            if not cached and self._awaits_prefix(sequence, members):
                break  # its first blocks are being computed: it starts on them once they are
            group = [*members, sequence]
            width = max(m.context_len for m in group)
            if members and width + max(max(m.remaining for m in group) - 1, 0) > self.capacity:
                break  # the padded group would overflow a row: admit it with the next group
            margin = growing + sum(m.preemptable for m in group)  # a block each to grow into
            if spare is not None and sum(_floor(width, m) for m in group) + margin > spare and (
                members or self.running > 0
            ):
                break  # the pool cannot hold it yet: finishing or preempted sequences free blocks
            members.append(sequence)
        if not members:
            return
        for _ in members:
            self._waiting.popleft()
        width = max(m.context_len for m in members)
        refill = any(row is not None and row.seq.status is Status.DECODING for row in lane.rows)
        rows = free[: len(members)]
        skip = len(cached) * BLOCK_SIZE
        for r, m in zip(rows, members):
            self._admitted += 1
            lane.rows[r] = _Row(m, next_pos=m.context_len, floor=_floor(width, m), slots=skip, order=self._admitted)
            if self.prefix is not None and not m.scored and m.generated == 0:
                self.prefix.count(m.prompt_len, len(cached))
            m.status = Status.PREFILLING
        if cached:
            self._attached.append((lane_id, rows[0], cached))
        lane.group = _Group(
            rows, members, [width - m.context_len for m in members],
            deque(prefill_chunks(width - skip, self.refill_chunk if refill else self.chunk)), cached=skip,
        )

    def _make_room(self, lane_id: int, lane: _Lane) -> None:
        """Preempt the newest quiescent preemptable sequences until the lane's decode step has
        the new blocks it needs."""
        if self.pool_blocks is None:
            return
        while True:
            rows = [row for row in lane.rows if row is not None and row.seq.status is Status.DECODING]
            need = sum(max(0, blocks_for(row.slots + 1) - row.held) for row in rows)
            if need <= self.pool_blocks - self.held_blocks():
                return
            candidates = [
                (row.order, lane_id if ln is lane else other, r)
                for other, ln in enumerate(self._lanes) if ln is lane or not ln.outstanding
                for r, row in enumerate(ln.rows)
                if row is not None and row.seq.preemptable and not row.in_group
            ]
            assert candidates, "a row short of KV blocks is itself preemptable"
            _, victim_lane, victim_row = max(candidates)
            self._preempt(victim_lane, victim_row)

    def _preempt(self, lane_id: int, r: int) -> None:
        """Send the sequence in row `r` of lane `lane_id` back to the queue, first in line; its
        blocks go back on every stage before the next item."""
        row = self._lanes[lane_id].rows[r]
        assert row is not None
        self._lanes[lane_id].rows[r] = None
        self._released.append((lane_id, r))
        row.seq.status = Status.WAITING
        self._waiting.appendleft(row.seq)
        self.preemptions += 1

    def _prefill_item(self, lane_id: int, lane: _Lane) -> WorkItem:
        group = lane.group
        assert group is not None
        start, length = group.chunks.popleft()
        last = not group.chunks
        first = group.cached + start
        for r in group.rows:
            placed = lane.rows[r]
            assert placed is not None
            placed.slots += length
            placed.in_group = not last
        rows = tuple(
            RowStep(r, seq.id, first - pad, reset=start == 0)
            for r, seq, pad in zip(group.rows, group.seqs, group.pads)
        )
        if last:
            lane.group = None
        return WorkItem(lane_id, ItemKind.PREFILL, rows, length, samples=last)

    def _decode_item(self, lane_id: int, lane: _Lane) -> WorkItem | None:
        steps = []
        for r, row in enumerate(lane.rows):
            if row is not None and row.seq.status is Status.DECODING:
                steps.append(RowStep(r, row.seq.id, row.next_pos))
                row.next_pos += 1
                row.slots += 1
        if not steps:
            return None
        return WorkItem(lane_id, ItemKind.DECODE, tuple(steps), 1, samples=True)
