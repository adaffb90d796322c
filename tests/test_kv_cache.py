"""KV-cached decoding equals full recompute, and a left-padded lane of mixed prompt lengths
gives every sequence exactly what it gets alone (prefill and decode steps alike), also when
the scheduler refills its rows with new sequences while the others decode.

Full recompute = one forward over the whole sequence with a fresh state, which
test_families.py holds to transformers. The states here are allocated longer than needed,
so unused slots must be masked too.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, quants
from ggufgen import with_changes, write_tiny_gguf
from stage_runner import (
    LAYERS,
    PROSE,
    arange_positions,
    assert_as_alone,
    chunked_logits,
    fed_ids,
    full_logits,
    kl_and_top1,
    step,
    whole,
)
from tiny_cases import ALL_CASES, TinyFiles, token_batch

import ppinfer
from ppinfer.kernels import fused
from ppinfer.model import KVPool, kvquant
from ppinfer.model.cache import BLOCK_SIZE
from ppinfer.pipeline.runtime import StageRunner
from ppinfer.pipeline.scheduler import Scheduler
from ppinfer.pipeline.simulate import run_order, shaped
from ppinfer.pipeline.work import ItemKind, WorkItem

TOLERANCE = 1e-5
LENGTH = 20  # > 3x gemma2's window of 6, so sliding layers drop keys during decode
SLACK = 12  # extra state slots never written

KV_CASES = ["llama", "qwen3", "gemma2", "phi2", "gemma3"]


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("case", KV_CASES)
@pytest.mark.parametrize("prompt", [1, 7])
def test_prefill_then_decode_equals_recompute(tiny_files: TinyFiles, case: str, prompt: int) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    ids = token_batch(spec, length=LENGTH, seed=2)  # [2, T]
    expected = full_logits(stage, ids)  # [2, T, V]
    tokens = torch.from_numpy(ids)
    state = stage.new_cache(batch=2, max_len=LENGTH + SLACK)
    got = [step(stage, tokens[:, :prompt], arange_positions(2, prompt), state)]
    for t in range(prompt, LENGTH):
        got.append(step(stage, tokens[:, t : t + 1], arange_positions(2, 1, offset=t), state))
    for t, logits in enumerate(np.concatenate(got, axis=1).transpose(1, 0, 2)):
        gap = _gap(logits, expected[:, t])
        assert gap <= TOLERANCE, f"{case}: position {t} (prompt {prompt}) differs by {gap:.3g}"


@pytest.mark.parametrize("case", ["llama", "gemma2"])
def test_chunked_prefill_equals_recompute(tiny_files: TinyFiles, case: str) -> None:
    """Prefill in fixed-size chunks (the last one shorter) then decode."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    ids = token_batch(spec, length=LENGTH, seed=3)
    expected = full_logits(stage, ids)
    tokens = torch.from_numpy(ids)
    state = stage.new_cache(batch=2, max_len=LENGTH + SLACK)
    got = []
    for start in range(0, 17, 5):  # chunks [0,5) [5,10) [10,15) [15,17)
        end = min(start + 5, 17)
        got.append(step(stage, tokens[:, start:end], arange_positions(2, end - start, offset=start), state))
    for t in range(17, LENGTH):
        got.append(step(stage, tokens[:, t : t + 1], arange_positions(2, 1, offset=t), state))
    gap = _gap(np.concatenate(got, axis=1), expected)
    assert gap <= TOLERANCE, f"{case}: chunked prefill differs by {gap:.3g}"


