"""The ring schedule as data, checked without processes.

Every expectation here is derived by hand from the schedule's contract (DESIGN.md, "lanes in a
ring"), never read off the scheduler's own output:

- the order of work items honours each batch's chunks and decode steps, the lane discipline
  (one batch per lane, a lane waits for its sampled ids) and the batch order;
- per-stage action lists pair every send with a receive on the same channel in the same
  order, and simulate to completion for S in 1..4 and M in 1..6 with uneven finishes, more
  batches than lanes and prompts of several chunks;
- with equal-cost items, a lane's k-th item reaches stage s at tick k * max(M, S) + lane + s:
  with M >= S the ring is full (only fill and drain are idle), with M < S every period of S
  ticks has S - M idle ticks; M single-item batches give the textbook (S - 1) / (M + S - 1);
- the simulator rejects broken action lists (missing send, swapped receives, stray send).
"""

from __future__ import annotations

import random
from collections import defaultdict

import pytest

from ppinfer.pipeline.schedule import (
    Action,
    AwaitTokens,
    Kind,
    RingScheduler,
    WorkItem,
    prefill_chunks,
    run_order,
    simulate,
    stage_actions,
    theoretical_bubble,
)

STAGES = (1, 2, 3, 4)
LANES = (1, 2, 3, 4, 5, 6)

Order = list[WorkItem | AwaitTokens]


def make_order(widths: list[int], lanes: int, chunk: int, steps: list[int], score_only: bool = False) -> Order:
    """The scheduler's full order when batch b samples `steps[b]` tokens in all."""
    return list(run_order(RingScheduler(widths, lanes, chunk, score_only), lambda b: steps[b]))


def items_of(order: Order) -> list[WorkItem]:
    return [a for a in order if isinstance(a, WorkItem)]


def unit_cost(stage: int, item: int) -> float:
    return 1.0


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


def test_chunk_capped_by_the_longest_prompt_changes_no_item() -> None:
    """A run sizes its buffers for min(prefill_chunk, longest prompt): the scheduler must
    issue exactly the items it issues with the configured (however large) chunk."""
    widths, steps = [5, 2, 4], [3, 1, 2]
    assert make_order(widths, 2, max(widths), steps) == make_order(widths, 2, 100_000_000, steps)
    assert max(i.length for i in items_of(make_order(widths, 2, 100_000_000, steps))) == max(widths)


def test_scheduler_rejects_no_lanes() -> None:
    with pytest.raises(ValueError, match="0"):
        RingScheduler([3], 0, 2)


def test_tokens_for_a_lane_that_is_not_waiting_is_an_error() -> None:
    scheduler = RingScheduler([2, 2], 2, 1)
    first = scheduler.next()  # lane 0's first chunk: lane 0 does not wait yet
    assert isinstance(first, WorkItem) and first.lane == 0
    with pytest.raises(RuntimeError, match="lane 0"):
        scheduler.tokens_arrived(0, finished=False)


# ---- the order of work items ---------------------------------------------------------------


def check_order(order: Order, widths: list[int], lanes: int, chunk: int, steps: list[int], score_only: bool) -> None:
    """Assert the scheduling contract on a whole order (see the module docstring)."""
    per_batch: dict[int, list[WorkItem]] = defaultdict(list)
    lane_batch: dict[int, int] = {}  # lane -> batch it holds
    waiting: dict[int, bool] = defaultdict(bool)  # lane -> sampled, ids not yet received
    started: list[int] = []
    for action in order:
        if isinstance(action, AwaitTokens):
            assert waiting[action.lane], f"lane {action.lane} awaits ids it never asked for"
            waiting[action.lane] = False
            continue
        item = action
        assert 0 <= item.lane < lanes
        assert not waiting[item.lane], f"lane {item.lane} issued {item} before its ids arrived"
        if item.batch not in per_batch:
            started.append(item.batch)
            held = lane_batch.get(item.lane)
            if held is not None:
                assert len(per_batch[held]) == len(expected_items(widths[held], chunk, steps[held], score_only)), (
                    f"lane {item.lane} took batch {item.batch} before batch {held} finished"
                )
            lane_batch[item.lane] = item.batch
        assert lane_batch[item.lane] == item.batch, f"{item} is not on the lane holding batch {item.batch}"
        per_batch[item.batch].append(item)
        waiting[item.lane] = item.samples
    assert not any(waiting.values()), "a lane's last sampled ids were never received"
    assert started == sorted(started) == list(range(len(widths))), "batches must start in order"
    for b, width in enumerate(widths):
        got = [(i.kind, i.start, i.length, i.samples, i.reset) for i in per_batch[b]]
        assert got == expected_items(width, chunk, steps[b], score_only), f"batch {b}"


def expected_items(width: int, chunk: int, steps: int, score_only: bool) -> list[tuple[Kind, int, int, bool, bool]]:
    """(kind, start, length, samples, reset) of one batch's items: its chunks, then one
    decode step per sampled token after the first, each writing the next cache slot."""
    spans = prefill_chunks(width, chunk)
    out = [(Kind.PREFILL, s, n, k == len(spans) - 1, k == 0) for k, (s, n) in enumerate(spans)]
    if not score_only:
        out += [(Kind.DECODE, width + j, 1, True, False) for j in range(steps - 1)]
    return out


