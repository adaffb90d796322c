"""Where the first rank's sequences come from: the thread-safe door to the ring.

Any thread submits sequences, cancels them, or stops the intake; the first rank's loop
(`run_first`) pulls what arrived between two steps of the ring, and waits here when it has
nothing to do. The pipeline owns queueing, cancellation and keeping the ring alive:

- queueing: a submitted sequence first fills a free row; beyond the free rows at most
  `max_queue` may wait (`QueueFull` beyond);
- cancellation: a waiting sequence leaves the queue at once, a running one ends when its next
  ids arrive;
- pings: while the loop waits with nothing to do, it pings the ring every `ping_s`, so that
  the other ranks' receives never outlive `runtime.timeout_s`;
- `close` (no more sequences: the batch command) ends the loop once everything is done;
  `stop` (a server's shutdown) also ends whatever waits or runs, with an error.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field

from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequence import Sequence
from ppinfer.pipeline.sequences import Sequences

PING_INTERVAL_S = 1.0
"""An idle loop pings the ring this often (or 4 times per `runtime.timeout_s` when shorter)."""

SHUTDOWN = "the server is shutting down"


class QueueFull(Exception):
    """`max_queue` sequences wait for a row already."""


class Unavailable(Exception):
    """The ring is not running yet, is stopping, or has failed."""


@dataclass(frozen=True)
class IntakeStats:
    """A snapshot for monitoring."""

    waiting: int
    running: int
    stage_busy_seconds: tuple[float, ...] = field(default_factory=tuple)
    """Per stage, seconds spent computing since the loop started."""
    uptime_s: float = 0.0
    kv: KVStats = field(default_factory=lambda: KVStats())


@dataclass(frozen=True)
class KVStats:
    """The KV cache pool as the first stage keeps it (every stage's is the same)."""

    blocks_used: int = 0
    blocks_total: int = 0
    prefix_hit_rate: float = 0.0
    """Share of admitted prompt tokens found in cached blocks."""
    preemptions: int = 0
    """Sequences that gave their blocks back mid-answer, to be recomputed (since the start)."""


class Intake:
    def __init__(
        self,
        rows: int,
        max_queue: int | None = None,
        peer_timeout_s: float = float("inf"),
        stall_timeout_s: float = float("inf"),
    ) -> None:
        self.rows = rows  # sequences the lanes hold at once
        self.max_queue = max_queue  # None: no limit (the batch command queues all its prompts)
        self._ping_s = min(PING_INTERVAL_S, peer_timeout_s / 4)
        self._stall_s = stall_timeout_s
        self._lock = threading.Condition()
        self._incoming: deque[Sequence] = deque()
        self._cancels: list[int] = []
        self._waiting = 0  # in the scheduler's queue, not yet in a row
        self._running = 0
        self._busy: tuple[float, ...] = ()
        self._kv = KVStats()
        self._started = time.monotonic()
        self._progress_at = time.monotonic()  # last sampled ids, or when work began
        self._ready = False
        self._closed = False
        self._stopping = False
        self._failure: str | None = None

    # ---- any thread --------------------------------------------------------------------------

    def ready(self) -> bool:
        return self._ready and not self._stopping and self._failure is None

    def failure(self) -> str | None:
        return self._failure

    def submit(self, sequence: Sequence) -> None:
        """Queue a sequence; QueueFull or Unavailable when it cannot be."""
        with self._lock:
            if self._failure is not None or self._stopping or self._closed or not self._ready:
                why = self._failure or (SHUTDOWN if self._stopping or self._closed else "the model is still loading")
                raise Unavailable(why)
            # Only sequences that will not find a free row count as queued.
            queued = len(self._incoming) + self._waiting - (self.rows - self._running)
            if self.max_queue is not None and queued >= self.max_queue:
                raise QueueFull(f"{self.max_queue} requests are waiting already (server.max_queue)")
            self._incoming.append(sequence)
            self._lock.notify()

    def cancel(self, seq: int) -> None:
        """End a sequence (its owner went away); unknown or finished ids are ignored."""
        with self._lock:
            self._cancels.append(seq)
            self._lock.notify()

    def close(self) -> None:
        """No more sequences will come: the loop ends once the ones submitted are done."""
        with self._lock:
            self._closed = True
            self._lock.notify()

    def stop(self) -> None:
        """Stop accepting; sequences still waiting or running end with an error."""
        with self._lock:
            self._stopping = True
            self._lock.notify()

    def stats(self) -> IntakeStats:
        with self._lock:
            waiting = len(self._incoming) + self._waiting
            return IntakeStats(waiting, self._running, self._busy, time.monotonic() - self._started, self._kv)

    def stall(self) -> str | None:
        """Why the ring looks stuck (sequences run, no sampled ids for `stall_timeout_s`)."""
        with self._lock:
            working = self._waiting + self._running > 0
            quiet = time.monotonic() - self._progress_at
        if working and quiet > self._stall_s:
            return f"no sampled token has come back for {quiet:.0f} s while sequences run"
        return None

    # ---- the first rank's loop ---------------------------------------------------------------

    def start(self) -> None:
        """The ring runs: submissions are accepted from now on."""
        with self._lock:
            self._ready = True
            self._started = time.monotonic()

    def pull(self, scheduler: Scheduler, sequences: Sequences) -> None:
        """Hand what arrived to the scheduler and apply cancellations (never blocks)."""
        with self._lock:
            arrived, self._incoming = list(self._incoming), deque()
            cancels, self._cancels = self._cancels, []
            stopping = self._stopping
        for sequence in arrived:
            scheduler.add(sequences.add(sequence))
        if stopping:
            cancels = sequences.live()
        for seq in cancels:
            if sequences.cancel(seq, SHUTDOWN if stopping else None) is not None and scheduler.withdraw(seq):
                sequences.drop(seq)
        with self._lock:
            if self._waiting + self._running == 0:
                self._progress_at = time.monotonic()  # work starts now
            self._waiting, self._running = scheduler.waiting, scheduler.running

    def wait(self, scheduler: Scheduler, ping: Callable[[], None] | None) -> bool:
        """Nothing to do now: block until something arrives, pinging the ring while it waits;
        False when the loop should end (closed or stopping, and nothing left)."""
        with self._lock:
            if (self._stopping or self._closed) and not self._incoming and scheduler.idle():
                return False
            idle = not self._incoming and not self._cancels and not self._stopping
            if idle and not self._lock.wait(self._ping_s) and ping is not None:
                    ping()
        return True

    def progress(self, stages: tuple[float, ...], kv: KVStats | None = None) -> None:
        """Sampled ids arrived; `stages` are every stage's busy seconds as they report them,
        `kv` the KV pool's use."""
        with self._lock:
            self._busy = stages
            if kv is not None:
                self._kv = kv
            self._progress_at = time.monotonic()

    def fail(self, why: str, sequences: Sequences) -> None:
        """The ring stopped under the sequences: every one ends with an error, and nothing
        more is accepted."""
        with self._lock:
            self._failure = why
            pending = list(self._incoming)
            self._incoming.clear()
        for sequence in pending:
            sequences.add(sequence)
        sequences.fail_all(why)