@pytest.mark.parametrize("case", KV_CASES)
def test_left_padded_lane_equals_each_sequence_alone(tiny_files: TinyFiles, case: str) -> None:
    """Prompts of 3, 9 and 14 tokens share a lane of width 14 (left-padded, pad position -1),
    then decode 6 steps, each sequence at its own next position."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    lengths, width, steps = [3, 9, 14], 14, 6
    rng = np.random.default_rng(4)
    seqs = [rng.integers(0, spec.n_vocab, n + steps, dtype=np.int64) for n in lengths]
    alone = [full_logits(stage, s[None])[0] for s in seqs]  # each [n + steps, V]

    ids = torch.zeros(3, width, dtype=torch.int64)  # pad id 0: any id must do
    positions = torch.full((3, width), -1, dtype=torch.int64)
    for b, (n, s) in enumerate(zip(lengths, seqs)):
        ids[b, width - n :] = torch.from_numpy(s[:n])
        positions[b, width - n :] = torch.arange(n)
    state = stage.new_cache(batch=3, max_len=width + steps + SLACK)
    prefill = step(stage, ids, positions, state)  # [3, width, V]
    for b, n in enumerate(lengths):
        gap = _gap(prefill[b, width - n :], alone[b][:n])
        assert gap <= TOLERANCE, f"{case}: prompt of {n} in the lane differs by {gap:.3g}"

    for k in range(steps):
        nxt = torch.tensor([[s[n + k]] for n, s in zip(lengths, seqs)])  # [3, 1]
        pos = torch.tensor([[n + k] for n in lengths])  # [3, 1]
        logits = step(stage, nxt, pos, state)  # [3, 1, V]
        for b, n in enumerate(lengths):
            gap = _gap(logits[b, 0], alone[b][n + k])
            assert gap <= TOLERANCE, f"{case}: decode step {k} of the {n}-token prompt differs by {gap:.3g}"


@pytest.mark.parametrize(
    ("case", "fused_ops", "fold"),
    [("llama", True, True), ("gemma2", True, True), ("gemma3", True, True), ("llama", False, True),
     ("gemma3", False, True), ("llama", True, False)],
)
@torch.no_grad()
def test_refilled_lane_equals_each_sequence_alone(
    tiny_files: TinyFiles, case: str, fused_ops: bool, fold: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One lane of 3 rows run in the scheduler's own order: groups left-padded together, rows
    freed and refilled (the cache row reset by the newcomer's first chunk), a newcomer's
    chunks folded into its neighbours' decode steps (or, `fold` off, interleaved with them),
    rows of different lengths in one step, steps over rows that are not consecutive and a group
    admitted into rows apart. Every sequence's logits at every position it is fed equal those
    of the sequence alone. Decode steps run through the fused attention op, and again through
    torch's ops (the path of other dtypes and devices)."""
    if not fused_ops:
        monkeypatch.setattr(fused, "available", lambda device, dtype: False)
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    prompts, samples = [2, 7, 6, 4, 5, 3], [2, 7, 2, 1, 5, 6]
    capacity = max(prompts) + max(samples) - 1
    rng = np.random.default_rng(5)
    seqs = [rng.integers(0, spec.n_vocab, p + n - 1, dtype=np.int64) for p, n in zip(prompts, samples)]
    alone = [full_logits(stage, s[None])[0] for s in seqs]  # each [p + n - 1, V]
    sequences = [shaped(i, p, n) for i, (p, n) in enumerate(zip(prompts, samples))]
    order = list(run_order(Scheduler(1, 3, 4, capacity, fold=fold), sequences, lambda s: samples[s]))
    runner = StageRunner(stage, n_lanes=1, lane_size=3, capacity=capacity, kv_tokens=3 * capacity,
                         kv_dtype=torch.float32)
    seen = {"rows apart": 0, "group apart": 0, "reused": 0, "uneven": 0, "padded": 0, "folded": int(not fold)}
    used: set[int] = set()
    for item in (a for a in order if isinstance(a, WorkItem)):
        seen["folded"] += item.folded is not None
        state = runner.caches[0]
        for part in item.parts:
            rows = part.row_ids
            if state is not None and len({state.lengths[r] for r in rows}) > 1:
                seen["uneven"] += 1
            apart = rows[-1] - rows[0] >= len(rows)
            seen["rows apart"] += apart and part.kind is ItemKind.DECODE
            seen["group apart"] += apart and part.kind is ItemKind.PREFILL
            seen["reused"] += sum(row.reset and row.row in used for row in part.rows)
            seen["padded"] += sum(row.first_pos < 0 for row in part.rows)
            used.update(rows)
        logits = stage.lm_head(runner.run(item, fed_ids(item, seqs), None).hidden)  # [b, T, V] or [1, N, V]
        assert_as_alone(item, logits, alone, TOLERANCE)
    assert all(seen.values()), f"the order misses a case it is meant to cover: {seen}"


