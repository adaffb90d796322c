"""What the owner of a sequence hears while it runs (a server's client): its text as it
becomes final, then one `Finished`. Events are delivered by calling the sequence's `emit`
from the first rank's loop, in order."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

FinishReason = Literal["stop", "length", "cancelled", "error"]


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of a request and the text they add. `text` never ends inside a UTF-8
    character or a possible beginning of a stop string (that text comes later or never)."""

    text: str
    token_ids: tuple[int, ...]


@dataclass(frozen=True)
class Finished:
    """The request's end: the text not yet sent in deltas, why it ended, and its usage."""

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    """For reason "error": what went wrong (a rank died, the server shuts down)."""


Event = TokenDelta | Finished
Emit = Callable[[Event], None]
