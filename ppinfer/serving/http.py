"""Runs an app of `create_app` under uvicorn in a background thread.

`start` returns once the socket listens (an OSError there if it cannot bind). `drain` (any
thread, e.g. a signal handler) makes every new request a 503 and /health report "draining".
`stop` drains, gives the requests in flight part of its bound to end on their own, ends the
rest with an error event, then stops uvicorn, and returns within the bound.

Connections are guarded (`ConnectionLimits`): one whose request headers have not all arrived
within `header_timeout_s` of opening (or of its previous response) is closed, so idle and
slow clients cannot pile up sockets; beyond `max_connections` open at once, a new one is
closed as it opens (and uvicorn answers requests beyond that many tasks with 503).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
import time
from dataclasses import dataclass

import h11
import uvicorn
from fastapi import FastAPI
from uvicorn.protocols.http.h11_impl import H11Protocol

from ppinfer.serving.bridge import SHUTDOWN, LiveRequests

log = logging.getLogger("ppinfer")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 3.0
POLL_S = 0.01


@dataclass(frozen=True)
class ConnectionLimits:
    header_timeout_s: float = 10.0
    max_connections: int = 1000


def guarded_protocol(limits: ConnectionLimits) -> type[H11Protocol]:
    """uvicorn's h11 protocol with `limits` applied (see the module's docstring)."""

    class GuardedH11(H11Protocol):
        _header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > limits.max_connections:
                transport.close()
                return
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm()

        def _arm(self) -> None:
            self._disarm()
            self._header_timer = self.loop.call_later(limits.header_timeout_s, self._headers_overdue)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_overdue(self) -> None:
            self._header_timer = None
            if self.conn.their_state is h11.IDLE and (self.cycle is None or self.cycle.response_complete):
                self.transport.close()

    return GuardedH11


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int, limits: ConnectionLimits = ConnectionLimits()) -> None:
        self._live: LiveRequests = app.state.live
        self._host, self._port = host, port
        # uvicorn's warnings are about clients (malformed requests, the concurrency limit):
        # a hostile client could fill the log with them.
        config = uvicorn.Config(
            app, log_config=None, log_level="error", access_log=False, lifespan="off",
            http=guarded_protocol(limits), limit_concurrency=limits.max_connections,
        )
        self._server = uvicorn.Server(config)
        self._thread: threading.Thread | None = None

    @property
    def port(self) -> int:
        """The port it listens on (the one the OS chose when created with port 0)."""
        return self._port

    @property
    def draining(self) -> bool:
        return self._live.draining

    def start(self, timeout_s: float = START_TIMEOUT_S) -> None:
        family = socket.AF_INET6 if ":" in self._host else socket.AF_INET
        sock = socket.create_server((self._host, self._port), family=family)
        self._port = sock.getsockname()[1]
        self._thread = threading.Thread(target=self._server.run, kwargs={"sockets": [sock]},
                                        name="ppinfer-http", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"the HTTP server did not start on {self._host}:{self._port}")
            time.sleep(POLL_S)

    def drain(self) -> None:
        """From now on new requests get 503; the ones in flight go on."""
        self._live.drain()

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> None:
        """Drain; after half of `timeout_s` end what is still in flight with an error event;
        then stop listening and close every connection, forcibly in the last quarter."""
        deadline = time.monotonic() + timeout_s
        self.drain()
        if self._thread is None:
            return
        if not self._live.wait_idle(timeout_s / 2):
            self._live.abort_all(SHUTDOWN)
        self._server.should_exit = True
        self._thread.join(max(0.0, deadline - timeout_s / 4 - time.monotonic()))
        if self._thread.is_alive():
            self._server.force_exit = True
            self._thread.join(max(0.0, deadline - time.monotonic()))
        if self._thread.is_alive():
            log.warning("the HTTP server did not stop within %.1f s", timeout_s)
