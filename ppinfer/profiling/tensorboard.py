"""`profile=tensorboard`: a `Tracer` that records the runtime's named ranges with torch.profiler
and times them per step, and the end of a profiled run: per-rank TensorBoard scalars, every
rank's compute spans gathered on the rank that writes `output.dir`, and the pipeline timeline picture.

What a profiled run leaves in the profile directory (`profile.dir`, default
`<output.dir>/tensorboard`), each rank writing only its own files:

    rank<r>.<ns>.pt.trace.json       torch.profiler (Chrome) trace of rank r's active steps
    rank<r>/events.out.tfevents.*    rank r's scalars; the writing rank adds the timeline image

and `timeline.png` in `output.dir` (the writing rank). With profiling off, `make_tracer` returns
`NULL_TRACER` and `finish_profile` returns at once: no profiler, no gather, no files.
"""

from __future__ import annotations

import logging
import time
from contextlib import AbstractContextManager
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Sequence

import numpy as np
import torch
import torch.distributed as dist
from torch.profiler import ProfilerActivity, profile, record_function, schedule, tensorboard_trace_handler

from ppinfer.profiling.metrics import StageMetrics
from ppinfer.profiling.timeline import SPAN_COLUMNS, render_timeline, write_png
from ppinfer.profiling.trace import NULL_TRACER, Tracer

if TYPE_CHECKING:
    from ppinfer.model import StageState
    from ppinfer.pipeline.job import Job
    from ppinfer.pipeline.runtime import Span, StageRunner
    from ppinfer.pipeline.requests import TokenCounts

log = logging.getLogger("ppinfer")

TIMELINE = "timeline.png"
COMM_RANGES = ("send", "recv")
"""Ranges that move data; `wait` (blocked on a peer) is idle time, as in metrics.json."""
OPAQUE_RANGES = ("send", "recv", "wait")
"""Ranges whose insides the profiler must not see (see `TensorBoardTracer`)."""


def _record_functions(enabled: bool) -> None:
    """Switch the profiler's op recording on this thread (thread-local, results unchanged)."""
    torch.autograd._enable_record_function(enabled)


class _TimedRange(AbstractContextManager[None]):
    """`record_function(name)` for the trace, plus the range's seconds added to `totals`."""

    __slots__ = ("_name", "_totals", "_function", "_start", "_opaque")

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


def profile_dir(job: Job) -> Path:
    """`profile.dir`, or `<output.dir>/tensorboard` when it is null."""
    configured = job.cfg.profile.dir
    return Path(configured) if configured else job.out_dir / "tensorboard"


def _clear_previous(log_dir: Path, rank: int) -> None:
    """Remove this rank's files from an earlier run in the same (pinned) directory, so that
    TensorBoard does not mix two runs in one series."""
    old = [*log_dir.glob(f"rank{rank}.*.pt.trace.json*"), *(log_dir / f"rank{rank}").glob("events.out.tfevents.*")]
    for path in old:
        path.unlink()
    if old:
        log.info("profile: replaced %d file(s) of an earlier run in %s", len(old), log_dir)


def make_tracer(job: Job) -> Tracer:
    """`NULL_TRACER` when profiling is off, else a started `TensorBoardTracer` for this rank."""
    settings = job.cfg.profile
    if not settings.enabled:
        return NULL_TRACER
    log_dir = profile_dir(job)
    log_dir.mkdir(parents=True, exist_ok=True)
    _clear_previous(log_dir, job.env.rank)
    return TensorBoardTracer(
        log_dir, job.env.rank, settings.wait, settings.warmup, settings.active, cuda=job.device.type == "cuda"
    )


# ---- spans: pack, gather ------------------------------------------------------------------


def pack_spans(spans: Sequence[Span], loop_start: float) -> np.ndarray:
    """A span table `[n, 4]` float64 (see `timeline.SPAN_COLUMNS`), times since `loop_start`."""
    table = np.zeros((len(spans), len(SPAN_COLUMNS)), dtype=np.float64)
    for i, span in enumerate(spans):
        table[i] = (span.start - loop_start, span.end - loop_start, span.lane, int(span.kind))
    return table


