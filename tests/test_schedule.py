"""The lane schedule as data, checked without processes.

Every expectation here is derived by hand from the schedule's contract (the docstring of
`ppinfer.pipeline.scheduler`), never read off the scheduler's own output:

- the order of work items gives each sequence its prefill chunks (left-padded to its group's
  longest prompt) and then one decode step per sampled token after the first; a row holds one
  sequence at a time and takes a new one only when the last ids of the previous one arrived;
  sequences are admitted oldest first; a sequence is computed again only once the ids of its
  last sampling item arrived; every decode step covers every decoding row of its lane;
- by hand on small cases: refill of a freed row by the oldest waiting sequence, reuse of a
  row (reset on the first chunk only, positions restarting at the new prompt), one chunk of a
  newcomer per turn while its neighbours decode, a left-padded group of several newcomers,
  `withdraw`, and the slots a refilled lane keeps busy compared with fixed batches;
- per-stage action lists pair every send with a receive on the same channel in the same
  order, and simulate to completion for S in 1..4 and M in 1..6 with uneven finishes, more
  sequences than slots (so rows are refilled) and prompts of several chunks;
- with equal-cost items and M lanes each holding one full group, a lane's k-th item reaches
  stage s at tick k * max(M, S) + lane + s: with M >= S the ring is full (only fill and drain
  are idle), with M < S every period of S ticks has S - M idle ticks; M single-item lanes give
  the textbook (S - 1) / (M + S - 1);
- the simulator rejects broken action lists (missing send, swapped receives, stray send).
"""

from __future__ import annotations

import itertools
import random
from collections import Counter, defaultdict, deque
from collections.abc import Iterable
from dataclasses import dataclass, field

import pytest

from ppinfer.pipeline.scheduler import Scheduler, prefill_chunks
from ppinfer.pipeline.sequence import Status
from ppinfer.pipeline.simulate import (
    Action,
    run_order,
    shaped,
    simulate,
    stage_actions,
)
from ppinfer.pipeline.work import AwaitTokens, ItemKind, RowStep, WorkItem, item_positions

STAGES = (1, 2, 3, 4)
LANES = (1, 2, 3, 4, 5, 6)

Order = list[WorkItem | AwaitTokens]
P, D = ItemKind.PREFILL, ItemKind.DECODE


def occupancy(order: Iterable[WorkItem | AwaitTokens], lane_size: int) -> float:
    """Mean share of a lane's slots that compute a sequence in its decode steps."""
    steps = [a for a in order if isinstance(a, WorkItem) and a.kind is ItemKind.DECODE]
    if not steps:
        return 0.0
    return sum(len(s.seqs) for s in steps) / (len(steps) * lane_size)


def theoretical_bubble(n_stages: int, n_items: int) -> float:
    """Idle fraction of each stage when n_items equal-cost items fill and drain the pipe."""
    return (n_stages - 1) / (n_items + n_stages - 1)


def make_order(
    prompts: list[int],
    lanes: int,
    chunk: int,
    samples: list[int],
    lane_size: int = 1,
    budgets: list[int] | None = None,
    capacity: int | None = None,
    refill_chunk: int | None = None,
    fold: bool = False,
) -> Order:
    """The scheduler's full order when sequence s (prompt of `prompts[s]` tokens, budget
    `budgets[s]`, by default `samples[s]`) ends after `samples[s]` sampled ids. The default
    capacity is the one a batch job sizes its rows for: longest prompt + largest budget - 1.
    The orders by hand below are written without folding (`fold`); the random contract
    checks run both ways."""
    budgets = samples if budgets is None else budgets
    if capacity is None:
        capacity = max(prompts) + max(max(budgets) - 1, 0)
    sequences = [shaped(s, p, b) for s, (p, b) in enumerate(zip(prompts, budgets))]
    scheduler = Scheduler(lanes, lane_size, chunk, capacity, refill_chunk, fold=fold)
    return list(run_order(scheduler, sequences, lambda s: samples[s]))


def score_order(prompts: list[int], lanes: int, chunk: int, lane_size: int = 1) -> Order:
    """Scored sequences: no budget, over once the ids of their prefill arrive."""
    return make_order(prompts, lanes, chunk, [1] * len(prompts), lane_size, budgets=[0] * len(prompts))


def items_of(order: Order) -> list[WorkItem]:
    return [a for a in order if isinstance(a, WorkItem)]


def unit_cost(stage: int, item: int) -> float:
    return 1.0


def step(row: int, seq: int, first_pos: int, reset: bool = False) -> RowStep:
    return RowStep(row, seq, first_pos, reset)


