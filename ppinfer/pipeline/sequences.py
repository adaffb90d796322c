"""The first rank's live sequences: what each row is fed, what its sampled ids mean (a next
token, the end of the sequence), and the token and time counts of the run.

The scheduler only places sequences in rows; this registry decides what each row is fed and
whether the ids that come back end it, and tells each sequence's owner.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import torch

from ppinfer.pipeline.sequence import FinishReason, Sequence, Status
from ppinfer.pipeline.wire import Admission
from ppinfer.pipeline.work import ItemKind, WorkItem
from ppinfer.sampling.logprobs import RowLogprobs


@dataclass
class TokenCounts:
    """Token and time accounting at the first rank, as sampled ids arrive."""

    sequences: int = 0  # sequences added
    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled by decode steps
    first_tokens: int = 0  # tokens sampled right after prefill
    prefill_s: float = 0.0  # time between arrivals, attributed to the arriving item's kind
    decode_s: float = 0.0
    first_token_at: float | None = None
    looked_up_tokens: int = 0  # prompt tokens of sequences admitted with a prefix cache lookup
    cached_tokens: int = 0  # of those, tokens found in cached KV blocks (not prefilled again)
    preemptions: int = 0  # sequences that gave their KV blocks back mid-answer (recomputed later)
    sampled: dict[int, int] = field(default_factory=dict)  # sequence -> ids received
    last_done: float = field(default_factory=time.perf_counter)

    def account(self, item: WorkItem, now: float) -> None:
        if item.kind is ItemKind.PREFILL:
            self.prefill_s += now - self.last_done
        else:
            self.decode_s += now - self.last_done
        self.last_done = now


class Sequences:
    """Every live sequence the first rank knows, by id."""

    def __init__(self, counts: TokenCounts | None = None) -> None:
        self.counts = counts or TokenCounts()
        self._live: dict[int, Sequence] = {}

    def __len__(self) -> int:
        return len(self._live)

    def add(self, sequence: Sequence) -> Sequence:
        self._live[sequence.id] = sequence
        self.counts.sequences += 1
        return sequence

    def cancel(self, seq: int, error: str | None = None) -> Sequence | None:
        """Mark a live sequence to end ("cancelled", or "error" with `error`) when its next
        ids arrive; the sequence, or None if it is unknown or over."""
        sequence = self._live.get(seq)
        if sequence is not None:
            sequence.cancel(error)
        return sequence

    def drop(self, seq: int) -> None:
        """A cancelled sequence that never ran (withdrawn from the queue): end it now."""
        sequence = self._live.pop(seq, None)
        if sequence is not None and sequence.ending is not None:
            sequence.finish(*sequence.ending)

    def get(self, seq: int) -> Sequence | None:
        return self._live.get(seq)

    def live(self) -> list[int]:
        return list(self._live)

    def admissions(self, item: WorkItem) -> list[Admission]:
        """What the last stage needs of the sequences `item` starts: their settings and seeds
        (and, resuming after a preemption, the tokens generated so far), sent once per
        sequence, ahead of its first chunk."""
        starts = [self._live[step.seq] for part in item.parts for step in part.rows if step.reset]
        return [
            Admission(s.id, s.stream_seed, s.params, tuple(s.output.token_ids) if s.output is not None else ())
            for s in starts if not s.scored
        ]

    def input_ids(self, item: WorkItem) -> torch.Tensor:
        """The ids `item` feeds: [b, T] int64 (0 on padding); with a folded chunk, [1, N]: the
        parts' ids one after another, each part row by row."""
        if item.folded is not None:
            return torch.cat([self.input_ids(part).flatten() for part in item.parts])[None]
        ids = torch.zeros((len(item.rows), item.length), dtype=torch.int64)
        for i, step in enumerate(item.rows):
            sequence = self._live[step.seq]
            first = max(0, -step.first_pos)
            ids[i, first:] = torch.tensor([sequence.token_at(step.first_pos + t) for t in range(first, item.length)])
        return ids

    def tokens_arrived(
        self, item: WorkItem, tokens: list[int], logprobs: list[RowLogprobs | None] | None = None
    ) -> None:
        """Record the ids sampled after `item` (one per row), and their log-probabilities when
        asked for: each row's sequence decodes on, or finishes (its stop conditions, a cancel,
        or a scored sequence's prefill)."""
        now = time.perf_counter()
        self.counts.account(item, now)
        for i, (step, token) in enumerate(zip(item.rows, tokens)):
            sequence = self._live[step.seq]
            if logprobs is not None and logprobs[i] is not None:
                sequence.record(logprobs[i])
            self.counts.sampled[step.seq] = self.counts.sampled.get(step.seq, 0) + 1
            first = item.kind is ItemKind.PREFILL and sequence.generated == 0  # not a preempted one's recompute
            if first:
                self.counts.prompt_tokens += sequence.prompt_len
                self.counts.first_token_at = self.counts.first_token_at or now
            if sequence.ending is not None:
                self._end(sequence, *sequence.ending)
                continue
            if sequence.scored:
                self._end(sequence, "stop")
                continue
            assert sequence.output is not None
            if first:
                self.counts.first_tokens += 1
            else:
                self.counts.generated_tokens += 1
            if sequence.output.append(token):
                self._end(sequence, sequence.output.finish_reason)
            else:
                sequence.status = Status.DECODING
                sequence.stream()

    def fail_all(self, why: str) -> None:
        """End every sequence with an error (the pipeline stopped under them)."""
        for sequence in list(self._live.values()):
            self._end(sequence, "error", why)

    def _end(self, sequence: Sequence, reason: FinishReason, error: str | None = None) -> None:
        del self._live[sequence.id]
        sequence.finish(reason, error)
