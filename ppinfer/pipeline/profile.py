"""`profile=tensorboard` from the pipeline's side: each rank's tracer, and at the end the
plain data `ppinfer.profiling.tensorboard` writes (every rank's spans gathered on the rank that
writes `output.dir`, KV-cache use, token rates)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from ppinfer.model import KVPool
from ppinfer.pipeline.job import Job
from ppinfer.pipeline.outputs import TIMELINE
from ppinfer.pipeline.runtime import Span, StageRunner
from ppinfer.pipeline.sequences import TokenCounts
from ppinfer.profiling.metrics import StageMetrics
from ppinfer.profiling.tensorboard import ProfileEnd, TensorBoardTracer, finish_profile, make_tracer
from ppinfer.profiling.timeline import SPAN_COLUMNS
from ppinfer.profiling.trace import Tracer


def profile_dir(job: Job) -> Path:
    """`profile.dir`, or `<output.dir>/tensorboard` when it is null."""
    configured = job.cfg.profile.dir
    return Path(configured) if configured else job.out_dir / "tensorboard"


def tracer_for(job: Job) -> Tracer:
    """This rank's tracer: `NULL_TRACER` unless `profile=tensorboard`."""
    p = job.cfg.profile
    return make_tracer(p.enabled, profile_dir(job), job.env.rank, p.wait, p.warmup, p.active, job.device.type == "cuda")


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


def kv_cache_use(pool: KVPool | None) -> dict[str, float]:
    """This stage's KV pool: its bytes, the bytes of the blocks held at the end of the run
    and at most at once, and that peak as a fraction of the pool."""
    if pool is None:
        return dict.fromkeys(KV_CACHE_KEYS, 0.0)
    return {
        "memory/kv_cache_allocated_bytes": float(pool.nbytes),
        "memory/kv_cache_used_bytes": float(pool.used_bytes),
        "memory/kv_cache_peak_used_bytes": float(pool.peak_used * pool.block_bytes),
        "memory/kv_cache_used_fraction": pool.peak_used / pool.n_blocks,
        "memory/kv_cache_blocks": float(pool.n_blocks),
    }


KV_CACHE_KEYS = (
    "memory/kv_cache_allocated_bytes", "memory/kv_cache_used_bytes", "memory/kv_cache_peak_used_bytes",
    "memory/kv_cache_used_fraction", "memory/kv_cache_blocks",
)


def throughput(counts: TokenCounts, loop_start: float, loop_end: float) -> dict[str, float]:
    """Token rates and latency measured at the first rank (as in metrics.json)."""
    prefill = counts.prompt_tokens / counts.prefill_s if counts.prefill_s else 0.0
    decode = counts.generated_tokens / counts.decode_s if counts.decode_s else 0.0
    return {
        "throughput/prefill_tokens_per_s": prefill,
        "throughput/decode_tokens_per_s": decode,
        "throughput/time_to_first_token_s": (counts.first_token_at or loop_end) - loop_start,
        "kv_cache/preemptions": float(counts.preemptions),
    }


def end_profile(
    tracer: Tracer, job: Job, runner: StageRunner, stages: Sequence[StageMetrics], counts: TokenCounts
) -> None:
    """After the loop, on every rank (the span gather is a collective): hand this rank's
    profile to TensorBoard; the rank that writes `output.dir` also draws the timeline."""
    if not isinstance(tracer, TensorBoardTracer):
        return
    clock, rank = runner.clock, job.env.rank
    table = pack_spans(clock.spans, clock.loop_start)
    comm_device = job.device if job.device.type == "cuda" else torch.device("cpu")
    tables = gather_spans(table, job.env.world, comm_device)
    writes = rank == job.writer_rank
    finish_profile(tracer, ProfileEnd(
        rank=rank, spans=table, loop_start=clock.loop_start, stage=stages[rank],
        kv_cache=kv_cache_use(runner.pool), all_spans=tables if writes else None,
        throughput=throughput(counts, clock.loop_start, clock.loop_end) if writes else {},
        timeline_png=job.out_dir / TIMELINE if writes else None,
    ))