def arrive(scheduler: Scheduler, lane: int, finished: list[int]) -> WorkItem:
    """The ids of the lane's oldest sampling item arrive: the sequences in `finished` are
    over, the others decode on (what the first rank records before telling the scheduler)."""
    item = scheduler.in_flight(lane)
    for s in item.rows:
        sequence = scheduler.sequence_in(lane, s.row)
        assert sequence is not None
        sequence.status = Status.FINISHED if s.seq in finished else Status.DECODING
    return scheduler.tokens_arrived(lane)


# ---- prefill_chunks ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("width", "chunk", "expected"),
    [
        (7, 3, [(0, 3), (3, 3), (6, 1)]),
        (6, 3, [(0, 3), (3, 3)]),
        (2, 5, [(0, 2)]),
        (1, 1, [(0, 1)]),
        (4, 1, [(0, 1), (1, 1), (2, 1), (3, 1)]),
    ],
)
def test_prefill_chunks_by_hand(width: int, chunk: int, expected: list[tuple[int, int]]) -> None:
    assert prefill_chunks(width, chunk) == expected


@pytest.mark.parametrize(("width", "chunk"), [(0, 3), (5, 0), (-1, 2)])
def test_prefill_chunks_rejects_empty(width: int, chunk: int) -> None:
    with pytest.raises(ValueError, match=str(width)):
        prefill_chunks(width, chunk)


@pytest.mark.parametrize("lane_size", [1, 2])
def test_chunk_capped_by_the_longest_prompt_changes_no_item(lane_size: int) -> None:
    """A run sizes its buffers for min(prefill_chunk, longest prompt): the scheduler must
    issue exactly the items it issues with the configured (however large) chunk."""
    prompts, samples = [5, 2, 4], [3, 1, 2]
    capped = make_order(prompts, 2, max(prompts), samples, lane_size)
    assert capped == make_order(prompts, 2, 100_000_000, samples, lane_size)
    assert max(i.length for i in items_of(capped)) == max(prompts)


@pytest.mark.parametrize(
    ("lanes", "lane_size", "chunk", "refill"), [(0, 1, 2, 1), (1, 0, 2, 1), (1, 1, 0, 1), (1, 1, 2, 0)]
)
def test_scheduler_rejects_empty_lanes_and_chunks(lanes: int, lane_size: int, chunk: int, refill: int) -> None:
    with pytest.raises(ValueError, match=f"{lanes}, {lane_size}, {chunk}, {refill}"):
        Scheduler(lanes, lane_size, chunk, 10, refill)


@pytest.mark.parametrize(("prompt", "budget"), [(9, 3), (0, 1), (11, 0)])
def test_a_sequence_that_cannot_fit_a_row_is_refused(prompt: int, budget: int) -> None:
    """A row of 10 slots holds a prompt and budget - 1 fed tokens (the last sampled id is
    never fed back): 9 + 2 do not fit, an empty prompt never does, 11 scored tokens neither."""
    scheduler = Scheduler(1, 1, 4, capacity=10)
    with pytest.raises(ValueError, match=f"sequence 3: {prompt} prompt tokens"):
        scheduler.add(shaped(3, prompt, budget))
    scheduler.add(shaped(4, 10, 1))  # exactly full
    assert scheduler.waiting == 1


def test_tokens_for_a_lane_that_is_not_waiting_is_an_error() -> None:
    scheduler = Scheduler(2, 1, 1, 8)
    scheduler.add(shaped(0, 2, 2))
    scheduler.add(shaped(1, 2, 2))
    first = scheduler.next()  # lane 0's first chunk; lane 1 has not had a turn yet
    assert isinstance(first, WorkItem) and first.lane == 0
    with pytest.raises(RuntimeError, match="lane 1"):
        scheduler.tokens_arrived(1)


# ---- the order of work items: the contract on random workloads -----------------------------


def check_order(
    order: Order,
    prompts: list[int],
    lanes: int,
    lane_size: int,
    chunk: int,
    samples: list[int],
    capacity: int,
    refill_chunk: int | None = None,
) -> None:
    """Assert the scheduling contract on a whole order (see the module docstring); a group
    that joins decoding rows goes in chunks of `refill_chunk` (None: `chunk`)."""
    refill_chunk = chunk if refill_chunk is None else min(refill_chunk, chunk)
    seen = _Seen(prompts, lanes, lane_size, chunk, refill_chunk)
    for action in order:
        if isinstance(action, AwaitTokens):
            assert seen.in_flight[action.lane], f"lane {action.lane} awaits ids it never asked for"
            for seq in seen.in_flight[action.lane].popleft().seqs:
                seen.received[seq] += 1
                if seen.received[seq] == samples[seq]:
                    del seen.holder[seen.place[seq]]
            continue
        if action.folded is not None:
            assert action.kind is D and action.folded.kind is P and action.folded.lane == action.lane, action
            assert not set(action.row_ids) & set(action.folded.row_ids), f"{action}: a row in both parts"
        for item in action.parts:  # a folded chunk is held to the same contract as an item of its own
            seen.check(item)
    assert not any(seen.in_flight.values()), "some sampled ids were never received"
    assert not seen.holder, f"rows never freed: {seen.holder}"
    assert seen.admitted == list(range(len(prompts))), "sequences must be admitted once each, oldest first"
    for s, prompt in enumerate(prompts):
        assert seen.width[s] + samples[s] - 1 <= capacity, f"sequence {s} overflows its row"
        assert seen.got[s] == expected_items(prompt, seen.width[s], seen.chunk_of[s], samples[s]), f"sequence {s}"


