"""One rank's life, the same for the batch command and the server: prepare (no process
group), build the stage, join the group, claim `output.dir` (the writing rank), run the loop,
gather metrics, write metrics.json and the profile.

What differs between the entry points is a `Front`: where the first rank's sequences come
from (a list of prompts, or HTTP requests) and what happens around the loop. Every other key
(`profile=tensorboard` included) means the same in both.
"""

from __future__ import annotations

import datetime
import gc
import logging
import sys
import time
from collections.abc import Mapping
from collections.abc import Sequence as Seq
from typing import Any, Protocol

import torch
import torch.distributed as dist

from ppinfer.errors import PPInferError
from ppinfer.model import PipelineStage, build_stage
from ppinfer.pipeline.failures import (
    FoundElsewhere,
    describe_bug,
    is_peer_failure,
    report_bad_input,
    report_peer_failure,
    report_run_error,
)
from ppinfer.pipeline.intake import Intake
from ppinfer.pipeline.job import DistEnv, Job, prepare
from ppinfer.pipeline.loaded import log_loaded_stages
from ppinfer.pipeline.outputs import (
    LOGITS,
    METRICS,
    OutputDir,
    OutputDirError,
    write_json_atomic,
    write_logits,
    writing,
)
from ppinfer.pipeline.profile import end_profile, tracer_for
from ppinfer.pipeline.runtime import StageClock, StageRunner, run_first, run_relay
from ppinfer.pipeline.sequences import Sequences, TokenCounts
from ppinfer.pipeline.simulate import run_order, shaped, simulate, stage_actions
from ppinfer.pipeline.sinks import SampleSink, ScoreSink, Sink, grammar_vocab
from ppinfer.pipeline.transport import Transport
from ppinfer.profiling.metrics import StageMetrics, current_rss_bytes, peak_rss_bytes
from ppinfer.profiling.trace import Tracer

log = logging.getLogger("ppinfer")


class Front(Protocol):
    """What an entry point adds to the rank body."""

    serve: bool
    """Sequences arrive while the loop runs (no prompts to prepare)."""

    def check(self, job: Job) -> None:
        """Before anything is loaded (the server: can it listen where it is told to?)."""

    def open(self, job: Job, intake: Intake) -> None:
        """Before the loop, on every rank; the first rank feeds `intake` (or opens it to
        clients) and closes or stops it when no more sequences will come."""

    def failed(self, why: str) -> None:
        """The first rank's loop stopped with an error (the sequences have been told)."""

    def close(self) -> None:
        """After the loop, on every rank."""


