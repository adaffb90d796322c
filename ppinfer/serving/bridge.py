"""From the engine's thread to the event loop: one request's events (`RequestEvents`), and
the requests in flight, which a shutdown drains (`LiveRequests`)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable

from ppinfer.pipeline.intake import SHUTDOWN
from ppinfer.pipeline.sequence import Emit, Event, Finished

Observer = Callable[[Event, float], None]
"""Sees every event the engine emits, with its arrival time (time.monotonic), on the engine's thread."""


class RequestEvents:
    """The events of one request's choices (one sequence each): each choice's `emitter`,
    called from the engine's thread, queues `(choice, event)` on the request handler's event
    loop; the handler reads them with `next`. An `abort` queues `(None, an error)`."""

    def __init__(self, loop: asyncio.AbstractEventLoop, observers: list[Observer]) -> None:
        self.request_ids: dict[int, int] = {}
        """Choice -> the engine's id of its sequence."""
        self._loop, self._observers = loop, observers
        self._queue: asyncio.Queue[tuple[int | None, Event]] = asyncio.Queue()
        self._lock = threading.Lock()
        self._closed = False
        self._running = set(range(len(observers)))

    @property
    def engine_done(self) -> bool:
        """The engine emitted every choice's Finished: nothing left to cancel."""
        return not self._running

    def running(self) -> list[int]:
        """The engine's ids of the choices it has not finished."""
        with self._lock:
            return [self.request_ids[c] for c in self._running if c in self.request_ids]

    def emitter(self, choice: int) -> Emit:
        """The engine's callback for `choice` (any thread). Events after `close` are observed,
        not queued."""
        observe = self._observers[choice]

        def emit(event: Event) -> None:
            observe(event, time.monotonic())
            if isinstance(event, Finished):
                with self._lock:
                    self._running.discard(choice)
            self._put(choice, event)

        return emit

    def abort(self, why: str) -> None:
        """End the request now with an error event (any thread); the engine's later events are dropped."""
        self._put(None, Finished("error", "", 0, 0, why))

    async def next(self) -> tuple[int | None, Event]:
        return await self._queue.get()

    def close(self) -> None:
        """The handler reads no more: later events are not queued (its loop may be gone)."""
        with self._lock:
            self._closed = True

    def _put(self, choice: int | None, event: Event) -> None:
        with self._lock:
            if not self._closed:
                self._loop.call_soon_threadsafe(self._queue.put_nowait, (choice, event))


class LiveRequests:
    """The requests being answered; once `drain` is called no new one is admitted."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._live: set[RequestEvents] = set()
        self._draining = False

    @property
    def draining(self) -> bool:
        return self._draining

    def drain(self) -> None:
        with self._lock:
            self._draining = True

    def add(self, events: RequestEvents) -> bool:
        """Admit a request; False once draining."""
        with self._lock:
            if self._draining:
                return False
            self._live.add(events)
            return True

    def remove(self, events: RequestEvents) -> None:
        with self._lock:
            self._live.discard(events)
            self._lock.notify_all()

    def wait_idle(self, timeout_s: float) -> bool:
        """Wait until no request is in flight; False if some still are after `timeout_s`."""
        with self._lock:
            return self._lock.wait_for(lambda: not self._live, timeout_s)

    def abort_all(self, why: str = SHUTDOWN) -> None:
        """End every request in flight with an error event (their handlers then cancel them
        in the engine)."""
        with self._lock:
            live = list(self._live)
        for events in live:
            events.abort(why)