@dataclass
class _Seen:
    """What an order has done so far, for `check_order`."""

    prompts: list[int]
    lanes: int
    lane_size: int
    chunk: int
    refill_chunk: int
    chunk_of: dict[int, int] = field(default_factory=dict)  # sequence -> the chunk its group was split by
    place: dict[int, tuple[int, int]] = field(default_factory=dict)  # sequence -> (lane, row) it was admitted to
    holder: dict[tuple[int, int], int] = field(default_factory=dict)  # (lane, row) -> sequence, until its last ids
    in_flight: dict[int, deque[WorkItem]] = field(default_factory=lambda: defaultdict(deque))  # lane -> sampling items
    received: Counter[int] = field(default_factory=Counter)  # sequence -> ids arrived
    width: dict[int, int] = field(default_factory=dict)  # sequence -> padded prompt width of its group
    got: dict[int, list[tuple[ItemKind, int, int, bool, bool]]] = field(default_factory=lambda: defaultdict(list))
    admitted: list[int] = field(default_factory=list)

    def check(self, item: WorkItem) -> None:
        """One item (or one part of a folded one) against the contract."""
        assert 0 <= item.lane < self.lanes and item.rows, item
        assert all(0 <= r < self.lane_size for r in item.row_ids), item
        assert item.row_ids == sorted(set(item.row_ids)), f"{item}: rows not increasing"
        if item.kind is D:
            decoding = {s for (lane, _), s in self.holder.items() if lane == item.lane and self.received[s] >= 1}
            assert set(item.seqs) == decoding, f"{item} is not one step of every decoding row"
        newcomers = [s for s in item.seqs if s not in self.place]
        if newcomers:
            assert item.kind is P and newcomers == item.seqs, f"{item} mixes a new group with running rows"
            self.admitted += newcomers
            refill = any(lane == item.lane and self.received[s] >= 1 for (lane, _), s in self.holder.items())
            self.chunk_of.update(dict.fromkeys(newcomers, self.refill_chunk if refill else self.chunk))
        waiting_ids = {s for it in self.in_flight[item.lane] for s in it.seqs}
        for row in item.rows:
            here = (item.lane, row.row)
            if row.seq in newcomers:
                assert here not in self.holder, f"sequence {row.seq} took {here} from {self.holder.get(here)}"
                self.holder[here], self.place[row.seq] = row.seq, here
                self.width[row.seq] = max(self.prompts[s] for s in newcomers)
            assert self.place[row.seq] == here, f"sequence {row.seq} moved from {self.place[row.seq]} to {here}"
            assert row.seq not in waiting_ids, f"{item} computes sequence {row.seq} before its ids arrived"
            self.got[row.seq].append((item.kind, row.first_pos, item.length, item.samples, row.reset))
        if item.samples:
            self.in_flight[item.lane].append(item)


def expected_items(prompt: int, width: int, chunk: int, samples: int) -> list[tuple[ItemKind, int, int, bool, bool]]:
    """(kind, first_pos, length, samples, reset) of one sequence's rows: the chunks of its
    group's width, shifted left by its padding, the first one resetting the row and the last
    one sampling; then one decode step per sampled id after the first, at positions from the
    prompt's end."""
    pad = width - prompt
    spans = prefill_chunks(width, chunk)
    out = [(P, start - pad, n, k == len(spans) - 1, k == 0) for k, (start, n) in enumerate(spans)]
    return out + [(D, prompt + j, 1, True, False) for j in range(samples - 1)]