def setup_logging(env: DistEnv) -> None:
    """One handler on stderr, prefixed with the rank; only rank 0 and the last rank speak at
    INFO level so the console is not repeated S times."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"[ppinfer rank {env.rank}] %(message)s"))
    log.handlers[:] = [handler]
    log.propagate = False
    log.setLevel(logging.INFO if env.rank in (0, env.world - 1) else logging.WARNING)


def run_rank(cfg: Any, environ: Mapping[str, str], overrides: Seq[str], front: Front) -> int:
    """One rank's life: prepare and check the job, build the stage, join the group, run the
    job, and report any failure the one way each kind is reported (see
    `ppinfer.pipeline.failures`); returns the process exit code."""
    env = DistEnv.from_environ(dict(environ))
    setup_logging(env)
    baseline_rss = current_rss_bytes()
    family_given = cfg.model.path is None or any(o.startswith("model.family=") for o in overrides)
    try:
        job = prepare(cfg, env, torch.cuda.is_available(), family_given, serve=front.serve)
        front.check(job)
        torch.set_num_threads(job.threads)
        stage = build_stage(job.model_path, job.plan, job.dtype, job.device, weights=job.cfg.runtime.weights)
    except PPInferError as exc:
        return report_bad_input(env, str(exc), environ)
    try:
        if env.world > 1:
            _init_process_group(job)
        log_loaded_stages(job, stage, baseline_rss)
        execute(job, stage, baseline_rss, front)
    except PPInferError as exc:  # output.dir refused or failing, found by the writing rank
        return report_run_error(exc, environ)
    except Exception as exc:
        if is_peer_failure(exc):
            return report_peer_failure(env, exc, environ)
        describe_bug(exc, environ)
        raise
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    return 0


def execute(job: Job, stage: PipelineStage, baseline_rss: int, front: Front) -> None:
    """This rank's part of the job (the process group, if any, is initialised), holding
    `output.dir` on the writing rank."""
    claimed = claim_output_dir(job)
    try:
        _execute(job, stage, baseline_rss, front)
    finally:
        if claimed is not None:
            claimed.release()


def _execute(job: Job, stage: PipelineStage, baseline_rss: int, front: Front) -> None:
    plan = job.plan
    tracer = tracer_for(job)
    transport = None
    if job.env.world > 1:
        transport = Transport(job.env.rank, job.env.world, job.hparams.n_embd, job.lane_size,
                              job.prefill_chunk, job.dtype, job.device, tracer=tracer)
    sink = _make_sink(job, tracer) if plan.is_last else None
    runner = StageRunner(
        stage, job.n_lanes, job.lane_size, job.capacity, job.kv_tokens, job.kv_dtype, sink=sink, tracer=tracer
    )
    cfg = job.cfg
    intake = Intake(
        rows=job.n_lanes * job.lane_size, max_queue=cfg.server.max_queue if front.serve else None,
        peer_timeout_s=cfg.runtime.timeout_s, stall_timeout_s=cfg.server.stall_timeout_s,
    )
    sequences = Sequences()
    if job.env.world > 1:
        dist.barrier()
    if plan.is_first:
        intake.start()
    front.open(job, intake)
    gc.collect()
    gc.freeze()  # everything allocated so far lives for the whole run: keep it out of GC scans
    with torch.inference_mode():
        if plan.is_first:
            sequences.counts.last_done = time.perf_counter()
            try:
                run_first(runner, job.scheduler(), sequences, transport, intake)
            except BaseException as exc:
                intake.fail(f"the pipeline stopped ({type(exc).__name__})", sequences)
                front.failed(str(exc))
                raise
        else:
            assert transport is not None
            run_relay(runner, transport)
    front.close()
    _finish(job, runner, transport, sequences.counts if plan.is_first else None, baseline_rss, tracer)


def _finish(
    job: Job, runner: StageRunner, transport: Transport | None, counts: TokenCounts | None, baseline_rss: int,
    tracer: Tracer,
) -> None:
    """Gather every rank's figures; the writing rank writes metrics.json (and, scoring,
    logits.npy); every rank ends its profile."""
    clock = runner.clock
    comm_s = transport.comm_s if transport is not None else 0.0
    cuda_peak = torch.cuda.max_memory_allocated(job.device) if job.device.type == "cuda" else 0
    mine = StageMetrics(
        compute_s=clock.compute_s, comm_s=comm_s, idle_s=max(clock.wall_s - clock.compute_s - comm_s, 0.0),
        wall_s=clock.wall_s, peak_rss_bytes=peak_rss_bytes(), peak_cuda_bytes=cuda_peak,
        baseline_rss_bytes=baseline_rss, decode_idle_fraction=clock.decode_idle_fraction(),
    )
    stages = _gather(job, mine)
    counts = _gathered_counts(job, counts)
    end_profile(tracer, job, runner, stages, counts)
    if job.env.rank != job.writer_rank:
        return
    extra: dict[str, Any] = {}
    if isinstance(runner.sink, ScoreSink):
        with writing(job.out_dir, LOGITS):
            write_logits(job.out_dir, runner.sink.logits().numpy())
        extra = runner.sink.perplexity()
    metrics = _metrics(job, stages, counts, clock, extra)
    with writing(job.out_dir, METRICS):
        write_json_atomic(job.out_dir / METRICS, metrics)
    if job.is_score:
        log.info(
            "done: scored %d tokens (%s), %.1f tok/s, wall %.2f s -> %s",
            metrics["scored_tokens"], score_summary(metrics),
            metrics["prefill_tokens_per_s"], metrics["wall_s"], job.out_dir,
        )
    else:
        log.info(
            "done: %d tokens generated, prefill %.1f tok/s, decode %.1f tok/s, wall %.2f s -> %s",
            metrics["generated_tokens"], metrics["prefill_tokens_per_s"], metrics["decode_tokens_per_s"],
            metrics["wall_s"], job.out_dir,
        )


def _make_sink(job: Job, tracer: Tracer) -> Sink:
    if job.is_score:
        return ScoreSink(job.prompts[0], tracer=tracer)
    return SampleSink(tracer=tracer, grammar=lambda: grammar_vocab(job.tokenizer))


def _init_process_group(job: Job) -> None:
    backend = "nccl" if job.device.type == "cuda" else "gloo"
    if job.device.type == "cuda":
        torch.cuda.set_device(job.device)
    dist.init_process_group(
        backend=backend,
        timeout=datetime.timedelta(seconds=job.cfg.runtime.timeout_s),
        device_id=job.device if backend == "nccl" else None,
    )


def _gather(job: Job, mine: StageMetrics) -> list[StageMetrics]:
    if job.env.world == 1:
        return [mine]
    comm_device = job.device if job.device.type == "cuda" else torch.device("cpu")
    local = mine.to_tensor(comm_device)
    parts = [torch.empty_like(local) for _ in range(job.env.world)]
    dist.all_gather(parts, local)
    return [StageMetrics.from_tensor(p.cpu()) for p in parts]


def _gathered_counts(job: Job, mine: TokenCounts | None) -> TokenCounts:
    """The first rank's token counts, on every rank (the writer may be the last)."""
    if job.env.world == 1 or job.writer_rank == 0:
        return mine if mine is not None else TokenCounts()
    box = [mine]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def simulated_bubble(job: Job, sampled: dict[int, int]) -> float:
    """The largest per-stage idle fraction of this run's exact order of work items if every
    item cost the same: what the schedule alone costs, to compare with the measured bubble."""
    budgets = [0 if job.is_score else p.max_new_tokens for p in job.params]
    order = list(run_order(
        job.scheduler(), [shaped(i, len(ids), b) for i, (ids, b) in enumerate(zip(job.prompts, budgets))],
        lambda seq: sampled.get(seq, 1),
    ))
    timeline = simulate(stage_actions(order, job.env.world), lambda stage, item: 1.0)
    return max(timeline.bubble_fraction(s) for s in range(job.env.world))