def gather_spans(table: np.ndarray, world: int, device: torch.device) -> list[np.ndarray]:
    """Every rank's span table, in rank order, on every rank (a collective: all ranks call it).

    Ranks hold different numbers of spans, so the lengths go first and the tables travel
    padded to the longest; plain float64 tensors, no pickling. `device` is where the backend
    wants tensors (the GPU for NCCL).
    """
    if world == 1:
        return [table]
    local = torch.from_numpy(table).to(device)  # [n, 4]
    length = torch.tensor([local.shape[0]], dtype=torch.int64, device=device)
    lengths = [torch.zeros_like(length) for _ in range(world)]
    dist.all_gather(lengths, length)
    sizes = [int(n.item()) for n in lengths]
    padded = torch.zeros(max(max(sizes), 1), len(SPAN_COLUMNS), dtype=torch.float64, device=device)  # [N, 4]
    padded[: local.shape[0]] = local
    parts = [torch.empty_like(padded) for _ in range(world)]
    dist.all_gather(parts, padded)
    return [part[:n].cpu().numpy() for part, n in zip(parts, sizes)]


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


def kv_cache_use(states: Sequence[StageState | None]) -> dict[str, float]:
    """Bytes of KV cache allocated on this stage, and the bytes and fraction of it holding
    tokens at the end of the run (every lane's slots cost the same bytes within the lane)."""
    allocated = sum(s.nbytes for s in states if s is not None)
    used = sum(s.used_bytes for s in states if s is not None)
    return {
        "memory/kv_cache_allocated_bytes": float(allocated),
        "memory/kv_cache_used_bytes": float(used),
        "memory/kv_cache_used_fraction": used / allocated if allocated else 0.0,
    }


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


def throughput(counts: TokenCounts, loop_start: float, loop_end: float) -> dict[str, float]:
    """Token rates and latency measured at the last stage (as in metrics.json)."""
    prefill = counts.prompt_tokens / counts.prefill_s if counts.prefill_s else 0.0
    decode = counts.generated_tokens / counts.decode_s if counts.decode_s else 0.0
    return {
        "throughput/prefill_tokens_per_s": prefill,
        "throughput/decode_tokens_per_s": decode,
        "throughput/time_to_first_token_s": (counts.first_token_at or loop_end) - loop_start,
    }


def finish_profile(
    tracer: Tracer, job: Job, runner: StageRunner, stages: Sequence[StageMetrics], counts: TokenCounts
) -> None:
    """After the loop, on every rank (the span gather is a collective): stop the profiler,
    write this rank's scalars, and on the rank that writes `output.dir` draw the timeline of every stage into
    TensorBoard and `<output.dir>/timeline.png`. Returns at once when profiling is off."""
    if not isinstance(tracer, TensorBoardTracer):
        return
    tracer.close()
    clock, rank = runner.clock, job.env.rank
    table = pack_spans(clock.spans, clock.loop_start)
    comm_device = job.device if job.device.type == "cuda" else torch.device("cpu")
    tables = gather_spans(table, job.env.world, comm_device)
    # Imported here, not at the top: it costs about half a second, which a run without
    # profiling should not pay at startup.
    from torch.utils.tensorboard import SummaryWriter

    writer = SummaryWriter(str(tracer.log_dir / f"rank{rank}"))
    try:
        for tag, values in step_series(tracer.step_ends, tracer.step_ranges, table, clock.loop_start).items():
            for step, value in enumerate(values):
                writer.add_scalar(tag, value, step)
        scalars = {**stage_summary(stages[rank]), **kv_cache_use(runner.states)}
        if rank == job.writer_rank:
            scalars.update(throughput(counts, clock.loop_start, clock.loop_end))
        for tag, value in scalars.items():
            writer.add_scalar(tag, value, 0)
        if rank == job.writer_rank:
            image = render_timeline(tables)  # [H, W, 3]
            writer.add_image("pipeline/timeline", image, 0, dataformats="HWC")
            job.out_dir.mkdir(parents=True, exist_ok=True)
            write_png(job.out_dir / TIMELINE, image)
            log.info(
                "profile: TensorBoard logs and traces in %s, timeline in %s", tracer.log_dir, job.out_dir / TIMELINE
            )
    finally:
        writer.close()