def scenario(lanes: int, seed: int) -> tuple[list[int], list[int]]:
    """2M + 1 batches (waves) with widths of 1..9 tokens and 1..6 sampled tokens each."""
    rng = random.Random(seed)
    n = 2 * lanes + 1
    return [rng.randint(1, 9) for _ in range(n)], [rng.randint(1, 6) for _ in range(n)]


@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("score_only", [False, True], ids=["generate", "score"])
def test_order_honours_the_contract(lanes: int, score_only: bool) -> None:
    for seed in range(5):
        widths, steps = scenario(lanes, seed)
        order = make_order(widths, lanes, 3, steps, score_only)
        check_order(order, widths, lanes, 3, steps, score_only)


def test_order_by_hand_two_lanes() -> None:
    """Two one-chunk batches of 2 and 1 sampled tokens on two lanes, written out by hand."""
    order = make_order([2, 1], 2, 4, [2, 1])
    assert order == [
        WorkItem(0, 0, Kind.PREFILL, 0, 0, 2, True, True),
        WorkItem(1, 1, Kind.PREFILL, 0, 0, 1, True, True),
        AwaitTokens(0),
        WorkItem(0, 0, Kind.DECODE, 0, 2, 1, True, False),
        AwaitTokens(1),  # batch 1 is done after its first token; lane 1 goes idle
        AwaitTokens(0),
    ]


# ---- action lists: matching sends and receives, no deadlock --------------------------------


def check_channels(acts: list[list[Action]], n_items: int, sampling: set[int]) -> None:
    """Every stage computes every item once in issue order; on each channel (src, dst) the
    items received are the items sent, in the same order; activations go s -> s + 1 and ids
    go from the last stage to stage 0, once per sampling item."""
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
        expected[(n - 1, 0)] = sorted(sampling)
    assert {k: v for k, v in sent.items() if v} == {k: v for k, v in expected.items() if v}


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
def test_every_send_is_received_and_nothing_deadlocks(stages: int, lanes: int) -> None:
    for seed, score_only in [(0, False), (1, False), (2, True)]:
        widths, steps = scenario(lanes, seed + 10 * stages)
        order = make_order(widths, lanes, 3, steps, score_only)
        items = items_of(order)
        acts = stage_actions(order, stages)
        check_channels(acts, len(items), {i for i, it in enumerate(items) if it.samples})
        timeline = simulate(acts, lambda s, i: 1.0 + 0.5 * ((s + i) % 3))  # uneven costs
        for s in range(stages):
            assert sorted(i for _, _, i in timeline.busy[s]) == list(range(len(items)))


# ---- timing of equal-cost work -------------------------------------------------------------


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
@pytest.mark.parametrize("score_only", [True, False], ids=["score", "one-step"])
def test_fill_and_drain_bubble_of_single_items(stages: int, lanes: int, score_only: bool) -> None:
    """M batches of one item each (prefill only, or one sampled token): the pipe fills for
    S - 1 ticks and drains for S - 1, so each stage idles (S - 1) of M + S - 1 ticks."""
    order = make_order([4] * lanes, lanes, 4, [1] * lanes, score_only)
    timeline = simulate(stage_actions(order, stages), unit_cost)
    assert timeline.makespan == lanes + stages - 1
    hand = (stages - 1) / (lanes + stages - 1)
    assert theoretical_bubble(stages, lanes) == pytest.approx(hand)
    for s in range(stages):
        assert timeline.bubble_fraction(s) == pytest.approx(hand)


@pytest.mark.parametrize("stages", STAGES)
@pytest.mark.parametrize("lanes", LANES)
def test_ring_timing_with_equal_lanes(stages: int, lanes: int) -> None:
    """M lanes, one batch each, n = 4 items per lane (one chunk + 3 decode steps), unit cost.

    Stage 0 issues one item per lane per round. A lane's ids come back S ticks after its item
    started, so its next item starts max(M, S) ticks after its previous one: item k of lane l
    runs on stage s during [k P + l + s, k P + l + s + 1) with P = max(M, S). For M >= S every
    stage is busy without a gap from its first item to its last; for M < S each stage works
    M ticks out of every S."""
    n = 4
    order = make_order([3] * lanes, lanes, 3, [n] * lanes)
    items = items_of(order)
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
        gaps = [b[0] - a[1] for a, b in zip(got, got[1:])]
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
    """Lanes take turns chunk by chunk too, so with M >= S prompts of several chunks keep the
    ring full as well: every stage computes all 4 lanes x (3 chunks + 2 steps) back to back."""
    lanes, stages = 4, 3
    order = make_order([7] * lanes, lanes, 3, [3] * lanes)
    timeline = simulate(stage_actions(order, stages), unit_cost)
    n_items = lanes * (3 + 2)
    assert timeline.makespan == n_items + stages - 1
    for s in range(stages):
        spans = sorted((a, b) for a, b, _ in timeline.busy[s])
        assert spans[0][0] == s and spans[-1][1] == s + n_items
        assert all(b[0] == a[1] for a, b in zip(spans, spans[1:]))


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
