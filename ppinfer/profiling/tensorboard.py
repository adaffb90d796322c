"""`profile=tensorboard`: a `Tracer` that records the runtime's named ranges with torch.profiler
and times them per step, and the end of a profiled run: per-rank TensorBoard scalars, every
rank's compute spans gathered on the rank that writes `output.dir`, and the pipeline timeline picture.

What a profiled run leaves in the profile directory (`profile.dir`, default
`<output.dir>/tensorboard`), each rank writing only its own files:

    rank<r>.<ns>.pt.trace.json       torch.profiler (Chrome) trace of rank r's active steps
    rank<r>/events.out.tfevents.*    rank r's scalars; the writing rank adds the timeline image

and `timeline.png` in `output.dir` (the writing rank). With profiling off, `make_tracer` returns
`NULL_TRACER` and `finish_profile` returns at once: no profiler, no files.

This package takes plain data: the pipeline gathers every rank's spans and measures what the
scalars show (`ppinfer.pipeline.profile`), and hands them over as a `ProfileEnd`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType

import numpy as np
import torch
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

from ppinfer.profiling.metrics import StageMetrics
from ppinfer.profiling.timeline import render_timeline, write_png
from ppinfer.profiling.trace import NULL_TRACER, Tracer

log = logging.getLogger("ppinfer")

COMM_RANGES = ("send", "recv")
"""Ranges that move data; `wait` (blocked on a peer) is idle time, as in metrics.json."""
OPAQUE_RANGES = ("send", "recv", "wait")
"""Ranges whose insides the profiler must not see (see `TensorBoardTracer`)."""


def _record_functions(enabled: bool) -> None:
    """Switch the profiler's op recording on this thread (thread-local, results unchanged)."""
    torch.autograd._enable_record_function(enabled)


class _TimedRange(AbstractContextManager[None]):
    """`record_function(name)` for the trace, plus the range's seconds added to `totals`."""

    __slots__ = ("_function", "_name", "_opaque", "_start", "_totals")

    def __init__(self, name: str, totals: dict[str, float]) -> None:
        self._name, self._totals = name, totals
        self._function = record_function(name)
        self._opaque = name in OPAQUE_RANGES
        self._start = 0.0

    def __enter__(self) -> None:
        _record_functions(True)
        self._function.__enter__()
        if self._opaque:
            _record_functions(False)
        self._start = time.perf_counter()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        elapsed = time.perf_counter() - self._start
        self._totals[self._name] = self._totals.get(self._name, 0.0) + elapsed
        _record_functions(True)
        self._function.__exit__(exc_type, exc, tb)
        _record_functions(False)


class TensorBoardTracer:
    """torch.profiler over the work items of one rank, one profiler step per item.

    The schedule skips `wait` items, warms up for `warmup` and records `active` items once;
    `close` writes the trace as `rank<r>.<ns>.pt.trace.json` in `log_dir`. Independently of
    the window, every range's seconds are summed per step, for the per-step scalars.

    Only the named ranges and the ops inside compute ranges are recorded: op recording is off
    on this thread between ranges and inside `OPAQUE_RANGES`. The reason is a use-after-free
    in torch: a c10d `Work` created while the profiler records keeps a handle on that
    session's event buffer, and completing it after the session has ended (a send flushed at
    the end of the run, the next header receive posted during the last recorded step) writes
    into freed memory and crashes the process later. With recording off while works are
    created, no work holds such a handle; the `send` / `recv` / `wait` ranges still time them.
    """

    def __init__(self, log_dir: Path, rank: int, wait: int, warmup: int, active: int, cuda: bool) -> None:
        self.log_dir, self.rank = log_dir, rank
        self.step_ends: list[float] = []
        """perf_counter() at the end of each step."""
        self.step_ranges: list[dict[str, float]] = []
        """Per step: range name -> seconds spent in it."""
        self._totals: dict[str, float] = {}
        self._first_recorded = wait + warmup + 1
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
        # torch.profiler's first session imports torch._inductor and initialises the tracing
        # backend (seconds on a small CPU box): pay that here, before the loop, so that the
        # measured steps (and metrics.json) do not include it.
        with profile(activities=activities):
            pass
        self._write_trace = tensorboard_trace_handler(str(log_dir), worker_name=f"rank{rank}")
        self._trace_ready = False
        self._profiler = profile(
            activities=activities,
            schedule=schedule(wait=wait, warmup=warmup, active=active, repeat=1),
            on_trace_ready=self._defer_trace,
        )
        self._profiler.start()
        _record_functions(False)

    def _defer_trace(self, prof: profile) -> None:
        # Exporting the JSON takes a few hundred ms: do it in `close`, after the loop.
        self._trace_ready = True

    def range(self, name: str) -> AbstractContextManager[object]:
        return _TimedRange(name, self._totals)

    def step(self) -> None:
        self.step_ends.append(time.perf_counter())
        self.step_ranges.append(self._totals)
        self._totals = {}
        # The profiler marks each step with a `ProfilerStep#<n>` range opened here.
        _record_functions(True)
        self._profiler.step()
        _record_functions(False)

    def close(self) -> None:
        """Stop the profiler, write the trace, and give op recording back to the thread."""
        _record_functions(True)
        self._profiler.stop()
        if self._trace_ready:
            self._write_trace(self._profiler)
        elif len(self.step_ends) < self._first_recorded:
            log.warning(
                "profile: rank %d ran only %d steps; the schedule starts recording at step %d, so "
                "no trace was written (lower profile.wait / profile.warmup)",
                self.rank, len(self.step_ends), self._first_recorded,
            )


