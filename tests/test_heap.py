"""The C heap's free pages go back to the system (`ppinfer.pipeline.heap`), and a stage gives
them back after each group's prefill and when it holds no sequence any more."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_runner import fed_ids, whole
from tiny_cases import ALL_CASES, TinyFiles

from ppinfer.pipeline import heap, runtime
from ppinfer.pipeline.runtime import StageRunner
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.simulate import run_order, shaped
from ppinfer.pipeline.work import ItemKind, WorkItem


def _rss() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


@pytest.mark.skipif(heap._TRIM is None, reason="the C library has no malloc_trim")
def test_trim_returns_free_heap_pages_below_the_top() -> None:
    """64 MiB of 64 KiB tensors (heap-allocated: below glibc's mmap threshold), each followed
    by a small tensor that stays: freeing the large ones leaves holes the heap cannot give back
    from its top, so their pages stay resident until `trim_heap`, which returns most of them."""
    large, kept = [], []
    for _ in range(1024):
        large.append(torch.ones(16 * 1024))  # 64 KiB, every page touched
        kept.append(torch.ones(1024))  # 4 KiB after it
    del large
    freed = _rss()
    assert heap.trim_heap()
    after = _rss()
    assert sum(float(t[0]) for t in kept) == 1024.0
    assert freed - after > 32 * 2**20, f"resident after freeing {freed}, after trimming {after}"


@torch.no_grad()
def test_a_stage_trims_after_each_group_prefill_and_when_idle(
    tiny_files: TinyFiles, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Trims come after a group's last prefill chunk and after the release that leaves no row
    holding a sequence; never after other chunks or decode steps."""
    trims: list[str] = []
    spec, path = ALL_CASES["llama"], tiny_files.path("llama")
    stage = whole(path, spec.n_layer)
    prompts, samples = [20, 5, 30, 9], [3, 2, 4, 2]
    capacity = max(prompts) + max(samples)
    rng = np.random.default_rng(3)
    seqs = [rng.integers(0, spec.n_vocab, p + n, dtype=np.int64) for p, n in zip(prompts, samples)]
    scheduler = Scheduler(2, 2, 8, capacity)
    runner = StageRunner(stage, n_lanes=2, lane_size=2, capacity=capacity, kv_tokens=4 * capacity,
                         kv_dtype=torch.float32)
    monkeypatch.setattr(runtime, "trim_heap", lambda: trims.append("trim") or True)
    # "idle": the release that left no row busy; "prefill": a group's last chunk
    expected: list[str] = []

    def release(rows: list[tuple[int, int]]) -> None:
        runner.release(rows)
        busy = any(scheduler.sequence_in(lane, row) is not None for lane in range(2) for row in range(2))
        if not busy:
            expected.append("idle")

    sequences = [shaped(i, p, n) for i, (p, n) in enumerate(zip(prompts, samples))]
    kinds = set()
    for action in run_order(scheduler, sequences, lambda s: samples[s], on_release=release):
        if isinstance(action, WorkItem):
            runner.run(action, fed_ids(action, seqs), None)
            kinds.add((action.kind, action.samples))
            if action.kind is ItemKind.PREFILL and action.samples:
                expected.append("prefill")
        assert len(trims) == len(expected), f"trims {len(trims)} after {expected}"

    assert kinds == {(ItemKind.PREFILL, False), (ItemKind.PREFILL, True), (ItemKind.DECODE, True)}
    assert scheduler.idle() and "idle" in expected