def scenario(lanes: int, lane_size: int, seed: int, tight: bool) -> tuple[list[int], list[int], list[int], int]:
    """2 M L + 1 sequences (so rows are refilled) with prompts of 1..9 tokens, 1..6 sampled ids
    and budgets of up to 2 more (a sequence may stop early). `tight`: each row holds only the
    longest single sequence, so a group that would overflow it when padded must split."""
    rng = random.Random(seed)
    n = 2 * lanes * lane_size + 1
    prompts = [rng.randint(1, 9) for _ in range(n)]
    samples = [rng.randint(1, 6) for _ in range(n)]
    budgets = [s + rng.randint(0, 2) for s in samples]
    if tight:
        capacity = max(p + b - 1 for p, b in zip(prompts, budgets))
    else:
        capacity = max(prompts) + max(budgets) - 1
    return prompts, samples, budgets, capacity


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("lane_size", [1, 2, 3])
@pytest.mark.parametrize("tight", [False, True], ids=["roomy", "tight"])
@pytest.mark.parametrize("refill", [None, 1, 2], ids=["refill-as-chunk", "refill-1", "refill-2"])
@pytest.mark.parametrize("fold", [False, True], ids=["apart", "folded"])
def test_order_honours_the_contract(lanes: int, lane_size: int, tight: bool, refill: int | None, fold: bool) -> None:
    for seed in range(5):
        prompts, samples, budgets, capacity = scenario(lanes, lane_size, seed, tight)
        order = make_order(prompts, lanes, 3, samples, lane_size, budgets, capacity, refill, fold)
        check_order(order, prompts, lanes, lane_size, 3, samples, capacity, refill)
        if fold:  # a refill chunk never goes apart from its lane's decode step
            assert not any(
                isinstance(a, WorkItem) and isinstance(b, WorkItem) and a.kind is D and b.kind is P and a.lane == b.lane
                for a, b in itertools.pairwise(order)
            )


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("lane_size", [1, 3])
def test_score_order_honours_the_contract(lanes: int, lane_size: int) -> None:
    for seed in range(3):
        prompts, _, _, _ = scenario(lanes, lane_size, seed, tight=False)
        order = score_order(prompts, lanes, 3, lane_size)
        check_order(order, prompts, lanes, lane_size, 3, [1] * len(prompts), max(prompts))
        assert all(item.kind is P for item in items_of(order))


def test_order_by_hand_two_lanes() -> None:
    """Two one-chunk prompts of 2 and 1 tokens, 2 and 1 sampled ids, on two lanes of one row."""
    order = make_order([2, 1], 2, 4, [2, 1])
    assert order == [
        WorkItem(0, P, (step(0, 0, 0, True),), 2, True),
        WorkItem(1, P, (step(0, 1, 0, True),), 1, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 2),), 1, True),
        AwaitTokens(1),  # sequence 1 is done after its first id; lane 1 goes idle
        AwaitTokens(0),
    ]


# ---- refill, row reuse, chunked admission, padding, withdraw: by hand -----------------------


def test_freed_row_takes_the_oldest_waiting_sequence_and_restarts_it() -> None:
    """One lane of 2 rows; prompts 2, 2, 3, 1 tokens; 2, 4, 2, 1 sampled ids.

    Turn 1 admits 0 and 1 as one group. After turn 2's decode, 0 is done: at turn 3 its row
    takes 2 (the oldest waiting, not 3): 1's decode step with 2's whole prompt folded in (its
    first chunk resets the row; positions start at 0 again, not where sequence 0 stopped), whose
    ids come back as two answers. Turn 4
    decodes both rows, 2 from its own prompt's end (3). Both end: turn 5 admits 3 into row 0,
    the first free row."""
    order = make_order([2, 2, 3, 1], 1, 8, [2, 4, 2, 1], lane_size=2, fold=True)
    assert order == [
        WorkItem(0, P, (step(0, 0, 0, True), step(1, 1, 0, True)), 2, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 2), step(1, 1, 2)), 1, True),
        AwaitTokens(0),  # 0 has its 2 ids: row 0 is free
        WorkItem(0, D, (step(1, 1, 3),), 1, True, folded=WorkItem(0, P, (step(0, 2, 0, True),), 3, True)),
        AwaitTokens(0),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 2, 3), step(1, 1, 4)), 1, True),
        AwaitTokens(0),  # 1 has 4 ids, 2 has 2: both rows free
        WorkItem(0, P, (step(0, 3, 0, True),), 1, True),
        AwaitTokens(0),
    ]


def test_long_newcomer_takes_one_chunk_per_turn_while_its_neighbour_decodes() -> None:
    """One lane of 2 rows, chunk 2; prompts 1, 1, 5 tokens; 5, 1, 2 sampled ids.

    0 and 1 prefill together; 1 is done at once, so 2 takes row 1 at turn 2. Its 5-token prompt
    is 3 chunks (0, 2), (2, 2), (4, 1): one per turn, each after 0's decode step, the first
    alone resetting the row and the last sampling; 0 never waits for the whole prompt. Turn 5
    decodes both."""
    order = make_order([1, 1, 5], 1, 2, [5, 1, 2], lane_size=2)
    assert order == [
        WorkItem(0, P, (step(0, 0, 0, True), step(1, 1, 0, True)), 1, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 1),), 1, True),
        WorkItem(0, P, (step(1, 2, 0, True),), 2, False),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 2),), 1, True),
        WorkItem(0, P, (step(1, 2, 2),), 2, False),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 3),), 1, True),
        WorkItem(0, P, (step(1, 2, 4),), 1, True),
        AwaitTokens(0),  # 0's 4th id
        AwaitTokens(0),  # 2's first id
        WorkItem(0, D, (step(0, 0, 4), step(1, 2, 5)), 1, True),
        AwaitTokens(0),
    ]


