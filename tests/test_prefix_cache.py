"""Prefix caching: block names, the index, the pool's sharing and eviction, and prompts that
start on cached blocks giving exactly the logits they give alone.

References: hand-built prompts whose shared beginnings are known, and each sequence's own
full forward (test_families.py holds that to transformers). The KV cache is float32 here, so
any wrong block, position or offset shows far above the tolerance.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_runner import assert_as_alone, fed_ids, full_logits, whole
from tiny_cases import ALL_CASES, TinyFiles

from ppinfer.model.cache import BLOCK_SIZE, KVCache, KVPool
from ppinfer.pipeline.prefix import PrefixIndex, block_names
from ppinfer.pipeline.runtime import StageRunner, register_prefixes
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.sequence import Sequence
from ppinfer.pipeline.simulate import run_order
from ppinfer.pipeline.work import ItemKind, WorkItem
from ppinfer.sampling.params import GenerationParams

TOLERANCE = 1e-5


def test_block_names_chain_the_whole_prefix() -> None:
    a = list(range(40))
    b = [99, *range(1, 40)]  # differs in the first token only
    assert len(block_names(a)) == 40 // BLOCK_SIZE == 2
    assert block_names(a)[0] != block_names(b)[0]
    assert block_names(a)[1] != block_names(b)[1]  # same second block, different prefix
    assert block_names(a) == block_names([*a, 7, 8])[:2]


def test_lookup_leaves_the_last_token_and_forgets_evicted_blocks() -> None:
    index = PrefixIndex()
    prompt = list(range(48))  # exactly 3 blocks
    index.register(prompt, [5, 6, 7])
    assert index.lookup(prompt) == [5, 6]  # the last block holds the last token: computed again
    assert index.lookup([*prompt, 1]) == [5, 6, 7]
    assert index.lookup([1, *prompt]) == []
    index.evicted(6)
    assert index.lookup([*prompt, 1]) == [5]  # a chain breaks at its first missing block
    index.count(49, 1)
    assert index.hit_rate == pytest.approx(16 / 49)


def test_pool_keeps_idle_blocks_until_fresh_ones_run_out() -> None:
    pool = KVPool(1, [1], 4, n_blocks=3, dtype=torch.float32, device=torch.device("cpu"))
    evicted: list[int] = []
    pool.on_evict = evicted.append
    lane = KVCache(pool, batch=2, max_len=64)
    lane.rows([0], torch.arange(20)[None])  # 2 blocks
    first = list(lane.tables[0])
    lane.attach(1, first[:1])  # row 1 starts on row 0's first block
    assert pool.used == 2 and lane.lengths[1] == BLOCK_SIZE
    lane.reset(0, 1)
    assert pool.used == 1 and pool.free == 2  # the shared block is still held by row 1
    lane.reset(1, 2)
    assert pool.used == 0 and not evicted
    lane.rows([0], torch.arange(5)[None])  # takes the never-written block first
    assert lane.tables[0] not in ([first[0]], [first[1]]) and not evicted
    # Row 1 needs 2 blocks: the idle ones, the one that went idle first (row 0's second block,
    # when row 0 let go; the shared first block only when row 1 did) taken first.
    lane.rows([1], torch.arange(20)[None])
    assert evicted == [first[1], first[0]]


def _sequence(i: int, prompt: list[int], new: int) -> Sequence:
    return Sequence(i, prompt, GenerationParams(max_new_tokens=new), 0)


@pytest.mark.parametrize("pool_blocks", [64, 9])
@torch.no_grad()
def test_prompts_on_cached_blocks_equal_each_sequence_alone(tiny_files: TinyFiles, pool_blocks: int) -> None:
    """Prompts that share a 40-token beginning (2 full blocks), and one that shares only the
    first block: later ones start on the cached blocks and prefill the rest, and every
    sequence's logits at every position equal those of the sequence alone. With a pool of 9
    blocks, idle blocks are evicted and the index forgets them; still exact."""
    spec, path = ALL_CASES["llama"], tiny_files.path("llama")
    stage = whole(path, spec.n_layer)
    rng = np.random.default_rng(11)
    shared = rng.integers(0, spec.n_vocab, 40).tolist()
    prompts = [shared + rng.integers(0, spec.n_vocab, n).tolist() for n in (5, 9, 2, 13)]
    prompts.append(shared[:20] + rng.integers(0, spec.n_vocab, 7).tolist())
    prompts.append(rng.integers(0, spec.n_vocab, 30).tolist())
    samples = [4, 6, 3, 5, 4, 3]
    seqs = [np.array(p + rng.integers(0, spec.n_vocab, n - 1).tolist()) for p, n in zip(prompts, samples)]
    alone = [full_logits(stage, s[None])[0] for s in seqs]  # each [p + n - 1, V]
    capacity = max(len(p) for p in prompts) + max(samples) - 1
    index = PrefixIndex()
    scheduler = Scheduler(2, 2, 8, capacity, pool_blocks=pool_blocks, prefix=index)
    runner = StageRunner(stage, n_lanes=2, lane_size=2, capacity=capacity, kv_tokens=pool_blocks * BLOCK_SIZE,
                         kv_dtype=torch.float32)
    runner.on_evict = index.evicted
    sequences = {i: _sequence(i, p, n) for i, (p, n) in enumerate(zip(prompts, samples))}
    first_prefill: dict[int, int] = {}
    for action in run_order(scheduler, sequences.values(), lambda s: samples[s], on_release=runner.release,
                            on_attach=runner.attach):
        if not isinstance(action, WorkItem):
            continue
        prefills = [part for part in action.parts if part.kind is ItemKind.PREFILL]
        for row in (row for part in prefills for row in part.rows):
            first_prefill.setdefault(row.seq, row.first_pos)
        logits = stage.lm_head(runner.run(action, fed_ids(action, seqs), None).hidden)  # [b, T, V] or [1, N, V]
        for part in prefills:
            if part.samples:
                register_prefixes(index, runner, sequences.get, part)
        assert_as_alone(action, logits, alone, TOLERANCE)
    assert scheduler.idle()
    on_cache = {seq: pos for seq, pos in first_prefill.items() if pos > 0}
    assert 32 in on_cache.values(), first_prefill  # two blocks of the shared beginning reused
    if pool_blocks == 64:
        # Sequence 1's first block is sequence 0's, in prefill: it waits for 0's blocks rather
        # than joining 0's group, and then starts on both shared blocks, as 2 and 3 do; 4 finds
        # the first one, 5 nothing.
        assert on_cache == {1: 32, 2: 32, 3: 32, 4: 16}, first_prefill
        assert index.hit_tokens == 32 + 32 + 32 + 16


def test_the_choices_of_one_prompt_prefill_it_once() -> None:
    """Four sequences with one 40-token prompt (a request's n = 4): the first prefills it, the
    others wait for its blocks rather than joining its group, then start on its two full blocks
    and prefill only the 8 tokens past them. Without a prefix index all four prefill all 40."""

    def prefilled(index: PrefixIndex | None) -> list[tuple[int, int]]:
        scheduler = Scheduler(2, 4, 16, 64, pool_blocks=64, prefix=index)
        prompt = list(range(100, 140))
        tokens: list[tuple[int, int]] = []  # (sequence, tokens) of each prefill row
        for action in run_order(scheduler, [_sequence(i, prompt, 3) for i in range(4)], lambda s: 3):
            parts = action.parts if isinstance(action, WorkItem) else ()
            for part in (part for part in parts if part.kind is ItemKind.PREFILL):
                tokens += [(row.seq, part.length) for row in part.rows]
                if part.samples and index is not None:
                    for row in part.rows:  # the blocks a stage would have given the row
                        index.register(prompt, [10 * row.seq + b for b in range(3)])
        return tokens

    shared = prefilled(PrefixIndex())
    assert sorted(shared) == [(0, 8), (0, 16), (0, 16), (1, 8), (2, 8), (3, 8)], shared
    alone = prefilled(None)
    assert sum(n for _, n in alone) == 4 * 40
