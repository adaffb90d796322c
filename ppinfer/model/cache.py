"""`KVCache`: one lane's preallocated KV cache for one stage's layers, and its masks.

A lane holds up to B sequences, one per row of a slot grid `[B, max_len]`. Each row has its
own length: a row's tokens go to its next free slots, whatever its neighbours do, so a row
can take a new sequence while the others keep decoding. Each slot records its token's rope
position (-1 for padding), and the attention mask is derived from those positions alone, so
each sequence sees exactly the keys it would see if it ran alone.

A forward works on any set of rows (`KVCache.rows`): a decode step computes only the rows
that decode, whichever rows between them are free or still in prefill.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass

import torch


class KVCache:
    """KV cache of one lane on one stage. The runtime owns it; `forward` writes through
    `rows(...)`."""

    def __init__(
        self,
        n_layers: int,
        n_head_kv: list[int],
        head_dim: int,
        batch: int,
        max_len: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.batch, self.max_len = batch, max_len
        # [B, Hkv, max_len, D] per layer
        self.k = [
            torch.zeros(batch, n_head_kv[i], max_len, head_dim, dtype=dtype, device=device) for i in range(n_layers)
        ]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.positions = torch.full((batch, max_len), -1, dtype=torch.int64, device=device)  # [B, max_len]
        self.lengths = [0] * batch  # slots written per row

    def reset(self, row0: int = 0, row1: int | None = None) -> None:
        """Forget the sequences of rows [row0, row1) (every row by default)."""
        row1 = self.batch if row1 is None else row1
        self.positions[row0:row1].fill_(-1)
        self.lengths[row0:row1] = [0] * (row1 - row0)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    @property
    def used_bytes(self) -> int:
        """Bytes of the cache holding a token."""
        slot_bytes = self.nbytes // (self.batch * self.max_len)
        return slot_bytes * sum(self.lengths)

    def rows(self, rows: Sequence[int], positions: torch.Tensor) -> RowsView:
        """Reserve the next T slots of each of `rows` (increasing row ids) for a forward with
        `positions` [b, T] (one row of positions per row id)."""
        b, t = positions.shape
        if len(rows) != b or any(r < 0 or r >= self.batch for r in rows) or any(
            a >= c for a, c in itertools.pairwise(rows)
        ):
            raise ValueError(f"rows {list(rows)} of a lane of {self.batch} for positions of {b} rows")
        starts = [self.lengths[r] for r in rows]
        for r, length in zip(rows, starts):
            if length + t > self.max_len:
                raise ValueError(f"KV cache row {r} full: {length + t} slots needed, {self.max_len} allocated")
            self.lengths[r] = length + t
        device = self.positions.device
        consecutive = rows[-1] - rows[0] == b - 1
        row_ids = torch.tensor(list(rows), device=device)  # [b]
        index = slice(rows[0], rows[0] + b) if consecutive else row_ids
        uniform = all(s == starts[0] for s in starts)
        if uniform:
            cols = torch.arange(starts[0], starts[0] + t, device=device).expand(b, t)  # [b, T]
        else:
            cols = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)  # [b, T]
        if uniform and consecutive:
            self.positions[index, starts[0]:starts[0] + t] = positions
        else:
            self.positions[row_ids[:, None], cols] = positions
        end = max(starts) + t
        return RowsView(self, index, row_ids, positions, cols, starts[0] if uniform else None, end)


@dataclass
class RowsView:
    """The slots one forward writes: rows `index` (a slice when they are consecutive, else a
    tensor of row ids), columns `cols` [b, T] (`start`: the common first column when every
    row writes the same ones); keys are read from columns [0, end)."""

    cache: KVCache
    index: slice | torch.Tensor
    row_ids: torch.Tensor  # [b] int64
    positions: torch.Tensor  # [b, T] the queries' rope positions
    cols: torch.Tensor  # [b, T] int64
    start: int | None
    end: int

    def mask(self, window: int) -> torch.Tensor:
        """Boolean attention mask [b, 1, T, end] for this forward's queries.

        Key j is visible to query i when it is a real token (position >= 0) not after the
        query, and, for sliding layers, when q_pos - k_pos < window. A padding query sees only
        itself, so its (discarded) row stays finite.
        """
        kpos = self.cache.positions[self.index, : self.end][:, None]  # [b, 1, n]
        qpos = self.positions[:, :, None]  # [b, T, 1]
        visible = (kpos >= 0) & (kpos <= qpos)  # [b, T, n]
        if window > 0:
            visible &= qpos - kpos < window
        slots = torch.arange(self.end, device=kpos.device)
        own = slots[None, None, :] == self.cols[:, :, None]  # [b, T, n]
        return (visible | own)[:, None]

    def layer(self, layer: int) -> LayerKV:
        """The slots of `layer`: where its new keys and values go."""
        return LayerKV(
            self.cache.k[layer], self.cache.v[layer], self.index, self.row_ids, self.cols, self.start, self.end
        )


@dataclass
class LayerKV:
    """One layer's cache in a forward, and the slots its new tokens take."""

    k: torch.Tensor  # [B, Hkv, max_len, D]: the lane's whole cache of this layer
    v: torch.Tensor  # [B, Hkv, max_len, D]
    index: slice | torch.Tensor  # this forward's rows
    row_ids: torch.Tensor  # [b] int64, the same rows
    cols: torch.Tensor  # [b, T] int64
    start: int | None  # the common first column when every row writes the same ones
    end: int  # keys are read from columns [0, end)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, T, Hkv, D]; returns the keys and values to attend to, [b, Hkv, end, D]
        each (views of the cache where the rows are consecutive, else copies)."""
        if isinstance(self.index, slice) and self.start is not None:
            t = k.shape[1]
            self.k[self.index, :, self.start:self.start + t] = k.transpose(1, 2)
            self.v[self.index, :, self.start:self.start + t] = v.transpose(1, 2)
        else:
            rows = self.row_ids[:, None]  # [b, 1]
            self.k[rows, :, self.cols] = k  # indexed view is [b, T, Hkv, D]
            self.v[rows, :, self.cols] = v
        return self.k[self.index, :, : self.end], self.v[self.index, :, : self.end]