def test_refill_goes_in_refill_chunks_and_a_group_into_an_idle_lane_in_prefill_chunks() -> None:
    """One lane of 2 rows, chunk 4, refill chunk 2; prompts 5, 5, 3 tokens; 3, 1, 1 sampled ids.

    0 and 1 fill the idle lane: their 5-token prompts go in chunks of 4, back to back (nothing
    decodes yet). 1 is done at its first id; 2 takes row 1 next to 0, which decodes, so its
    3-token prompt goes in chunks of 2: (0, 2) then (2, 1), one per turn after 0's step."""
    order = make_order([5, 5, 3], 1, 4, [3, 1, 1], lane_size=2, refill_chunk=2)
    assert order == [
        WorkItem(0, P, (step(0, 0, 0, True), step(1, 1, 0, True)), 4, False),
        WorkItem(0, P, (step(0, 0, 4), step(1, 1, 4)), 1, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 5),), 1, True),
        WorkItem(0, P, (step(1, 2, 0, True),), 2, False),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 6),), 1, True),
        WorkItem(0, P, (step(1, 2, 2),), 1, True),
        AwaitTokens(0),  # 0's 3rd id: done
        AwaitTokens(0),  # 2's first id: done
    ]


def test_group_of_newcomers_is_left_padded_and_free_rows_are_left_out() -> None:
    """One lane of 3 rows, chunk 2; prompts 3, 1, 4 tokens; 2, 1, 2 sampled ids.

    The three form one group of width 4, padded by 1, 3 and 0: two chunks back to back
    (nothing decodes yet), first positions -1, -3, 0 then 1, -1, 2. Sequence 1 is done after
    its first id; the decode step computes rows 0 and 2 only."""
    order = make_order([3, 1, 4], 1, 2, [2, 1, 2], lane_size=3)
    first = WorkItem(0, P, (step(0, 0, -1, True), step(1, 1, -3, True), step(2, 2, 0, True)), 2, False)
    second = WorkItem(0, P, (step(0, 0, 1), step(1, 1, -1), step(2, 2, 2)), 2, True)
    decode = WorkItem(0, D, (step(0, 0, 3), step(2, 2, 4)), 1, True)
    assert order == [first, second, AwaitTokens(0), decode, AwaitTokens(0)]
    # Rope positions, -1 on padding: [b, T].
    assert item_positions(first).tolist() == [[-1, 0], [-1, -1], [0, 1]]
    assert item_positions(second).tolist() == [[1, 2], [-1, 0], [2, 3]]
    assert item_positions(decode).tolist() == [[3], [4]]
    assert decode.seqs == [0, 2] and decode.row_ids == [0, 2]


def test_free_rows_apart_take_one_group() -> None:
    """One lane of 3 rows; one-token prompts 0, 1, 2 sampling 2, 4, 2 ids, then 3 and 4
    (prompts 2 and 1, one id each) waiting. After the first decode step rows 0 and 2 are free
    and row 1 still decodes: 3 and 4 take rows 0 and 2 as one group (4 left-padded by one),
    after row 1's step."""
    order = make_order([1, 1, 1, 2, 1], 1, 4, [2, 4, 2, 1, 1], lane_size=3)
    assert order[:6] == [
        WorkItem(0, P, (step(0, 0, 0, True), step(1, 1, 0, True), step(2, 2, 0, True)), 1, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 1), step(1, 1, 1), step(2, 2, 1)), 1, True),
        AwaitTokens(0),  # 0 and 2 are done
        WorkItem(0, D, (step(1, 1, 2),), 1, True),
        WorkItem(0, P, (step(0, 3, 0, True), step(2, 4, -1, True)), 2, True),
    ]


def test_padded_group_that_would_overflow_a_row_splits() -> None:
    """Rows of 5 slots; prompts 4 and 1 with budgets 2 and 5: each fits alone (4 + 1, 1 + 4)
    but padded together (4 + 4) would not, so 1 waits for the lane's next turn, and takes row
    1 while 0 decodes."""
    order = make_order([4, 1], 1, 8, [2, 5], lane_size=2, capacity=5)
    prefills = [item for item in items_of(order) if item.kind is P]
    assert [(item.row_ids, item.seqs, item.length) for item in prefills] == [([0], [0], 4), ([1], [1], 1)]


