"""The schedule without processes: drive a `Scheduler` offline (`run_order`), turn its order
of work into per-stage action lists (`stage_actions`) and a timeline with blocking receives
(`simulate`). For tests, and for the theoretical bubble a run reports next to its measured
one."""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequence import Sequence, Status
from ppinfer.pipeline.work import AwaitTokens, WorkItem
from ppinfer.sampling.params import GenerationParams


def shaped(seq: int, prompt_len: int, budget: int) -> Sequence:
    """A sequence with only the shape the scheduler sees: `prompt_len` tokens, `budget` new
    ones at most (0: scored)."""
    return Sequence(seq, [0] * prompt_len, GenerationParams(max_new_tokens=max(budget, 1)), 0, scored=budget == 0)


def run_order(
    scheduler: Scheduler,
    sequences: Iterable[Sequence],
    samples: Callable[[int], int],
    on_release: Callable[[list[tuple[int, int]]], None] | None = None,
    on_attach: Callable[[list[tuple[int, int, list[int]]]], None] | None = None,
) -> Iterator[WorkItem | AwaitTokens]:
    """Drive `scheduler` offline over `sequences` (added to those it holds already): sequence
    s finishes after `samples(s)` sampled tokens (its first comes from prefill; a scored
    sequence after prefill). `on_release` gets the rows freed by each arrival and `on_attach`
    the rows admitted onto cached blocks, before the next action is yielded (as a rank gives
    their KV blocks back, or starts the rows on them). A shaped sequence keeps no tokens, so a
    preempted one is prefilled again from its prompt alone (a real one: with its tokens)."""
    for sequence in sequences:
        scheduler.add(sequence)
    sampled: dict[int, int] = {}
    while (action := scheduler.next()) is not None:
        released = scheduler.released()  # rows preempted by this turn
        if released and on_release is not None:
            on_release(released)
        attached = scheduler.attached()
        if attached and on_attach is not None:
            on_attach(attached)
        yield action
        if isinstance(action, AwaitTokens):
            item = scheduler.in_flight(action.lane)
            for step in item.rows:
                sequence = scheduler.sequence_in(item.lane, step.row)
                assert sequence is not None and sequence.id == step.seq
                sampled[step.seq] = sampled.get(step.seq, 0) + 1
                done = sequence.scored or sampled[step.seq] >= samples(step.seq)
                sequence.status = Status.FINISHED if done else Status.DECODING
            scheduler.tokens_arrived(action.lane)
            released = scheduler.released()
            if released and on_release is not None:
                on_release(released)


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
        for part in action.parts:  # each sampling part's ids come back on their own
            if part.samples:
                outstanding.setdefault(action.lane, deque()).append(i)
        i += 1
    for s in range(1, n_stages):
        for idx, item in enumerate(items):
            acts[s].append(Action("recv", s - 1, idx))
            acts[s].append(Action("compute", -1, idx))
            if s < last:
                acts[s].append(Action("send", s + 1, idx))
            else:
                acts[s] += [Action("send", 0, idx) for part in item.parts if part.samples]
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
