"""The KV cache: one pool of fixed-size blocks per stage (`KVPool`), and per lane the rows
that hold one sequence each (`KVCache`), every row with a table of the blocks it has filled.

A row's slot s (its s-th token) lives in block `table[s // BLOCK_SIZE]` at offset
`s % BLOCK_SIZE`. Blocks are taken from the pool as a row's tokens arrive and go back when the
row takes a new sequence, so every lane of a stage draws on the same memory and a row can
grow to any length the pool allows. Each slot records its token's rope position (-1 for
padding and for slots not written yet), and the attention mask is derived from those
positions alone, so each sequence sees exactly the keys it would see if it ran alone.

Keys and values are stored in the pool's type (`runtime.kv_dtype`: float16 by default,
float32 for the exact path, or Q8_0 blocks, see `ppinfer.model.kvquant`) and widened when attention reads
them.

A forward works on any set of rows (`KVCache.rows`): a decode step computes only the rows
that decode, whichever rows between them are free or still in prefill.

Prefix caching: a block may be shared by several rows (`KVCache.attach` starts a row on
blocks that already hold its prompt's first tokens). A block no row holds any more stays in
the pool with its keys and values, least recently used first in line to be taken again, so
a later prompt with the same beginning can still find it (`on_evict` says when it is gone).
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from ppinfer.model.kvquant import KVType, dequantize_q8_0, quantize_q8_0, storage

BLOCK_SIZE = 16
"""Slots per block."""
NULL_BLOCK = 0
"""A block that is never handed out: its positions stay -1, and tables are padded with it."""


class KVPoolFull(RuntimeError):
    """No free block is left (the scheduler's admission keeps this from happening)."""


def blocks_for(tokens: int) -> int:
    """Blocks that hold `tokens` slots."""
    return -(-tokens // BLOCK_SIZE)


class KVPool:
    """One stage's keys and values for every lane: `n_blocks` blocks of `BLOCK_SIZE` slots per
    layer. The tensors are allocated up front and left untouched (a block is zeroed when first
    taken); on the CPU their pages become resident only then, and freed blocks are reused
    first, so the resident memory follows the most tokens held at once."""

    def __init__(
        self,
        n_layers: int,
        n_head_kv: list[int],
        head_dim: int,
        n_blocks: int,
        dtype: KVType,
        device: torch.device,
        head_dim_v: int | None = None,  # values' head size when it differs from the keys' (latent attention)
    ) -> None:
        if n_blocks < 1:
            raise ValueError(f"a KV pool needs at least one block, got {n_blocks}")
        self.n_blocks, self.dtype = n_blocks, dtype
        k_type, k_row = storage(dtype, head_dim)  # Q8_0: uint8 rows of D / 32 * 34 bytes
        v_type, v_row = storage(dtype, head_dim if head_dim_v is None else head_dim_v)
        # [N + 1, Hkv, BLOCK_SIZE, D] per layer (block 0 is NULL_BLOCK). Left unwritten: a block's
        # memory is zeroed when it is first taken, so on the CPU its pages become resident then.
        self.k = [torch.empty(n_blocks + 1, h, BLOCK_SIZE, k_row, dtype=k_type, device=device) for h in n_head_kv]
        # [N + 1, Hkv, BS, Dv]
        self.v = [torch.empty(*k.shape[:-1], v_row, dtype=v_type, device=device) for k in self.k]
        self._zero(NULL_BLOCK)
        self.positions = torch.full((n_blocks + 1, BLOCK_SIZE), -1, dtype=torch.int64, device=device)  # [N + 1, BS]
        self._fresh = list(range(n_blocks, 0, -1))  # never written: taken first, lowest id first
        self._idle: OrderedDict[int, None] = OrderedDict()  # held by no row, least recently used first
        self._refs = [0] * (n_blocks + 1)  # rows holding each block
        self.peak_used = 0  # the most blocks held at once
        self.on_evict: Callable[[int], None] | None = None
        """Called with an idle block (one whose contents a prefix index may name) when it is
        taken for new tokens."""

    @property
    def free(self) -> int:
        """Blocks not held by any row (never written, or idle)."""
        return len(self._fresh) + len(self._idle)

    @property
    def used(self) -> int:
        return self.n_blocks - self.free

    @property
    def block_bytes(self) -> int:
        """Bytes of keys and values one block holds over every layer."""
        return sum((k[0].numel() + v[0].numel()) * k.element_size() for k, v in zip(self.k, self.v))

    @property
    def nbytes(self) -> int:
        return self.block_bytes * self.n_blocks

    @property
    def used_bytes(self) -> int:
        return self.block_bytes * self.used

    def take(self) -> int:
        """A block for new tokens, its slots marked unwritten: a never-written one, else the
        least recently used idle one."""
        if self._fresh:
            block = self._fresh.pop()
            self._zero(block)
        elif self._idle:
            block, _ = self._idle.popitem(last=False)
            if self.on_evict is not None:
                self.on_evict(block)
        else:
            raise KVPoolFull(f"the KV cache pool's {self.n_blocks} blocks are all in use")
        self._refs[block] = 1
        self.positions[block].fill_(-1)
        self.peak_used = max(self.peak_used, self.used)
        return block

    def _zero(self, block: int) -> None:
        """Finite contents for a block never written: attention multiplies the values of masked
        slots by probability 0, which must not meet a NaN."""
        for k, v in zip(self.k, self.v):
            k[block].zero_()
            v[block].zero_()

    def share(self, blocks: Sequence[int]) -> None:
        """One more row holds `blocks` (idle ones become held again)."""
        for block in blocks:
            if self._refs[block] == 0:
                if block not in self._idle:
                    raise ValueError(f"KV block {block} holds nothing to share")
                del self._idle[block]
            self._refs[block] += 1
        self.peak_used = max(self.peak_used, self.used)

    def give_back(self, blocks: Sequence[int]) -> None:
        """One row fewer holds `blocks`; a block no row holds becomes idle, its contents kept."""
        for block in blocks:
            self._refs[block] -= 1
            if self._refs[block] == 0:
                self._idle[block] = None


class KVCache:
    """The rows of one lane on one stage: each row's block table and length. The runtime owns
    it; `forward` writes through `rows(...)`."""

    def __init__(self, pool: KVPool, batch: int, max_len: int) -> None:
        if batch < 1 or max_len < 1:
            raise ValueError(f"cache needs batch >= 1 and max_len >= 1, got {batch}, {max_len}")
        self.pool, self.batch, self.max_len = pool, batch, max_len
        self.tables: list[list[int]] = [[] for _ in range(batch)]
        self.lengths = [0] * batch  # slots written per row

    def reset(self, row0: int = 0, row1: int | None = None) -> None:
        """Forget the sequences of rows [row0, row1) (every row by default); their blocks go
        back to the pool."""
        row1 = self.batch if row1 is None else row1
        for r in range(row0, row1):
            self.pool.give_back(self.tables[r])
            self.tables[r] = []
            self.lengths[r] = 0

    def attach(self, row: int, blocks: Sequence[int]) -> None:
        """Start `row` on a new sequence whose first `len(blocks)` blocks of slots are already
        in `blocks` (a cached prefix)."""
        self.reset(row, row + 1)
        self.pool.share(blocks)
        self.tables[row] = list(blocks)
        self.lengths[row] = len(blocks) * BLOCK_SIZE

    @property
    def used_bytes(self) -> int:
        """Bytes of the blocks this lane's rows hold."""
        return self.pool.block_bytes * sum(len(t) for t in self.tables)

    def rows(self, rows: Sequence[int], positions: torch.Tensor) -> RowsView:
        """Take the next T slots of each of `rows` (increasing row ids) for a forward with
        `positions` [b, T] (one row of positions per row id)."""
        b, t = positions.shape
        if len(rows) != b or any(r < 0 or r >= self.batch for r in rows) or any(
            a >= c for a, c in itertools.pairwise(rows)
        ):
            raise ValueError(f"rows {list(rows)} of a lane of {self.batch} for positions of {b} rows")
        starts = [self.lengths[r] for r in rows]
        for r, length in zip(rows, starts):
            if length + t > self.max_len:
                raise ValueError(f"KV cache row {r} full: {length + t} slots needed, {self.max_len} allowed")
        for r, length in zip(rows, starts):
            table = self.tables[r]
            while len(table) < blocks_for(length + t):
                table.append(self.pool.take())
            self.lengths[r] = length + t
        device = self.pool.positions.device
        end = max(starts) + t
        width = blocks_for(end)
        table = torch.tensor(
            [self.tables[r][:width] + [NULL_BLOCK] * (width - min(width, len(self.tables[r]))) for r in rows],
            dtype=torch.int64,
        ).to(device)  # [b, nb]
        cols = torch.tensor(starts, device=device)[:, None] + torch.arange(t, device=device)  # [b, T]
        blocks = table.gather(1, cols // BLOCK_SIZE)  # [b, T]
        offsets = cols % BLOCK_SIZE  # [b, T]
        self.pool.positions[blocks, offsets] = positions
        return RowsView(self.pool, table, positions, cols, blocks, offsets, end)


@dataclass
class RowsView:
    """The slots one forward writes: for each of its rows, the block table `table` [b, nb]
    and the new tokens' slots `cols` [b, T] (at `blocks`, `offsets` in the pool); keys are
    read from slots [0, end)."""

    pool: KVPool
    table: torch.Tensor  # [b, nb] int64, padded with NULL_BLOCK
    positions: torch.Tensor  # [b, T] the queries' rope positions
    cols: torch.Tensor  # [b, T] int64
    blocks: torch.Tensor  # [b, T] int64: the block of each new slot
    offsets: torch.Tensor  # [b, T] int64: its offset in the block
    end: int

    def mask(self, window: int, chunk: int = 0) -> torch.Tensor:
        """Boolean attention mask [b, 1, T, end] for this forward's queries.

        Key j is visible to query i when it is a real token (position >= 0) not after the
        query, for sliding layers when q_pos - k_pos < window, and for chunked layers (llama4)
        when both are in the same chunk of `chunk` positions. A padding query sees only itself,
        so its (discarded) row stays finite.
        """
        b = self.table.shape[0]
        kpos = self.pool.positions[self.table].view(b, -1)[:, None, : self.end]  # [b, 1, n]
        qpos = self.positions[:, :, None]  # [b, T, 1]
        visible = (kpos >= 0) & (kpos <= qpos)  # [b, T, n]
        if window > 0:
            visible &= qpos - kpos < window
        if chunk > 0:
            visible &= kpos >= torch.div(qpos, chunk, rounding_mode="floor") * chunk
        slots = torch.arange(self.end, device=kpos.device)
        own = slots[None, None, :] == self.cols[:, :, None]  # [b, T, n]
        return (visible | own)[:, None]

    def layer(self, layer: int) -> LayerKV:
        """The slots of `layer`: where its new keys and values go."""
        return LayerKV(
            self.pool.k[layer], self.pool.v[layer], self.table, self.cols, self.blocks, self.offsets, self.end
        )


@dataclass
class LayerKV:
    """One layer's pool in a forward, and the slots its new tokens take."""

    k: torch.Tensor  # [N + 1, Hkv, BS, D]: the stage's whole pool of this layer
    v: torch.Tensor  # [N + 1, Hkv, BS, Dv]
    table: torch.Tensor  # [b, nb] int64
    cols: torch.Tensor  # [b, T] int64
    blocks: torch.Tensor  # [b, T] int64
    offsets: torch.Tensor  # [b, T] int64
    end: int  # keys are read from slots [0, end)

    def write(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k [b, T, Hkv, D], v [b, T, Hkv, Dv]; returns the keys and values to attend to,
        [b, Hkv, end, D] and [b, Hkv, end, Dv], in k's dtype (gathered from the rows' blocks)."""
        self.k[self.blocks, :, self.offsets] = self._stored(k)  # indexed view is [b, T, Hkv, D]
        self.v[self.blocks, :, self.offsets] = self._stored(v)
        return self._gather(self.k, k.dtype), self._gather(self.v, v.dtype)

    def _stored(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., D] in the pool's element type (Q8_0 blocks: uint8 [..., D / 32 * 34])."""
        return quantize_q8_0(x) if self.k.dtype == torch.uint8 else x.to(self.k.dtype)

    def _gather(self, pool: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        b, nb = self.table.shape
        _, hkv, bs, d = pool.shape
        rows = pool[self.table].transpose(1, 2).reshape(b, hkv, nb * bs, d)[:, :, : self.end]  # [b, Hkv, end, D]
        return dequantize_q8_0(rows, dtype) if pool.dtype == torch.uint8 else rows.to(dtype)