@pytest.mark.parametrize("fused_ops", [True, False])
@torch.no_grad()
def test_lanes_sharing_a_tight_pool_equal_each_sequence_alone(
    tiny_files: TinyFiles, fused_ops: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two lanes of 2 rows draw on one pool of 6 blocks (16 slots each) that cannot hold every
    row at once: admission waits for blocks that finishing sequences give back, rows grow
    across block boundaries, and a block freed by one lane is taken by the other. Every
    sequence's logits equal those of the sequence alone, and the pool never runs dry."""
    if not fused_ops:
        monkeypatch.setattr(fused, "available", lambda device, dtype: False)
    spec, path = ALL_CASES["llama"], tiny_files.path("llama")
    stage = whole(path, spec.n_layer)
    prompts, samples = [20, 5, 30, 9, 14, 3, 25, 12], [14, 3, 2, 20, 9, 16, 4, 7]
    capacity = max(prompts) + max(samples) - 1
    rng = np.random.default_rng(8)
    seqs = [rng.integers(0, spec.n_vocab, p + n - 1, dtype=np.int64) for p, n in zip(prompts, samples)]
    alone = [full_logits(stage, s[None])[0] for s in seqs]  # each [p + n - 1, V]
    pool_blocks = 6
    scheduler = Scheduler(2, 2, 8, capacity, pool_blocks=pool_blocks)
    runner = StageRunner(stage, n_lanes=2, lane_size=2, capacity=capacity, kv_tokens=pool_blocks * BLOCK_SIZE,
                         kv_dtype=torch.float32)
    owners: dict[int, set[int]] = {}  # block -> lanes that held it
    waited = 0
    sequences = [shaped(i, p, n) for i, (p, n) in enumerate(zip(prompts, samples))]
    for action in run_order(scheduler, sequences, lambda s: samples[s], on_release=runner.release):
        free_rows = sum(scheduler.sequence_in(lane, row) is None for lane in range(2) for row in range(2))
        waited += scheduler.waiting > 0 and free_rows > 0
        if not isinstance(action, WorkItem):
            continue
        logits = stage.lm_head(runner.run(action, fed_ids(action, seqs), None).hidden)  # [b, T, V] or [1, N, V]
        for row in (row for part in action.parts for row in part.rows):
            for block in runner.caches[action.lane].tables[row.row]:
                owners.setdefault(block, set()).add(action.lane)
        assert_as_alone(action, logits, alone, TOLERANCE)
    assert scheduler.idle()
    assert runner.pool is not None and runner.pool.peak_used <= pool_blocks
    assert waited, "admission never had to wait for blocks"
    assert any(len(lanes) == 2 for lanes in owners.values()), "no block passed from one lane to the other"


KV_FLOAT16_KL = 1e-4
"""Mean KL of next-token distributions with a float16 KV cache against float32 keys and
values: at most 1e-4 (a tenth of what quantized weights cost, see test_quantized)."""

KV_Q8_0_KL = 2e-3
"""Mean KL of next-token distributions with Q8_0 keys and values against float32 ones."""

KV_CHECK_TOKENS = 160
"""Positions of the prose the real-model checks score (each one a decode step per KV type)."""


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_compact_caches_stay_close_to_float32(model: str, request: pytest.FixtureRequest) -> None:
    """The default KV dtype (float16) and q8_0 on the real models, prose fed one token per step
    (the fused decode attention reading float16 keys and values, or Q8_0 blocks) against the
    same steps over float32 ones."""
    path = request.getfixturevalue(f"{model}_path")
    stage = whole(path, LAYERS[model])
    ids = np.array([ppinfer.load_tokenizer(path).encode(PROSE)[:KV_CHECK_TOKENS]], dtype=np.int64)  # [1, T]
    exact = chunked_logits([stage], ids, 1, torch.float32)
    for dtype, bound, top1_floor in ((torch.float16, KV_FLOAT16_KL, 0.99), (kvquant.Q8_0, KV_Q8_0_KL, 0.95)):
        kl, top1 = kl_and_top1(exact, chunked_logits([stage], ids, 1, dtype))
        assert kl <= bound, f"{model}, {dtype}: mean KL {kl:.2e}"
        assert top1 >= top1_floor, f"{model}, {dtype}: top-1 agreement {top1:.1%}"


Q8_HEAD_CASES = {
    "llama": with_changes(ALL_CASES["llama"], head_dim=32, seed=31),
    "gemma3": with_changes(ALL_CASES["gemma3"], head_dim=64, seed=32),  # sliding layers, q/k norm
}


@pytest.fixture(scope="module", params=list(Q8_HEAD_CASES))
def q8_model(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    """A tiny model whose head size Q8_0 blocks divide."""
    spec = Q8_HEAD_CASES[request.param]
    return spec, write_tiny_gguf(tmp_path_factory.mktemp("q8") / f"{request.param}.gguf", spec)


def test_q8_0_blocks_are_gguf_q8_0() -> None:
    """The unfused paths' packing equals gguf-py's Q8_0 quantizer byte for byte (ties of the
    rounding and all-zero blocks included), and widening equals gguf-py's dequantization."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 96, generator=g) * torch.tensor([0.01, 1.0, 300.0]).repeat_interleave(32)
    x[0, 0, :32] = 0.0
    x[1, 1, :32] = torch.arange(32) - 16.0  # 127 / 16 * k: values at exact halves after scaling
    packed = kvquant.quantize_q8_0(x)  # [3, 5, 102]
    assert packed.dtype == torch.uint8 and packed.shape == (3, 5, 3 * 34)
    assert np.array_equal(packed.numpy(), quants.quantize(x.numpy(), GGMLQuantizationType.Q8_0))
    widened = kvquant.dequantize_q8_0(packed, torch.float32)
    assert np.array_equal(widened.numpy(), quants.dequantize(packed.numpy(), GGMLQuantizationType.Q8_0))


def test_q8_0_pool_takes_34_bytes_per_32_values() -> None:
    """Bytes per cached token: (k, v) x heads x D / 32 x 34 per layer, 34 / 128 of float32's."""
    f32 = KVPool(2, [3, 1], 64, 4, torch.float32, torch.device("cpu"))
    q8 = KVPool(2, [3, 1], 64, 4, kvquant.Q8_0, torch.device("cpu"))
    assert q8.block_bytes == BLOCK_SIZE * 2 * (3 + 1) * 2 * 34
    assert q8.block_bytes * 128 == f32.block_bytes * 34
    with pytest.raises(ValueError, match=r"runtime\.kv_dtype=q8_0: head size 48 is not a multiple of 32"):
        KVPool(1, [1], 48, 4, kvquant.Q8_0, torch.device("cpu"))


def test_q8_0_decode_and_prefill_stay_close_to_float32(q8_model) -> None:
    """Decode one token a step (the fused op reading Q8_0 blocks) and prefill in chunks of 5
    (keys and values quantized and widened in torch) against float32 keys and values: the
    same top tokens and a small KL; the two Q8_0 paths agree with each other far more closely
    than either with float32, as they store the same blocks."""
    spec, path = q8_model
    stage = whole(path, spec.n_layer)
    ids = token_batch(spec, batch=1, length=LENGTH, seed=5)  # [1, T]
    exact = chunked_logits([stage], ids, 1, torch.float32)
    stepped = chunked_logits([stage], ids, 1, kvquant.Q8_0)
    chunked = chunked_logits([stage], ids, 5, kvquant.Q8_0)
    kl, top1 = kl_and_top1(exact, stepped)
    assert 0 < kl <= 1e-3 and top1 >= 0.9, f"decode: KL {kl:.2e}, top-1 {top1:.0%}"
    kl_chunked, _ = kl_and_top1(exact, chunked)
    assert kl_chunked <= 1e-3, f"chunked prefill: KL {kl_chunked:.2e}"
    assert _gap(stepped[:5], chunked[:5]) <= 0.1 * _gap(stepped[:5], exact[:5]) + 1e-5
