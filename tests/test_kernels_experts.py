"""The experts kernel: every active expert's product in one call (`experts_matmul`).

x's rows come grouped by expert (counts[e] rows for expert e, in expert order); each group is
multiplied by its expert's stored blocks. Checked against gguf-py's dequantization of each
expert (the 8-bit activations leave a small relative error), and bit for bit against
block_matmul on the group's rows alone, on every instruction set this CPU runs and on 1 and 2
threads: a row's result does not depend on which other experts share the call.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

from ppinfer.kernels.bench import random_blocks
from ppinfer.kernels.experts import BlockExperts

# Groups of every size class the kernels split rows into: none, 1, 2 (weight-rows kernel), 3-5
# (pair tiles), 6-15 (8-row tiles), 16+ (16-row tiles, one padded) and 37.
COUNTS = [1, 0, 2, 4, 7, 0, 16, 37, 3, 0]


def random_experts(rng: np.random.Generator, qtype: Q, n_expert: int, n: int, k: int) -> torch.Tensor:
    """[n_expert, n, row_bytes] uint8 of valid blocks: float weights quantized by gguf-py."""
    w = rng.standard_normal((n_expert * n, k)).astype(np.float32) * 0.1
    blocks = gguf.quants.quantize(w, qtype)  # [n_expert * n, row_bytes]
    return torch.from_numpy(np.ascontiguousarray(blocks)).reshape(n_expert, n, -1)


@pytest.mark.parametrize(("qtype", "k"), [(Q.Q4_0, 64), (Q.Q8_0, 96), (Q.Q5_1, 128)])
def test_each_group_meets_its_own_expert(ops, isa: str, qtype: Q, k: int) -> None:
    rng = np.random.default_rng(int(qtype))
    n = 40  # weight rows: 5 groups of 8
    w = random_experts(rng, qtype, len(COUNTS), n, k)  # [E, n, row_bytes]
    x = torch.from_numpy(rng.standard_normal((sum(COUNTS), k)).astype(np.float32))  # [M, k]
    counts = torch.tensor(COUNTS)
    got = ops.experts_matmul(x, w, int(qtype), k, counts)  # [M, n]
    assert got.shape == (sum(COUNTS), n)
    start = 0
    for e, rows in enumerate(COUNTS):
        part = x[start:start + rows]  # [rows, k]
        dequantized = gguf.quants.dequantize(w[e].numpy(), qtype)  # [n, k], gguf-py's
        want = part.numpy() @ dequantized.T  # [rows, n]
        scale = np.abs(part.numpy()) @ np.abs(dequantized).T + 1e-6
        assert np.all(np.abs(got[start:start + rows].numpy() - want) <= 0.02 * scale), f"expert {e}"
        assert torch.equal(got[start:start + rows], ops.block_matmul(part, w[e].contiguous(), int(qtype), k, None))
        start += rows


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K])
def test_packed_experts_give_the_row_major_bits(ops, isa: str, qtype: Q) -> None:
    """Experts held 16 rows interleaved (csrc/packed.cpp) multiply to experts_matmul's bits, so
    to the checks above, on one thread or two; 40 rows leave a short last group."""
    rng = np.random.default_rng(int(qtype) + 7)
    w = random_blocks(qtype, len(COUNTS) * 40, 256, rng).reshape(len(COUNTS), 40, -1)  # [E, n, row_bytes]
    packed = torch.stack([ops.pack_rows(w[e].contiguous(), int(qtype), 256) for e in range(len(COUNTS))])
    x = torch.from_numpy(rng.standard_normal((sum(COUNTS), 256)).astype(np.float32))  # [M, k]
    counts = torch.tensor(COUNTS)
    want = ops.experts_matmul(x, w, int(qtype), 256, counts)
    threads = torch.get_num_threads()
    try:
        for t in (1, 2):
            torch.set_num_threads(t)
            assert torch.equal(ops.packed_experts_matmul(x, packed, int(qtype), 256, 40, counts), want)
    finally:
        torch.set_num_threads(threads)
    module = BlockExperts(w, qtype, 256, packed=True)
    assert module.packed and torch.equal(module(x, counts), want)


def test_threads_do_not_change_the_bits(ops) -> None:
    rng = np.random.default_rng(1)
    w = random_experts(rng, Q.Q4_0, len(COUNTS), 64, 128)
    x = torch.from_numpy(rng.standard_normal((sum(COUNTS), 128)).astype(np.float32))
    counts = torch.tensor(COUNTS)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = ops.experts_matmul(x, w, int(Q.Q4_0), 128, counts)
        torch.set_num_threads(2)
        two = ops.experts_matmul(x, w, int(Q.Q4_0), 128, counts)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(one, two)


def test_bfloat16_rows_give_bfloat16_products(ops) -> None:
    rng = np.random.default_rng(2)
    w = random_experts(rng, Q.Q8_0, 3, 16, 64)
    x = torch.from_numpy(rng.standard_normal((5, 64)).astype(np.float32)).bfloat16()
    got = ops.experts_matmul(x, w, int(Q.Q8_0), 64, torch.tensor([2, 0, 3]))
    assert got.dtype == torch.bfloat16
    assert torch.equal(got[:2], ops.block_matmul(x[:2], w[0].contiguous(), int(Q.Q8_0), 64, None))


def test_block_experts_module_multiplies_grouped_rows(ops) -> None:
    rng = np.random.default_rng(3)
    w = random_experts(rng, Q.Q4_0, 4, 8, 32)
    module = BlockExperts(w, Q.Q4_0, 32)
    x = torch.from_numpy(rng.standard_normal((3, 32)).astype(np.float32))
    got = module(x, torch.tensor([0, 2, 0, 1]))  # rows 0-1: expert 1, row 2: expert 3
    assert torch.equal(got[:2], ops.block_matmul(x[:2], w[1].contiguous(), int(Q.Q4_0), 32, None))
    assert torch.equal(got[2:], ops.block_matmul(x[2:], w[3].contiguous(), int(Q.Q4_0), 32, None))
    assert module(x[:0], torch.zeros(4, dtype=torch.long)).shape == (0, 8)


@pytest.mark.parametrize(("counts", "message"), [
    ([1, 1, 0], "counts sum to 2, x has 3 rows"),
    ([1, 1], r"counts must be \[n_expert=3\]"),
    ([4, -1, 0], "a negative count -1"),
])
def test_counts_that_do_not_fit_are_named(ops, counts: list[int], message: str) -> None:
    block_bytes = GGML_QUANT_SIZES[Q.Q4_0][1]
    w = torch.zeros((3, 8, block_bytes), dtype=torch.uint8)
    with pytest.raises(RuntimeError, match=message):
        ops.experts_matmul(torch.zeros(3, 32), w, int(Q.Q4_0), 32, torch.tensor(counts))
