"""One rank's life under `launch/serve.py`: prepare (no prompts), build the stage, join the
group; the first rank then serves HTTP in a thread of its own while its main thread drives
the ring, and every other rank relays until the first one sends stop.

SIGTERM or SIGINT (torchrun passes both on to every rank): the first rank stops accepting,
ends what is waiting or running with an error event, finishes the steps in flight and sends
stop down the ring; the other ranks keep relaying until that stop arrives, and leave anyway
after `STOP_DEADLINE_S` (a daemon timer: it never holds up a rank that has finished).
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
from typing import Any, Callable, Mapping, Sequence

import torch
import torch.distributed as dist

from ppinfer.errors import ConfigError
from ppinfer.model import PipelineStage
from ppinfer.pipeline.job import Job
from ppinfer.pipeline.launch import run_rank
from ppinfer.pipeline.requests import Requests, TokenCounts
from ppinfer.pipeline.runtime import StageRunner, run_first, run_relay
from ppinfer.pipeline.sinks import SampleSink
from ppinfer.pipeline.transport import Transport
from ppinfer.serving.app import create_app
from ppinfer.serving.http import ConnectionLimits, HttpServer
from ppinfer.serving.metrics import ServerMetrics
from ppinfer.serving.pipeline_engine import PipelineEngine

log = logging.getLogger("ppinfer")

STOP_DEADLINE_S = 4.0
"""After SIGTERM, a relaying rank waits this long for the first rank's stop, then exits."""


def serve(cfg: Any, environ: Mapping[str, str] = os.environ, overrides: Sequence[str] = ()) -> int:
    """The whole rank of the server; returns the process exit code."""
    return run_rank(cfg, environ, overrides, _serve, serve=True, check=_check_listen)


def _check_listen(job: Job) -> None:
    if job.env.rank == 0:
        check_port(job.cfg.server.host, job.cfg.server.port)


def check_port(host: str, port: int) -> None:
    """Fail before loading anything if the first rank cannot listen where it is told to."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"server.host={host} server.port={port}: cannot listen there ({why})") from exc


def _serve(job: Job, stage: PipelineStage, baseline_rss: int) -> None:
    transport = None
    if job.env.world > 1:
        transport = Transport(job.env.rank, job.env.world, job.hparams.n_embd, job.lane_size,
                              job.prefill_chunk, job.dtype, job.device)
    sink = SampleSink() if job.plan.is_last else None
    runner = StageRunner(stage, job.n_lanes, job.lane_size, job.capacity, sink=sink)
    if job.env.world > 1:
        dist.barrier()
    with torch.inference_mode():
        if job.plan.is_first:
            _serve_first(job, runner, transport)
        else:
            assert transport is not None
            _on_stop_signal(_exit_later)
            run_relay(runner, transport)


def _exit_later() -> None:
    """Exit after `STOP_DEADLINE_S` unless the process has ended by then."""
    timer = threading.Timer(STOP_DEADLINE_S, os._exit, (0,))
    timer.daemon = True
    timer.start()


def _serve_first(job: Job, runner: StageRunner, transport: Transport | None) -> None:
    cfg = job.cfg
    engine = PipelineEngine(
        job.model_path.stem, job.tokenizer, job.capacity, job.params[0], cfg.server.max_queue,
        rows=job.n_lanes * job.lane_size, chat_template=cfg.model.chat_template,
        peer_timeout_s=cfg.runtime.timeout_s, stall_timeout_s=cfg.server.stall_timeout_s,
    )
    app = create_app(engine, cfg.server.api_key, ServerMetrics(), cfg.server.max_request_bytes)
    limits = ConnectionLimits(cfg.server.header_timeout_s, cfg.server.max_connections)
    server = HttpServer(app, cfg.server.host, cfg.server.port, limits)

    def stop() -> None:
        server.drain()
        engine.stop()

    _on_stop_signal(stop)
    server.start()
    scheduler = job.scheduler()
    requests = Requests(TokenCounts(), lambda sequence: None)
    engine.started()
    log.info(
        "serving %s on http://%s:%d (%d lane(s) x %d sequences, %d tokens each)",
        engine.model_id, cfg.server.host, cfg.server.port, job.n_lanes, job.lane_size, job.capacity,
    )
    try:
        run_first(runner, scheduler, requests, transport, arrivals=engine)
    except BaseException as exc:
        # Requests in flight end with an error event; the server answers 503 until the
        # process exits (after the failure is reported).
        engine.failed(f"the pipeline stopped ({type(exc).__name__})", requests)
        server.drain()
        raise
    server.stop()
    log.info("server stopped")


def _on_stop_signal(action: Callable[[], None]) -> None:
    """Run `action` once on the first SIGTERM or SIGINT (later ones are ignored)."""
    fired = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if not fired.is_set():
            fired.set()
            action()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
