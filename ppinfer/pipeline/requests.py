"""The first rank's sequences: their prompts and settings, what they have generated, when
they stop, and what their owner hears (a results line, or a server's stream of events).

The scheduler only places sequences in rows; this file decides what each row is fed, which
settings the last stage samples it with, and whether the ids that come back end it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable

import torch

from ppinfer.generation.params import GenerationParams
from ppinfer.generation.stopping import StopState
from ppinfer.pipeline.schedule import Kind, Request, WorkItem
from ppinfer.pipeline.transport import GREEDY, RowSampling
from ppinfer.pipeline.events import Emit, Finished, FinishReason, TokenDelta


@dataclass
class TokenCounts:
    """Token and time accounting at the first rank, as sampled ids arrive."""

    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled by decode steps
    first_tokens: int = 0  # tokens sampled right after prefill
    prefill_s: float = 0.0  # time between arrivals, attributed to the arriving item's kind
    decode_s: float = 0.0
    first_token_at: float | None = None
    sampled: dict[int, int] = field(default_factory=dict)  # sequence -> ids received
    last_done: float = field(default_factory=time.perf_counter)

    def account(self, item: WorkItem, now: float) -> None:
        if item.kind is Kind.PREFILL:
            self.prefill_s += now - self.last_done
        else:
            self.decode_s += now - self.last_done
        self.last_done = now


@dataclass
class Sequence:
    """One prompt to continue (or, with no `stop`, to score)."""

    seq: int
    prompt: list[int]
    params: GenerationParams
    stream_seed: int
    text: str = ""  # the prompt as given (for results.jsonl)
    stop: StopState | None = None  # None: scored, not generated
    emit: Emit | None = None  # a server request's event sink
    sent: int = 0  # characters of the generated text already emitted
    sent_ids: int = 0  # generated ids already emitted
    cancelled: bool = False
    error: str | None = None  # why a cancelled sequence was ended for it (shutdown)

    @property
    def budget(self) -> int:
        return 0 if self.stop is None else self.params.max_new_tokens

    def token_at(self, position: int) -> int:
        """The token fed at rope `position`: the prompt's, then the generated ones."""
        if position < len(self.prompt):
            return self.prompt[position]
        assert self.stop is not None
        return self.stop.token_ids[position - len(self.prompt)]


class Requests:
    """Every sequence the first rank knows, by id; `finished(seq)` is told when one ends."""

    def __init__(self, counts: TokenCounts, finished: Callable[[Sequence], None]) -> None:
        self.counts, self._finished = counts, finished
        self._live: dict[int, Sequence] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, sequence: Sequence) -> Request:
        self._live[sequence.seq] = sequence
        return Request(sequence.seq, len(sequence.prompt), sequence.budget)

    def cancel(self, seq: int, error: str | None = None) -> bool:
        """Mark a sequence cancelled; it ends (reason "cancelled", or "error" with `error`)
        when its next ids arrive. False if it is unknown or over."""
        sequence = self._live.get(seq)
        if sequence is None or sequence.cancelled:
            return False
        sequence.cancelled, sequence.error = True, error
        return True

    def drop(self, seq: int) -> None:
        """A cancelled sequence that never ran (withdrawn from the queue): end it now."""
        sequence = self._live.pop(seq, None)
        if sequence is not None:
            self._end(sequence, "error" if sequence.error else "cancelled", sequence.error)

    def live(self) -> list[int]:
        return list(self._live)

    def sampling(self, item: WorkItem) -> tuple[RowSampling, ...]:
        """The last stage's settings for each row of `item`."""
        out = []
        for step in item.rows:
            sequence = self._live.get(step.seq)
            if sequence is None:
                out.append(GREEDY)
                continue
            p = sequence.params
            out.append(RowSampling(p.temperature, p.top_k, p.top_p, p.min_p, p.repetition_penalty, sequence.stream_seed))
        return tuple(out)

    def input_ids(self, item: WorkItem) -> torch.Tensor:
        """The ids `item` feeds: [b, T] int64 (0 on padding)."""
        ids = torch.zeros((len(item.rows), item.length), dtype=torch.int64)
        for i, step in enumerate(item.rows):
            sequence = self._live[step.seq]
            first = max(0, -step.first_pos)
            ids[i, first:] = torch.tensor([sequence.token_at(step.first_pos + t) for t in range(first, item.length)])
        return ids

    def tokens_arrived(self, item: WorkItem, tokens: list[int]) -> list[int]:
        """Record the ids sampled after `item` (one per row); returns the sequences that are
        over (finished or cancelled)."""
        now = time.perf_counter()
        self.counts.account(item, now)
        over = []
        for step, token in zip(item.rows, tokens):
            sequence = self._live[step.seq]
            self.counts.sampled[step.seq] = self.counts.sampled.get(step.seq, 0) + 1
            if item.kind is Kind.PREFILL:
                self.counts.prompt_tokens += len(sequence.prompt)
                self.counts.first_token_at = self.counts.first_token_at or now
            if sequence.cancelled:
                over.append(step.seq)
                continue
            if sequence.stop is None:  # scored: over after its prefill
                over.append(step.seq)
                continue
            if item.kind is Kind.PREFILL:
                self.counts.first_tokens += 1
            else:
                self.counts.generated_tokens += 1
            if sequence.stop.append(token):
                over.append(step.seq)
            elif sequence.emit is not None:
                self._stream(sequence)
        for seq in over:
            sequence = self._live.pop(seq)
            if sequence.cancelled:
                self._end(sequence, "error" if sequence.error else "cancelled", sequence.error)
            else:
                self._end(sequence, None)
        return over

    def fail_all(self, why: str) -> None:
        """End every sequence with an error (the pipeline stopped under them)."""
        for seq in list(self._live):
            self._end(self._live.pop(seq), "error", why)

    def _stream(self, sequence: Sequence) -> None:
        """Emit the text that can no longer change: not a trailing partial character, not
        the start of a stop string."""
        assert sequence.stop is not None and sequence.emit is not None
        text = sequence.stop.text
        safe = len(text.rstrip("\ufffd"))
        held = [
            n for stop in sequence.params.stop for n in range(1, min(len(stop) - 1, safe) + 1)
            if text[safe - n:safe] == stop[:n]
        ]
        safe -= max(held, default=0)
        if safe > sequence.sent:
            ids = tuple(sequence.stop.token_ids[sequence.sent_ids:])
            sequence.emit(TokenDelta(text[sequence.sent:safe], ids))
            sequence.sent, sequence.sent_ids = safe, len(sequence.stop.token_ids)

    def _end(self, sequence: Sequence, reason: FinishReason | None, error: str | None = None) -> None:
        """Tell the owner; `reason` None: the sequence finished by its stop conditions (or
        was scored), and its result is handed to `finished`."""
        if sequence.emit is not None:
            stop = sequence.stop
            final: FinishReason = reason or (stop.finish_reason if stop is not None and stop.finish_reason else "stop")
            text = stop.text if stop is not None else ""
            generated = len(stop.token_ids) if stop is not None else 0
            sequence.emit(Finished(final, text[sequence.sent:], len(sequence.prompt), generated, error))
        if reason is None:
            self._finished(sequence)
