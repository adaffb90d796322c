"""Runs an app of `create_app` under uvicorn in a background thread.

`start` returns once the socket listens (an OSError there if it cannot bind). `drain` (any
thread, e.g. a signal handler) makes every new request a 503 and /health report "draining".
`stop` drains, gives the requests in flight part of its bound to end on their own, ends the
rest with an error event, then stops uvicorn, and returns within the bound.
"""

from __future__ import annotations

import logging
import socket
import threading
import time

import uvicorn
from fastapi import FastAPI

from ppinfer.serving.bridge import SHUTDOWN, LiveRequests

log = logging.getLogger("ppinfer")

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
POLL_S = 0.01


class HttpServer:
    def __init__(self, app: FastAPI, host: str, port: int) -> None:
        self._live: LiveRequests = app.state.live
        self._host, self._port = host, port
        config = uvicorn.Config(app, log_config=None, log_level="warning", access_log=False, lifespan="off")
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
