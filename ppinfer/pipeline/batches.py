"""Batches of sequences as lanes hold them: left-padded prompts and per-slot positions.

Every rank builds the same batches from the same prompts, so a work item's header needs to
carry only the batch index: each stage derives the positions of any slot range itself.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class Batch:
    """Sequences `seq_ids` (global prompt indices) sharing one lane, left-padded to `width`."""

    index: int
    seq_ids: tuple[int, ...]
    prompts: tuple[tuple[int, ...], ...]

    @property
    def size(self) -> int:
        return len(self.seq_ids)

    @cached_property
    def width(self) -> int:
        return max(len(p) for p in self.prompts)

    @cached_property
    def pads(self) -> torch.Tensor:
        """Left padding of each sequence: [B] int64."""
        return torch.tensor([self.width - len(p) for p in self.prompts], dtype=torch.int64)

    @cached_property
    def grid(self) -> torch.Tensor:
        """Left-padded prompt ids [B, width] int64 (padding id 0: those slots are masked)."""
        grid = torch.zeros((self.size, self.width), dtype=torch.int64)
        for row, prompt in enumerate(self.prompts):
            grid[row, self.width - len(prompt):] = torch.tensor(prompt, dtype=torch.int64)
        return grid

    def positions(self, start: int, length: int) -> torch.Tensor:
        """Rope positions of slots [start, start + length): [B, T] int64, -1 on padding."""
        slots = torch.arange(start, start + length, dtype=torch.int64)[None, :]  # [1, T]
        pos = slots - self.pads[:, None]  # [B, T]
        return pos.masked_fill(pos < 0, -1)

    def prompt_tokens(self, start: int, length: int) -> torch.Tensor:
        """Left-padded prompt ids of slots [start, start + length): [B, T] int64."""
        return self.grid[:, start:start + length]


def make_batches(prompts: list[list[int]], lane_size: int) -> list[Batch]:
    """Consecutive groups of `lane_size` prompts, in prompt order."""
    if lane_size < 1:
        raise ValueError(f"lane_size must be >= 1, got {lane_size}")
    return [
        Batch(i // lane_size, tuple(range(i, min(i + lane_size, len(prompts)))),
              tuple(tuple(p) for p in prompts[i:i + lane_size]))
        for i in range(0, len(prompts), lane_size)
    ]