def test_withdraw_drops_only_a_waiting_sequence() -> None:
    """One lane of one row; 0 is admitted at the first turn, 1 and 2 wait. Withdrawing 1 leaves
    the row to 2 after 0; a running or unknown sequence cannot be withdrawn."""
    scheduler = Scheduler(1, 1, 4, 8)
    for seq in range(3):
        scheduler.add(shaped(seq, 2, 2))
    first = scheduler.next()
    assert first == WorkItem(0, P, (step(0, 0, 0, True),), 2, True)
    assert (scheduler.waiting, scheduler.running) == (2, 1)
    assert not scheduler.withdraw(0)
    assert scheduler.withdraw(1)
    assert not scheduler.withdraw(1)
    assert not scheduler.withdraw(7)
    assert scheduler.waiting == 1
    rest = list(run_order(scheduler, [], lambda s: 2))
    assert rest == [
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 2),), 1, True),
        AwaitTokens(0),
        WorkItem(0, P, (step(0, 2, 0, True),), 2, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 2, 2),), 1, True),
        AwaitTokens(0),
    ]
    assert scheduler.idle()


def test_finished_sequences_are_reported_by_id_and_free_their_rows() -> None:
    """`tokens_arrived` returns the item whose ids arrived; only the sequences named as
    finished free their rows, and a freed row is refilled at the lane's next turn."""
    scheduler = Scheduler(1, 2, 4, 8)
    for seq in range(3):
        scheduler.add(shaped(seq, 1, 3))
    group = scheduler.next()
    assert isinstance(group, WorkItem) and group.seqs == [0, 1]
    assert scheduler.next() == AwaitTokens(0)
    assert arrive(scheduler, 0, finished=[1]) == group
    assert scheduler.running == 1
    refill = WorkItem(0, P, (step(1, 2, 0, True),), 1, True)
    assert scheduler.next() == WorkItem(0, D, (step(0, 0, 1),), 1, True, folded=refill)


def test_refill_keeps_more_slots_busy_than_fixed_batches() -> None:
    """One lane of 2 rows, one-token prompts; 5, 1, 5, 1 sampled ids.

    Fixed batches in arrival order, (0, 1) then (2, 3): each decodes 5 - 1 = 4 steps with one
    of its two rows live, so decode occupancy is 8 / (8 x 2) = 0.5.

    With refill: 0 and 1 prefill; 1 is done, 2 takes its row (turn 2: a step of 0 alone);
    turns 3, 4, 5 step 0 and 2 together; 0 is done after turn 5, 3 takes its row (turn 6: a
    step of 2 alone, 2 is then done, and 3's prefill). 1 + 2 + 2 + 2 + 1 = 8 live slots in 5
    steps of 2: 0.8."""
    order = make_order([1, 1, 1, 1], 1, 4, [5, 1, 5, 1], lane_size=2)
    decodes = [item.seqs for item in items_of(order) if item.kind is D]
    assert decodes == [[0], [0, 2], [0, 2], [0, 2], [2]]
    assert occupancy(order, 2) == pytest.approx(0.8)
    assert occupancy(order, 2) > 0.5


def test_occupancy_counts_live_rows_of_decode_steps_only() -> None:
    order: Order = [
        WorkItem(0, P, (step(0, 0, 0, True), step(1, 1, 0, True)), 4, True),
        AwaitTokens(0),
        WorkItem(0, D, (step(0, 0, 4), step(2, 1, 4)), 1, True),
        WorkItem(1, D, (step(0, 2, 4),), 1, True),
    ]
    assert occupancy(order, 4) == pytest.approx((2 + 1) / (2 * 4))
    assert occupancy(order[:2], 4) == 0.0


# ---- action lists: matching sends and receives, no deadlock --------------------------------


def check_channels(acts: list[list[Action]], n_items: int, answers: list[int]) -> None:
    """Every stage computes every item once in issue order; on each channel (src, dst) the
    items received are the items sent, in the same order; activations go s -> s + 1 and ids
    go from the last stage to stage 0, `answers[i]` times for item i (once per sampling
    part)."""
    n = len(acts)
    sent: dict[tuple[int, int], list[int]] = defaultdict(list)
    received: dict[tuple[int, int], list[int]] = defaultdict(list)
    for s, stage in enumerate(acts):
        assert [a.item for a in stage if a.op == "compute"] == list(range(n_items)), f"stage {s}"
        for a in stage:
            if a.op == "send":
                sent[(s, a.peer)].append(a.item)
            elif a.op == "recv":
                received[(a.peer, s)].append(a.item)
    assert sent == received
    expected = {(s, s + 1): list(range(n_items)) for s in range(n - 1)}
    if n > 1:
        expected[(n - 1, 0)] = [i for i, count in enumerate(answers) for _ in range(count)]
    assert {k: v for k, v in sent.items() if v} == {k: v for k, v in expected.items() if v}


