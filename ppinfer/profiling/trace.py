"""Named ranges around the runtime's phases (embed, layers, lm_head, send, recv, sample,
wait). `NULL_TRACER` costs nothing; a profiling tracer records them for TensorBoard."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext
from typing import Protocol

RANGES = ("embed", "layers", "lm_head", "send", "recv", "sample", "wait")


class Tracer(Protocol):
    """What the runtime calls; implementations must not change behaviour."""

    def range(self, name: str) -> AbstractContextManager[object]:
        """A named range around one phase of one work item (name from `RANGES`)."""

    def step(self) -> None:
        """Called once after every work item this rank computes."""


class NullTracer:
    """Profiling off."""

    _null = nullcontext()

    def range(self, name: str) -> AbstractContextManager[object]:
        return self._null

    def step(self) -> None:
        return None


NULL_TRACER = NullTracer()
