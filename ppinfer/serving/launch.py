"""The server (`launch/serve.py`): the rank body of the batch command with an HTTP front. The
first rank serves HTTP in a thread of its own while its main thread drives the ring, and
every other rank relays until the first one sends stop.

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
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from ppinfer.errors import ConfigError
from ppinfer.pipeline.intake import Intake
from ppinfer.pipeline.job import Job
from ppinfer.pipeline.rank import run_rank
from ppinfer.serving.app import create_app
from ppinfer.serving.http import ConnectionLimits, HttpServer
from ppinfer.serving.metrics import ServerMetrics
from ppinfer.serving.pipeline_engine import PipelineEngine

log = logging.getLogger("ppinfer")

STOP_DEADLINE_S = 4.0
"""After SIGTERM, a relaying rank waits this long for the first rank's stop, then exits."""


def serve(cfg: Any, environ: Mapping[str, str] = os.environ, overrides: Sequence[str] = ()) -> int:
    """The whole rank of the server; returns the process exit code."""
    return run_rank(cfg, environ, overrides, HttpFront())


class HttpFront:
    serve = True

    def __init__(self) -> None:
        self._server: HttpServer | None = None

    def check(self, job: Job) -> None:
        if job.env.rank == 0:
            check_port(job.cfg.server.host, job.cfg.server.port)

    def open(self, job: Job, intake: Intake) -> None:
        """The first rank starts HTTP over the intake; every rank learns to stop."""
        if not job.plan.is_first:
            _on_stop_signal(_exit_later)
            return
        cfg = job.cfg
        engine = PipelineEngine(
            job.model_path.stem, job.tokenizer, job.capacity, job.params[0], intake,
            chat_template=cfg.model.chat_template,
        )
        app = create_app(engine, cfg.server.api_key, ServerMetrics(), cfg.server.max_request_bytes)
        limits = ConnectionLimits(cfg.server.header_timeout_s, cfg.server.max_connections)
        server = self._server = HttpServer(app, cfg.server.host, cfg.server.port, limits)

        def stop() -> None:
            server.drain()
            intake.stop()

        _on_stop_signal(stop)
        server.start()
        log.info(
            "serving %s on http://%s:%d (%d lane(s) x %d sequences, %d tokens each)",
            engine.model_id, cfg.server.host, cfg.server.port, job.n_lanes, job.lane_size, job.capacity,
        )

    def failed(self, why: str) -> None:
        """Requests in flight have ended with an error event; the server answers 503 until
        the process exits (after the failure is reported)."""
        if self._server is not None:
            self._server.drain()

    def close(self) -> None:
        if self._server is not None:
            self._server.stop()
            log.info("server stopped")


def check_port(host: str, port: int) -> None:
    """Fail before loading anything if the first rank cannot listen where it is told to."""
    try:
        with socket.create_server((host, port)):
            pass
    except OSError as exc:
        why = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ConfigError(f"server.host={host} server.port={port}: cannot listen there ({why})") from exc


def _exit_later() -> None:
    """Exit after `STOP_DEADLINE_S` unless the process has ended by then."""
    timer = threading.Timer(STOP_DEADLINE_S, os._exit, (0,))
    timer.daemon = True
    timer.start()


def _on_stop_signal(action: Callable[[], None]) -> None:
    """Run `action` once on the first SIGTERM or SIGINT (later ones are ignored)."""
    fired = threading.Event()

    def handler(signum: int, frame: Any) -> None:
        if not fired.is_set():
            fired.set()
            action()

    signal.signal(signal.SIGTERM, handler)
    signal.signal(signal.SIGINT, handler)