def refills(order: Order) -> int:
    """Rows that took a second (or later) sequence."""
    seen: set[tuple[int, int]] = set()
    count = 0
    for item in items_of(order):
        for row in (row for part in item.parts for row in part.rows):
            if row.reset:
                count += (item.lane, row.row) in seen
                seen.add((item.lane, row.row))
    return count


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("lane_size", [1, 3])
@pytest.mark.parametrize("fold", [False, True], ids=["apart", "folded"])
def test_every_send_is_received_and_nothing_deadlocks(stages: int, lanes: int, lane_size: int, fold: bool) -> None:
    """Random budgets and finishes, more sequences than slots: rows are refilled while their
    neighbours decode, a lane has up to two sampling items in flight (or one item whose two
    parts both sample)."""
    for seed, score in [(0, False), (1, False), (2, True)]:
        prompts, samples, budgets, capacity = scenario(lanes, lane_size, seed + 10 * stages, tight=seed == 1)
        if score:
            order = score_order(prompts, lanes, 3, lane_size)
        else:
            order = make_order(prompts, lanes, 3, samples, lane_size, budgets, capacity, fold=fold)
        assert refills(order) > 0
        items = items_of(order)
        acts = stage_actions(order, stages)
        answers = [sum(part.samples for part in it.parts) for it in items]
        check_channels(acts, len(items), answers)
        timeline = simulate(acts, lambda s, i: 1.0 + 0.5 * ((s + i) % 3))  # uneven costs
        for s in range(stages):
            assert sorted(i for _, _, i in timeline.busy[s]) == list(range(len(items)))


def test_a_lane_can_have_two_sampling_items_in_flight() -> None:
    """The chunked-admission case above: turn 4 issues 0's decode step and 2's last chunk;
    the scheduler expects their ids in issue order (the order every stage keeps), and the
    lane goes on only when both arrived; the action lists run on 1..4 stages."""
    scheduler = Scheduler(1, 2, 2, 8, fold=False)
    for seq, (prompt, budget) in enumerate([(1, 5), (1, 1), (5, 2)]):
        scheduler.add(shaped(seq, prompt, budget))
    samples = [5, 1, 2]
    issued: deque[WorkItem] = deque()  # sampling items whose ids have not arrived, oldest first
    sampled: Counter[int] = Counter()
    order: Order = []
    most_in_flight = 0
    while (action := scheduler.next()) is not None:
        order.append(action)
        if isinstance(action, WorkItem):
            if action.samples:
                issued.append(action)
            most_in_flight = max(most_in_flight, len(issued))
            continue
        oldest = issued.popleft()
        assert scheduler.in_flight(0) == oldest
        sampled.update(oldest.seqs)
        assert arrive(scheduler, 0, [s for s in oldest.seqs if sampled[s] == samples[s]]) == oldest
    assert most_in_flight == 2
    assert [type(a).__name__ for a in order[8:12]] == ["WorkItem", "WorkItem", "AwaitTokens", "AwaitTokens"]
    for stages in STAGES:
        simulate(stage_actions(order, stages), unit_cost)


