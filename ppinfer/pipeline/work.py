"""Work items: what the first stage issues and every stage computes, as plain data that
crosses the wire (see `ppinfer.pipeline.wire`)."""

from __future__ import annotations

from dataclasses import dataclass, replace
from enum import IntEnum
from functools import cached_property

import torch


class ItemKind(IntEnum):
    PREFILL = 1
    DECODE = 2


@dataclass(frozen=True)
class RowStep:
    """What one cache row does in a work item."""

    row: int  # the row of the lane's cache
    seq: int  # the sequence in the row
    first_pos: int  # rope position of the item's first token (negative: left padding)
    reset: bool = False
    """A new sequence starts here: the row forgets its previous one (or, when `first_pos` > 0,
    has just been attached to the cached blocks that hold the prompt's beginning)."""


@dataclass(frozen=True)
class WorkItem:
    """One forward of some rows of one lane (in increasing row order) through every stage,
    `length` tokens per row."""

    lane: int
    kind: ItemKind
    rows: tuple[RowStep, ...]
    length: int  # tokens per row in this item (T)
    samples: bool  # the last stage samples each row's next token after this item
    folded: WorkItem | None = None
    """A prefill chunk of the lane's group (other rows of the same lane) computed in the same
    forward as this decode step: every weight is streamed once for both (`parts`)."""

    @cached_property
    def parts(self) -> tuple[WorkItem, ...]:
        """What one forward computes: the item (without its folded chunk), then the folded
        chunk. Each part is fed, sampled and answered as an item of its own. (Made once per
        item: every stage reads it several times a step.)"""
        if self.folded is None:
            return (self,)
        return (replace(self, folded=None), self.folded)

    @property
    def tokens(self) -> int:
        """Tokens one forward of the item computes, its folded chunk's included."""
        return sum(len(part.rows) * part.length for part in self.parts)

    @property
    def seqs(self) -> list[int]:
        """The sequences computed by this item, one per row."""
        return [r.seq for r in self.rows]

    @property
    def row_ids(self) -> list[int]:
        """The lane's cache rows this item computes."""
        return [r.row for r in self.rows]


@dataclass(frozen=True)
class AwaitTokens:
    """The first stage must receive the lane's oldest sampled ids before it can go on."""

    lane: int


def item_positions(item: WorkItem) -> torch.Tensor:
    """Rope positions of `item`'s tokens: [b, T] int64, -1 on left padding."""
    first = torch.tensor([s.first_pos for s in item.rows], dtype=torch.int64)
    pos = first[:, None] + torch.arange(item.length, dtype=torch.int64)[None, :]  # [b, T]
    return pos.masked_fill(pos < 0, -1)
