"""The wire format between stages: a fixed-size int64 control block per message, and the
admission records that carry each sequence's settings to the last stage.

Control block: `HEADER` fields (message kind, lane, item kind, rows, tokens per row, whether it
samples, the size of a payload that follows, and the rows, tokens per row and sampling of a
folded prefill chunk, 0 rows when there is none), each stage's busy seconds so far (in
microseconds), then `ROW_FIELDS` per row of the item, the folded chunk's rows after the item's
(row, sequence, first position, reset). A folded chunk's rows are other rows of the same lane,
so a block sized for the largest lane holds both.
Every block of a link has the same size (sized for the largest lane), so a receiver can post
its receive before the sender is ready.

Admissions: a sequence's generation settings reach the last stage once, in a message sent
ahead of its first prefill chunk (`Msg.ADMIT`: a control block, then a JSON payload), not
with every work item; the last stage keeps them for as long as the sequence has a row.

Log-probabilities: sampled ids come back as `[control | ids]`; when some row of the item asked
for log-probabilities, the control block's payload field gives the size of a JSON message
that follows with them (`encode_logprobs`). Items without them send exactly what they sent
before, so decoding without log-probabilities costs nothing more.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass
from enum import IntEnum

import torch

from ppinfer.pipeline.work import ItemKind, RowStep, WorkItem
from ppinfer.sampling.logprobs import RowLogprobs
from ppinfer.sampling.params import GenerationParams

HEADER = 10  # int64 fields before the per-stage and per-row parts of a control block
ROW_FIELDS = 4  # int64 fields per row: row, seq, first_pos, reset


class Msg(IntEnum):
    ITEM = 1  # hidden states inline
    ITEM_FOLLOWS = 2  # ids and hidden states in the next message
    TOKENS = 3
    STOP = 4
    PING = 5
    ADMIT = 6  # admission records in the next message
    RELEASE = 7  # rows whose KV blocks go back to the pool, in the next message
    ATTACH = 8  # rows that start on cached KV blocks, in the next message


@dataclass(frozen=True)
class Control:
    """A message's control block: the kind of message, the item (row by row), each stage's busy
    seconds when it passed the item on, and the byte size of a payload that follows (ADMIT's
    records, RELEASE's and ATTACH's rows, TOKENS' log-probabilities)."""

    msg: Msg
    item: WorkItem | None = None
    busy_s: tuple[float, ...] = ()
    payload: int = 0

    @staticmethod
    def words(stages: int, rows: int) -> int:
        return HEADER + stages + rows * ROW_FIELDS

    def encode(self, stages: int) -> list[int]:
        fields = [int(self.msg), 0, 0, 0, 0, 0, self.payload, 0, 0, 0]
        busy = [int(s * 1e6) for s in self.busy_s] + [0] * (stages - len(self.busy_s))
        rows: list[int] = []
        it = self.item
        if it is not None:
            fields[1:6] = [it.lane, int(it.kind), len(it.rows), it.length, int(it.samples)]
            if it.folded is not None:
                fields[7:10] = [len(it.folded.rows), it.folded.length, int(it.folded.samples)]
            for part in it.parts:
                for step in part.rows:
                    rows += [step.row, step.seq, step.first_pos, int(step.reset)]
        return fields + busy + rows

    @classmethod
    def decode(cls, raw: list[int], stages: int) -> Control:
        msg = Msg(raw[0])
        busy = tuple(v / 1e6 for v in raw[HEADER:HEADER + stages])
        if msg in (Msg.STOP, Msg.PING, Msg.ADMIT, Msg.RELEASE, Msg.ATTACH):
            return cls(msg, busy_s=busy, payload=raw[6])
        n_rows, n_folded, at = raw[3], raw[7], HEADER + stages
        steps = [
            RowStep(row[0], row[1], row[2], bool(row[3]))
            for row in (raw[at + r * ROW_FIELDS: at + (r + 1) * ROW_FIELDS] for r in range(n_rows + n_folded))
        ]
        folded = None
        if n_folded:
            folded = WorkItem(raw[1], ItemKind.PREFILL, tuple(steps[n_rows:]), raw[8], bool(raw[9]))
        item = WorkItem(raw[1], ItemKind(raw[2]), tuple(steps[:n_rows]), raw[4], bool(raw[5]), folded)
        return cls(msg, item, busy, payload=raw[6])


@dataclass(frozen=True)
class LinkSizes:
    """What a rank preallocates per link, from the largest messages the run can send."""

    control_words: int  # a control block for the largest lane
    item_bytes: int  # control + ids + hidden of a decode step of the largest lane, inline
    token_bytes: int  # control + one sampled id per row of the largest lane
    large_bytes: int  # ids + hidden of the largest prefill chunk of the largest lane

    @classmethod
    def of(cls, hidden_size: int, max_batch: int, max_tokens: int, dtype: torch.dtype, stages: int) -> LinkSizes:
        """`max_batch`: rows of the fullest lane; `max_tokens`: tokens per row in the longest
        prefill chunk actually issued (not the configured chunk, which may be far longer than
        every prompt)."""
        esize = torch.finfo(dtype).bits // 8
        words = Control.words(stages, max_batch)
        return cls(
            control_words=words,
            item_bytes=(words + max_batch) * 8 + max_batch * hidden_size * esize,
            token_bytes=(words + max_batch) * 8,
            large_bytes=max_batch * max_tokens * (8 + hidden_size * esize),
        )


@dataclass(frozen=True)
class Admission:
    """What the last stage needs to sample a sequence: its settings and its random stream, and
    for a sequence resumed after a preemption the tokens it had generated (its random stream
    goes on past them, its penalties count them)."""

    seq: int
    stream_seed: int
    params: GenerationParams
    generated: tuple[int, ...] = ()


def encode_admissions(admissions: list[Admission]) -> bytes:
    records = [{"seq": a.seq, "stream_seed": a.stream_seed, "params": dataclasses.asdict(a.params),
                "generated": list(a.generated)} for a in admissions]
    return json.dumps(records).encode()


def decode_admissions(payload: bytes) -> list[Admission]:
    """The records of `encode_admissions` (settings validated where the sequence was made)."""
    return [Admission(r["seq"], r["stream_seed"], GenerationParams(**r["params"]), tuple(r["generated"]))
            for r in json.loads(payload)]


def encode_release(rows: list[tuple[int, int]]) -> bytes:
    """(lane, row) pairs whose KV blocks every stage gives back."""
    return json.dumps(rows).encode()


def decode_release(payload: bytes) -> list[tuple[int, int]]:
    return [(int(lane), int(row)) for lane, row in json.loads(payload)]


def encode_attach(rows: list[tuple[int, int, list[int]]]) -> bytes:
    """(lane, row, blocks): rows that start a sequence on cached KV blocks."""
    return json.dumps(rows).encode()


def decode_attach(payload: bytes) -> list[tuple[int, int, list[int]]]:
    return [(int(lane), int(row), [int(b) for b in blocks]) for lane, row, blocks in json.loads(payload)]


def encode_logprobs(rows: list[RowLogprobs | None]) -> bytes:
    """One entry per row of the item (null for rows that asked for none)."""
    return json.dumps([None if r is None else r.to_json() for r in rows]).encode()


def decode_logprobs(payload: bytes) -> list[RowLogprobs | None]:
    return [None if r is None else RowLogprobs.from_json(r) for r in json.loads(payload)]