# ---- timing of equal-cost work -------------------------------------------------------------


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("lane_size", [1, 2])
@pytest.mark.parametrize("score", [True, False], ids=["score", "one-step"])
def test_fill_and_drain_bubble_of_single_items(stages: int, lanes: int, lane_size: int, score: bool) -> None:
    """M lanes of one item each (prefill only, or one sampled id): the pipe fills for S - 1
    ticks and drains for S - 1, so each stage idles (S - 1) of M + S - 1 ticks."""
    prompts = [4] * (lanes * lane_size)
    if score:
        order = score_order(prompts, lanes, 4, lane_size)
    else:
        order = make_order(prompts, lanes, 4, [1] * len(prompts), lane_size)
    assert len(items_of(order)) == lanes
    timeline = simulate(stage_actions(order, stages), unit_cost)
    assert timeline.makespan == lanes + stages - 1
    hand = (stages - 1) / (lanes + stages - 1)
    assert theoretical_bubble(stages, lanes) == pytest.approx(hand)
    for s in range(stages):
        assert timeline.bubble_fraction(s) == pytest.approx(hand)


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("lane_size", [1, 2])
def test_ring_timing_with_equal_lanes(stages: int, lanes: int, lane_size: int) -> None:
    """M lanes, each holding one full group of equal sequences, n = 4 items per lane (one
    chunk + 3 decode steps), unit cost.

    Stage 0 issues one item per lane per round. A lane's ids come back S ticks after its item
    started, so its next item starts max(M, S) ticks after its previous one: item k of lane l
    runs on stage s during [k P + l + s, k P + l + s + 1) with P = max(M, S). For M >= S every
    stage is busy without a gap from its first item to its last; for M < S each stage works
    M ticks out of every S."""
    n = 4
    order = make_order([3] * (lanes * lane_size), lanes, 3, [n] * (lanes * lane_size), lane_size)
    items = items_of(order)
    assert all(len(it.seqs) == lane_size for it in items)
    round_of = [sum(1 for prev in items[:i] if prev.lane == it.lane) for i, it in enumerate(items)]
    period = max(lanes, stages)
    timeline = simulate(stage_actions(order, stages), unit_cost)
    for s in range(stages):
        got = sorted((start, end) for start, end, _ in timeline.busy[s])
        want = sorted(
            (float(k * period + it.lane + s), float(k * period + it.lane + s + 1))
            for it, k in zip(items, round_of)
        )
        assert got == want, f"stage {s}"
        gaps = [b[0] - a[1] for a, b in itertools.pairwise(got)]
        if lanes >= stages:
            assert all(g == 0 for g in gaps), f"stage {s} idles after the fill: {gaps}"
        else:
            # Back to back within a round (when it has several lanes), S - M idle between rounds.
            expected_gaps = {float(stages - lanes)} | ({0.0} if lanes > 1 else set())
            assert set(gaps) == expected_gaps, f"stage {s}"
    makespan = (n - 1) * period + lanes - 1 + stages
    assert timeline.makespan == makespan
    idle = makespan - n * lanes
    for s in range(stages):
        assert timeline.bubble_fraction(s) == pytest.approx(idle / makespan)


def test_full_ring_with_several_chunks_has_no_gap() -> None:
    """With nothing to decode a lane issues its 3 chunks back to back; the first lane's ids
    (its last chunk leaves the last of 3 stages at tick 5) are back long before stage 0 has
    issued the other lanes' 9 chunks, and each decode round (4 ticks) outlasts the 3-tick
    trip, so every stage computes all 4 lanes x (3 chunks + 2 steps) back to back."""
    lanes, stages = 4, 3
    order = make_order([7] * lanes, lanes, 3, [3] * lanes)
    kinds = [(it.lane, it.kind) for it in items_of(order)]
    assert kinds[:12] == [(lane, P) for lane in range(lanes) for _ in range(3)]
    timeline = simulate(stage_actions(order, stages), unit_cost)
    n_items = lanes * (3 + 2)
    assert timeline.makespan == n_items + stages - 1
    for s in range(stages):
        spans = sorted((a, b) for a, b, _ in timeline.busy[s])
        assert spans[0][0] == s and spans[-1][1] == s + n_items
        assert all(b[0] == a[1] for a, b in itertools.pairwise(spans))


# ---- the simulator itself can fail ---------------------------------------------------------


def _valid_actions(stages: int = 3) -> list[list[Action]]:
    order = make_order([2, 2], 2, 2, [3, 2])
    acts = stage_actions(order, stages)
    simulate(acts, unit_cost)  # the unbroken lists run
    return acts


def test_missing_send_is_a_deadlock() -> None:
    acts = _valid_actions()
    # The last activation stage 0 sends: stage 1 waits for it forever. (Dropping an earlier
    # one is caught too, as an out-of-order item: the next test's error.)
    last_send = max(i for i, a in enumerate(acts[0]) if a.op == "send")
    del acts[0][last_send]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(acts, unit_cost)


def test_missing_token_send_is_a_deadlock() -> None:
    acts = _valid_actions()
    last = len(acts) - 1
    last_ids = max(i for i, a in enumerate(acts[last]) if a.op == "send" and a.peer == 0)
    del acts[last][last_ids]
    with pytest.raises(RuntimeError, match="deadlock"):
        simulate(acts, unit_cost)


def test_receives_in_the_wrong_order_are_an_error() -> None:
    acts = _valid_actions()
    recvs = [i for i, a in enumerate(acts[1]) if a.op == "recv"]
    i, j = recvs[0], recvs[1]
    acts[1][i], acts[1][j] = acts[1][j], acts[1][i]
    with pytest.raises(RuntimeError, match="expected item"):
        simulate(acts, unit_cost)


def test_a_send_nobody_receives_is_an_error() -> None:
    acts = _valid_actions()
    acts[1].append(Action("send", 2, 99))
    with pytest.raises(RuntimeError, match="never received"):
        simulate(acts, unit_cost)