def _metrics(
    job: Job, stages: list[StageMetrics], counts: TokenCounts, clock: StageClock, extra: dict[str, Any]
) -> dict[str, Any]:
    starts = [sum(job.layers[:s]) for s in range(len(job.layers))]
    metrics = {
        "task": job.cfg.task,
        "model": str(job.model_path),
        "architecture": job.hparams.arch,
        "device": str(job.device),
        "dtype": str(job.dtype).removeprefix("torch."),
        "threads_per_rank": job.threads,
        "stages": job.env.world,
        "layers": job.layers,
        "microbatches": job.n_lanes,
        "lane_size": job.lane_size,
        "sequences": counts.sequences,
        "prompt_tokens": counts.prompt_tokens,
        "generated_tokens": counts.generated_tokens + counts.first_tokens,
        "prefill_tokens_per_s": counts.prompt_tokens / counts.prefill_s if counts.prefill_s else 0.0,
        "decode_tokens_per_s": counts.generated_tokens / counts.decode_s if counts.decode_s else 0.0,
        "time_to_first_token_s": (counts.first_token_at or clock.loop_end) - clock.loop_start,
        "prefix_cache_hit_rate": counts.cached_tokens / counts.looked_up_tokens if counts.looked_up_tokens else 0.0,
        "preemptions": counts.preemptions,
        "wall_s": max(s.wall_s for s in stages),
        "per_stage": [
            s.as_dict(i, (starts[i], starts[i] + job.layers[i])) for i, s in enumerate(stages)
        ],
        **extra,
    }
    if job.prompts:  # a batch knows all its sequences: what the schedule alone would cost
        metrics["theoretical_bubble_fraction"] = simulated_bubble(job, counts.sampled)
    return metrics


def claim_output_dir(job: Job) -> OutputDir | None:
    """The rank that writes the outputs (`Job.writer_rank`) claims `output.dir` before
    anything is written (`OutputDir.claim`); every rank learns whether it could, so that a
    refused run ends everywhere at once: `OutputDirError` on that rank, `FoundElsewhere` on
    the others. A collective: every rank calls it."""
    claimed, error = None, None
    if job.env.rank == job.writer_rank:
        try:
            claimed = OutputDir.claim(job.out_dir)
        except OutputDirError as exc:
            error = exc
    problem = str(error) if error is not None else None
    if job.env.world > 1:
        verdict = [problem]
        dist.broadcast_object_list(verdict, src=job.writer_rank)
        problem = verdict[0]
    if error is not None:
        raise error
    if problem is not None:
        raise FoundElsewhere(problem)
    return claimed


def score_summary(metrics: dict[str, Any]) -> str:
    """How well the model predicted the scored tokens, for the console."""
    perplexity = metrics.get("perplexity")
    if perplexity is None:  # no token has a predecessor to be predicted from
        return "perplexity n/a: needs at least 2 tokens"
    return f"perplexity {perplexity:.3f}"