def make_tracer(
    enabled: bool, log_dir: Path, rank: int, wait: int, warmup: int, active: int, cuda: bool
) -> Tracer:
    """`NULL_TRACER` when profiling is off, else a started `TensorBoardTracer` for this rank
    writing into `log_dir` (this rank's files of an earlier run there removed first)."""
    if not enabled:
        return NULL_TRACER
    log_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(log_dir, rank)
    return TensorBoardTracer(log_dir, rank, wait, warmup, active, cuda=cuda)


def _clear_previous(log_dir: Path, rank: int) -> None:
    """Remove this rank's files from an earlier run in the same (pinned) directory, so that
    TensorBoard does not mix two runs in one series."""
    old = [*log_dir.glob(f"rank{rank}.*.pt.trace.json*"), *(log_dir / f"rank{rank}").glob("events.out.tfevents.*")]
    for path in old:
        path.unlink()
    if old:
        log.info("profile: replaced %d file(s) of an earlier run in %s", len(old), log_dir)


# ---- scalars ------------------------------------------------------------------------------


def step_series(
    step_ends: Sequence[float], step_ranges: Sequence[dict[str, float]], table: np.ndarray, loop_start: float
) -> dict[str, list[float]]:
    """Per-step milliseconds: `step/wall_ms`, `step/compute_ms` (the step's compute span),
    `step/comm_ms` (send + recv), `step/idle_ms` (the rest, as metrics.json counts idle), and
    `range/<name>_ms` for every named range seen.

    Step i is the time from the end of step i - 1 (or the loop start) to the end of step i;
    it holds work item i, whose compute span is row i of `table`.
    """
    steps = min(len(step_ends), len(step_ranges), len(table))
    names = sorted({name for ranges in step_ranges[:steps] for name in ranges})
    series: dict[str, list[float]] = {f"step/{key}_ms": [] for key in ("wall", "compute", "comm", "idle")}
    series.update({f"range/{name}_ms": [] for name in names})
    previous = loop_start
    for i in range(steps):
        wall = step_ends[i] - previous
        previous = step_ends[i]
        compute = float(table[i, 1] - table[i, 0])
        comm = sum(step_ranges[i].get(name, 0.0) for name in COMM_RANGES)
        series["step/wall_ms"].append(wall * 1e3)
        series["step/compute_ms"].append(compute * 1e3)
        series["step/comm_ms"].append(comm * 1e3)
        series["step/idle_ms"].append(max(wall - compute - comm, 0.0) * 1e3)
        for name in names:
            series[f"range/{name}_ms"].append(step_ranges[i].get(name, 0.0) * 1e3)
    return series


def stage_summary(mine: StageMetrics) -> dict[str, float]:
    """This rank's totals, with the same definitions as its metrics.json `per_stage` entry."""
    wall = mine.wall_s or 1e-12
    summary = {
        "stage/compute_s": mine.compute_s,
        "stage/comm_s": mine.comm_s,
        "stage/idle_s": mine.idle_s,
        "stage/bubble_fraction": mine.idle_s / wall,
        "memory/peak_rss_bytes": float(mine.peak_rss_bytes),
    }
    if mine.peak_cuda_bytes:
        summary["memory/peak_cuda_bytes"] = float(mine.peak_cuda_bytes)
    return summary


@dataclass(frozen=True)
class ProfileEnd:
    """What the end of a profiled run writes, as plain data from the pipeline."""

    rank: int
    spans: np.ndarray
    """This rank's compute spans (`timeline.SPAN_COLUMNS`), seconds since `loop_start`."""
    loop_start: float
    stage: StageMetrics
    kv_cache: dict[str, float]
    """KV-cache scalars of this rank (tag -> value)."""
    all_spans: list[np.ndarray] | None = None
    """Every rank's spans, on the rank that draws the timeline (None elsewhere)."""
    throughput: dict[str, float] = field(default_factory=dict)
    """Token rates and latency, on the rank that writes `output.dir`."""
    timeline_png: Path | None = None
    """Where the timeline picture goes (with `all_spans`)."""


def finish_profile(tracer: Tracer, end: ProfileEnd) -> None:
    """After the loop: stop the profiler, write this rank's scalars and, with `end.all_spans`,
    draw the timeline of every stage into TensorBoard and `end.timeline_png`. Returns at once
    when profiling is off."""
    if not isinstance(tracer, TensorBoardTracer):
        return
    tracer.close()
    # Imported here, not at the top: it costs about half a second, which a run without
    # profiling should not pay at startup.
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tracer.log_dir / f"rank{end.rank}"))
    try:
        for tag, values in step_series(tracer.step_ends, tracer.step_ranges, end.spans, end.loop_start).items():
            for step, value in enumerate(values):
                writer.add_scalar(tag, value, step)
        for tag, value in {**stage_summary(end.stage), **end.kv_cache, **end.throughput}.items():
            writer.add_scalar(tag, value, 0)
        if end.all_spans is not None and end.timeline_png is not None:
            image = render_timeline(end.all_spans)  # [H, W, 3]
            writer.add_image("pipeline/timeline", image, 0, dataformats="HWC")
            end.timeline_png.parent.mkdir(parents=True, exist_ok=True)
            write_png(end.timeline_png, image)
            log.info("profile: TensorBoard logs and traces in %s, timeline in %s", tracer.log_dir, end.timeline_png)
    finally:
        writer.close()
