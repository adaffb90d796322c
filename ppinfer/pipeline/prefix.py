"""Prefix caching: the first rank's index of KV blocks that hold the beginning of a prompt.

A full block of a prompt is named by a hash of its token ids chained with the name of the
block before it, so a name says the whole prefix up to the block's end. When a sequence's
prompt has gone through every stage, its full blocks are registered under their names; a
later prompt that starts with the same blocks starts its row on them (`KVCache.attach` on
every stage, told by `Msg.ATTACH`) and prefills only the rest. Every stage holds the same
blocks for the same prefix, because every stage takes and frees blocks at the same points of
the same order of work; an idle block leaves the index when its pool takes it for new tokens.

Only rows without left padding hold a prompt at its own slots, so only those register, and a
prompt that finds cached blocks is admitted as a group of one. A prompt whose first block a
prompt in prefill is computing waits until it is registered (the scheduler's admission).
"""

from __future__ import annotations

from collections.abc import Sequence

from ppinfer.model.cache import BLOCK_SIZE


def block_names(prompt: Sequence[int]) -> list[int]:
    """The chained names of `prompt`'s full blocks."""
    names, name = [], 0
    for start in range(0, len(prompt) - BLOCK_SIZE + 1, BLOCK_SIZE):
        name = hash((name, tuple(prompt[start:start + BLOCK_SIZE])))
        names.append(name)
    return names


class PrefixIndex:
    """Which pool block holds each registered prefix block; hit counts for the metrics."""

    def __init__(self) -> None:
        self._block_of: dict[int, int] = {}  # name -> block
        self._name_of: dict[int, int] = {}  # block -> name
        self.looked_up_tokens = 0  # prompt tokens of the sequences admitted with a lookup
        self.hit_tokens = 0  # of those, tokens found in cached blocks

    def __len__(self) -> int:
        return len(self._block_of)

    def lookup(self, prompt: Sequence[int]) -> list[int]:
        """The blocks holding the longest cached beginning of `prompt`; at least its last token
        is left out, so that the prompt still has a token to compute. Counts nothing."""
        blocks = []
        for name in block_names(prompt[: len(prompt) - 1]):
            block = self._block_of.get(name)
            if block is None:
                break
            blocks.append(block)
        return blocks

    def count(self, prompt_tokens: int, hit_blocks: int) -> None:
        """An admitted prompt of `prompt_tokens` found `hit_blocks` blocks cached."""
        self.looked_up_tokens += prompt_tokens
        self.hit_tokens += hit_blocks * BLOCK_SIZE

    def register(self, prompt: Sequence[int], table: Sequence[int]) -> None:
        """`table` (a row's blocks, slot 0 first) holds `prompt` from its first slot."""
        for name, block in zip(block_names(prompt), table):
            if name not in self._block_of and block not in self._name_of:
                self._block_of[name] = block
                self._name_of[block] = name

    def evicted(self, block: int) -> None:
        """`block` is taken for new tokens: whatever it held is gone."""
        name = self._name_of.pop(block, None)
        if name is not None:
            del self._block_of[name]

    @property
    def hit_rate(self) -> float:
        """Share of the looked-up prompt tokens that were found cached."""
        return self.hit_tokens / self.looked_up_tokens if self.looked_up_tokens else 0.0
