"""`StageState`: one lane's preallocated KV cache for one stage's layers, and its masks.

A lane holds up to B sequences, one per row of a slot grid `[B, max_len]`. Each row has its
own length: a row's tokens go to its next free slots, whatever its neighbours do, so a row
can take a new sequence while the others keep decoding. Each slot records its token's rope
position (-1 for padding), and the attention mask is derived from those positions alone, so
each sequence sees exactly the keys it would see if it ran alone.

A forward works on consecutive rows (`StageState.rows`). A row that does not advance in it
(idle: free, or waiting for its prefill) still computes one throw-away token: it writes that
token to its next free slot with position -1, where nothing reads it and the row's next real
token overwrites it. One spare slot per row beyond `max_len` takes it when the row is full.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class StageState:
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
            raise ValueError(f"state needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.batch, self.max_len = batch, max_len
        slots = max_len + 1  # the spare slot of idle rows
        # [B, Hkv, max_len + 1, D] per layer
        self.k = [torch.zeros(batch, n_head_kv[i], slots, head_dim, dtype=dtype, device=device) for i in range(n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.positions = torch.full((batch, slots), -1, dtype=torch.int64, device=device)  # [B, max_len + 1]
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
    def used_fraction(self) -> float:
        """Share of the slots holding a token."""
        return sum(self.lengths) / (self.batch * self.max_len)

    @property
    def used_bytes(self) -> int:
        """Bytes of the cache holding a token (the spare slots never do)."""
        slot_bytes = self.nbytes // (self.batch * (self.max_len + 1))
        return slot_bytes * sum(self.lengths)

    def rows(self, row0: int, positions: torch.Tensor, advance: list[bool]) -> "RowsView":
        """Reserve slots for a forward of rows [row0, row0 + b) with `positions` [b, T]: a row
        with `advance[i]` takes its next T slots; the others write one throw-away token (T must
        then be 1, or the row is padding in a prefill chunk and advances anyway)."""
        b, t = positions.shape
        if row0 < 0 or row0 + b > self.batch or len(advance) != b:
            raise ValueError(f"rows [{row0}, {row0 + b}) of a lane of {self.batch}, {len(advance)} flags")
        starts = []
        for i, moves in enumerate(advance):
            length = self.lengths[row0 + i]
            if moves:
                if length + t > self.max_len:
                    raise ValueError(f"KV cache row {row0 + i} full: {length + t} slots needed, {self.max_len} allocated")
                self.lengths[row0 + i] = length + t
            elif t != 1:
                raise ValueError(f"an idle row computes one token, not {t}")
            starts.append(length)
        uniform = all(s == starts[0] for s in starts)
        device = self.positions.device
        if uniform:
            cols = torch.arange(starts[0], starts[0] + t, device=device).expand(b, t)  # [b, T]
            self.positions[row0:row0 + b, starts[0]:starts[0] + t] = positions
        else:
            cols = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)  # [b, T]
            self.positions[row0:row0 + b].scatter_(1, cols, positions)
        end = max(starts) + t
        return RowsView(self, row0, b, cols, starts[0] if uniform else None, end)


@dataclass
class RowsView:
    """The slots one forward writes: rows [row0, row0 + b), columns `cols` [b, T]
    (`start`: the common first column when every row writes the same ones); keys are read
    from columns [0, end)."""

    state: StageState
    row0: int
    b: int
    cols: torch.Tensor  # [b, T] int64
    start: int | None
    end: int

    def mask(self, window: int) -> torch.Tensor:
        """Boolean attention mask [b, 1, T, end] for this forward's queries.

        Key j is visible to query i when it is a real token (position >= 0) not after the
        query, and, for sliding layers, when q_pos - k_pos < window. A padding query sees only
        itself, so its (discarded) row stays finite.
        """
        rows = slice(self.row0, self.row0 + self.b)
        kpos = self.state.positions[rows, None, : self.end]  # [b, 1, n]
        qpos = self.state.positions[rows].gather(1, self.cols)[:, :, None]  # [b, T, 1]
        visible = (kpos >= 0) & (kpos <= qpos)  # [b, T, n]
        if window > 0:
            visible &= qpos - kpos < window
        slots = torch.arange(self.end, device=kpos.device)
        own = slots[None, None, :] == self.cols[:, :, None]  # [b, T, n]
        return (visible | own)[:, None]

    def layer(self, layer: int) -> "LayerKV":
        """The slots of `layer`: where its new keys and values go."""
        rows = slice(self.row0, self.row0 + self.b)
        return LayerKV(self.state.k[layer][rows], self.state.v[layer][rows], self.cols, self.start, self.end)


@dataclass
class LayerKV:
    """One layer's cache rows in a forward, and the slots its new tokens take."""

    k: torch.Tensor  # [b, Hkv, L + 1, D] (a view of the cache)
    v: torch.Tensor  # [b, Hkv, L + 1, D]
    cols: torch.Tensor  # [b, T] int64
    start: int | None  # the common first column when every row writes the same ones
    end: int  # keys are read from columns [0, end)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v [b, T, Hkv, D]; returns the keys and values to attend to, [b, Hkv, end, D]
        each (views of the cache)."""
        if self.start is not None:
            t = k.shape[1]
            self.k[:, :, self.start:self.start + t] = k.transpose(1, 2)
            self.v[:, :, self.start:self.start + t] = v.transpose(1, 2)
        else:
            batch_idx = torch.arange(k.shape[0], device=k.device)[:, None]  # [b, 1]
            self.k[batch_idx, :, self.cols] = k  # indexed view is [b, T, Hkv, D]
            self.v[batch_idx, :, self.cols] = v
        return self.k[:, :, : self.end], self.v[:, :, : self.end]
