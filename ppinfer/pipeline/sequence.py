"""A sequence: one prompt to continue (or to score), its settings, its life and what its owner
hears. The first rank owns every sequence; the scheduler, the results writer and the server
read the same object.

Life (`Status`): WAITING (queued) -> PREFILLING (in a row, its prompt going through the
stages) -> DECODING (its first token sampled) -> FINISHED (`finish_reason` says why). A
sequence may finish from any state: a cancel ends a waiting one at once, and a running one
when its next ids arrive (its row is in flight until then). A preempted sequence (the KV pool
ran dry) goes from DECODING back to WAITING, first in line, and is prefilled again with its
prompt and the tokens it has generated (`context_len`).

Events (`emit`): the text as it becomes final (`TokenDelta`), then one `Finished`, delivered
from the first rank's loop, in order.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum

from ppinfer.sampling.logprobs import RowLogprobs, TokenLogprob
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.stopping import FinishReason, StopState


class Status(Enum):
    WAITING = "waiting"
    PREFILLING = "prefilling"
    DECODING = "decoding"
    FINISHED = "finished"


@dataclass(frozen=True)
class TokenDelta:
    """New tokens of a sequence and the text they add. `text` never ends inside a UTF-8
    character or a possible beginning of a stop string (that text comes later or never)."""

    text: str
    token_ids: tuple[int, ...]
    logprobs: tuple[TokenLogprob, ...] = ()
    """One entry per token id when the sequence asked for log-probabilities."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """The prompt's, when asked for, with the sequence's first event (None for its first token)."""


@dataclass(frozen=True)
class Finished:
    """The sequence's end: the text not yet sent in deltas, why it ended, and its usage.
    `completion_tokens` and `token_ids` leave out an end-of-generation token that ended it."""

    reason: FinishReason
    text: str
    prompt_tokens: int
    completion_tokens: int
    error: str | None = None
    """For reason "error": what went wrong (a rank died, the server shuts down)."""
    token_ids: tuple[int, ...] = ()
    """The token ids not yet sent in deltas."""
    logprobs: tuple[TokenLogprob, ...] = ()
    """Their log-probabilities, when asked for."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None
    """The prompt's, when asked for and no delta carried them (None for its first token)."""


Event = TokenDelta | Finished
Emit = Callable[[Event], None]


@dataclass(eq=False)
class Sequence:
    """One prompt to continue (`output` records what it generates) or to score (`scored`)."""

    id: int
    prompt: list[int]
    params: GenerationParams
    stream_seed: int
    """Seed of its random stream (see `ppinfer.sampling.sampler.stream_seed`)."""
    output: StopState | None = None
    """Generated tokens, text and stop conditions; None for a scored or simulated sequence."""
    scored: bool = False
    """Prefill only: the last stage keeps every position's logits, nothing is sampled."""
    text: str = ""
    """The prompt as given (for results.jsonl)."""
    emit: Emit | None = None
    status: Status = Status.WAITING
    finish_reason: FinishReason | None = None
    error: str | None = None
    ending: tuple[FinishReason, str | None] | None = field(default=None, repr=False)
    """Set by `cancel`: how the sequence ends when its next ids arrive."""
    logprobs: list[TokenLogprob] = field(default_factory=list, repr=False)
    """Log-probabilities of its generated tokens (when its settings ask for them)."""
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = field(default=None, repr=False)
    emitted: int = field(default=0, repr=False)
    """Generated token ids told to the owner so far."""
    prompt_told: bool = field(default=False, repr=False)

    @property
    def prompt_len(self) -> int:
        return len(self.prompt)

    @property
    def budget(self) -> int:
        """Tokens it may generate (0 when scored)."""
        return 0 if self.scored else self.params.max_new_tokens

    @property
    def generated(self) -> int:
        """Tokens it has generated so far."""
        return len(self.output.token_ids) if self.output is not None else 0

    @property
    def context_len(self) -> int:
        """Tokens a row must be fed to continue it: the prompt, and after a preemption the
        tokens generated so far too (recomputed, not kept)."""
        return self.prompt_len + self.generated

    @property
    def remaining(self) -> int:
        """Tokens it may still generate."""
        return self.budget - self.generated

    @property
    def preemptable(self) -> bool:
        """Whether it may give its KV blocks back mid-answer and be recomputed later with the
        same tokens: every generated sequence. The last stage rebuilds what it keeps per
        sequence from the admission of the recompute, which carries the tokens generated so
        far: the random stream's position (one draw per sampled token), the penalty counts, the
        grammar matcher's state (it consumes them again) and the repetition history (every
        token fed)."""
        return not self.scored

    @property
    def finished(self) -> bool:
        return self.status is Status.FINISHED

    def token_at(self, position: int) -> int:
        """The token fed at rope `position`: the prompt's, then the generated ones."""
        if position < len(self.prompt):
            return self.prompt[position]
        assert self.output is not None
        return self.output.token_ids[position - len(self.prompt)]

    def cancel(self, error: str | None = None) -> None:
        """End it ("cancelled", or "error" with `error`) when its next ids arrive."""
        if self.ending is None:
            self.ending = ("error", error) if error else ("cancelled", None)

    def record(self, logprobs: RowLogprobs) -> None:
        """Keep what the last stage reported with the next sampled token."""
        if logprobs.prompt:
            self.prompt_logprobs = logprobs.prompt
        if logprobs.token is not None:
            self.logprobs.append(logprobs.token)

    def stream(self) -> None:
        """Tell the owner the text that became final."""
        if self.emit is not None and self.output is not None:
            text, ids = self.output.stable_text()
            if text:
                self.emit(TokenDelta(text, ids, self._logprobs_of(ids), self._take_prompt_logprobs()))

    def _take_prompt_logprobs(self) -> tuple[TokenLogprob | None, ...] | None:
        """The prompt's log-probabilities, handed out once."""
        if self.prompt_told:
            return None
        self.prompt_told = self.prompt_logprobs is not None
        return self.prompt_logprobs

    def _logprobs_of(self, ids: tuple[int, ...]) -> tuple[TokenLogprob, ...]:
        """The entries of the next `ids` told to the owner."""
        start, self.emitted = self.emitted, self.emitted + len(ids)
        return tuple(self.logprobs[start:self.emitted])

    def finish(self, reason: FinishReason, error: str | None = None) -> None:
        """End it and tell the owner: the rest of its text and its usage (an end-of-generation
        token that ended it is not part of the answer: neither counted nor reported)."""
        self.status, self.finish_reason, self.error = Status.FINISHED, reason, error
        if self.emit is None:
            return
        rest, ids, generated = "", (), 0
        output = self.output
        if output is not None:
            if reason in ("stop", "length"):
                rest = output.stable_text()[0]
                ids = tuple(output.token_ids[self.emitted:])
            generated = len(output.token_ids)
            if isinstance(output.stop_reason, int):  # an end-of-generation id ended it
                generated -= 1
                ids = ids[:-1]
        self.emit(Finished(reason, rest, len(self.prompt), generated, error, ids, self._logprobs_of(ids),
                           self._take_prompt_logprobs()))
