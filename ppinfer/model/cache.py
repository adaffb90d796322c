"""`StageState`: one lane's preallocated KV cache for one stage's layers, and its masks.

A lane holds B sequences in a fixed slot grid `[B, max_len]`. Sequences of different prompt
lengths are left-padded by the runtime so every sequence writes the same slots at every step;
each slot records its token's rope position (-1 for padding), and the attention mask is
derived from those positions alone, so each sequence sees exactly the keys it would see if it
ran alone.
"""

from __future__ import annotations

import torch


class StageState:
    """KV cache of one lane on one stage. `forward` appends to it; the runtime owns it."""

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
        # [B, Hkv, max_len, D] per layer
        self.k = [torch.zeros(batch, n_head_kv[i], max_len, head_dim, dtype=dtype, device=device) for i in range(n_layers)]
        self.v = [torch.zeros_like(k) for k in self.k]
        self.positions = torch.full((batch, max_len), -1, dtype=torch.int64, device=device)  # [B, max_len]
        self.length = 0

    def reset(self) -> None:
        """Forget every sequence (the buffers are reused for the lane's next wave)."""
        self.positions.fill_(-1)
        self.length = 0

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def append_positions(self, positions: torch.Tensor) -> tuple[int, int]:
        """Reserve slots for `positions` [B, T]; returns the slot range [start, end)."""
        batch, steps = positions.shape
        if batch != self.batch:
            raise ValueError(f"lane has {self.batch} sequences, got a batch of {batch}")
        start, end = self.length, self.length + steps
        if end > self.max_len:
            raise ValueError(f"KV cache full: {end} slots needed, {self.max_len} allocated")
        self.positions[:, start:end] = positions
        self.length = end
        return start, end

    def mask(self, start: int, end: int, window: int) -> torch.Tensor:
        """Boolean attention mask [B, 1, T, end] for queries in slots [start, end).

        Key j is visible to query i when it is a real token (position >= 0) not after the
        query, and, for sliding layers, when q_pos - k_pos < window. A padding query sees only
        itself, so its (discarded) row stays finite.
        """
        kpos = self.positions[:, None, :end]  # [B, 1, n]
        qpos = self.positions[:, start:end, None]  # [B, T, 1]
        visible = (kpos >= 0) & (kpos <= qpos)  # [B, T, n]
        if window > 0:
            visible &= qpos - kpos < window
        slots = torch.arange(end, device=kpos.device)
        own = slots[None, :] == torch.arange(start, end, device=kpos.device)[:, None]  # [T, n]
        return (visible | own)[:, None]
