"""What the HTTP layer needs from the pipeline: submit a tokenized prompt with its
generation parameters, receive its tokens as events, cancel it, read the engine's state.

The pipeline's first rank implements `Engine` (`ppinfer.serving.pipeline_engine`); tests of
the HTTP layer may use any object with the same methods. Events are delivered by calling the
`emit` callback given to `submit` from the engine's own thread, in order, ending with exactly
one `Finished`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Protocol

from ppinfer.generation.params import GenerationParams
from ppinfer.pipeline.events import Emit, Event, Finished, FinishReason, TokenDelta

__all__ = [
    "Emit", "Engine", "EngineFull", "EngineStats", "EngineUnavailable", "Event", "Finished", "FinishReason",
    "PromptTooLong", "TokenDelta",
]

class PromptTooLong(ValueError):
    """The prompt cannot fit the context, found before it is tokenized (HTTP 400)."""


class EngineFull(Exception):
    """The waiting queue holds `server.max_queue` requests already (HTTP 503)."""


class EngineUnavailable(Exception):
    """The engine is not loaded yet, is shutting down, or has failed (HTTP 503)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot for /metrics."""

    waiting: int
    running: int
    stage_busy_seconds: tuple[float, ...] = field(default_factory=tuple)
    """Per stage, seconds spent computing since the engine started."""
    uptime_s: float = 0.0


class Engine(Protocol):
    model_id: str
    context_length: int
    """Tokens one sequence may hold: prompt plus generated."""
    defaults: GenerationParams
    """The server's `generation.*` config: what a request does not set."""

    def ready(self) -> bool:
        """True once every stage is loaded and the pipeline loop runs."""

    def failure(self) -> str | None:
        """Why the engine stopped for good (a rank died), or None."""

    def stall(self) -> str | None:
        """Why the engine looks stuck (work in flight, no progress for a while), or None."""

    def encode_prompt(self, text: str) -> list[int]:
        """Token ids of a plain completion prompt (BOS as the file says); PromptTooLong when
        it cannot fit the context, ValueError when it cannot be tokenized."""

    def encode_chat(self, messages: list[dict[str, str]]) -> list[int]:
        """Token ids of a chat rendered with the model's template; PromptTooLong, or
        ValueError on bad messages."""

    def submit(self, prompt_ids: list[int], params: GenerationParams, emit: Emit) -> int:
        """Queue a request; returns its id. Raises ValueError (prompt plus max_new_tokens
        beyond `context_length`, empty prompt), EngineFull or EngineUnavailable."""

    def cancel(self, request_id: int) -> None:
        """Stop a request (its client went away); its slot is freed at the next step and
        it ends with Finished(reason="cancelled"). Unknown or finished ids are ignored."""

    def stats(self) -> EngineStats:
        """Queue length, running sequences, per-stage busy time."""
