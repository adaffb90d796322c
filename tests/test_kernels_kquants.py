"""The K-quant kernels (Q4_K, Q5_K, Q6_K: csrc/kquants.cpp) at the edges that
tests/test_kernels.py, which runs every supported type on random blocks, leaves to chance:

(a) the three types are among the supported ones;
(b) saturated blocks: every code, 6-bit scale and min (Q6_K: int8 scale) at its largest or
    smallest value, fp16 d and dmin from +-65504 down to subnormal, dequantize to gguf-py's
    values bit for bit and multiply activations that quantize to +-127 everywhere, so the
    SIMD code meets its largest integer partial sums (an int16 overflow or saturation in
    them would show far above the bound);
(c) rows long enough that the decode path splits k into several chunks (ops.cpp: 32
    activation blocks, 4 super-blocks, per chunk where x rows go to the tile kernels; whole
    rows for one x row), which must fall on super-block boundaries, at 1 and at 16 x rows.
(d) (in tests/test_kernels.py, for every type) an x row's result does not depend on the x rows
    beside it: every AVX2 kernel forms each output's float chain in the same order.

Activations are 2^e * q with integer |q| <= 127 and a 127 in each 32-value block: they
quantize exactly, so the only error left is the float accumulation, `accum` in the
docstring of tests/test_kernels.py; any wrong code, scale or offset shows far above it.
"""

from __future__ import annotations

import itertools

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from test_kernels import accum_bound, offsets, random_byte_blocks

from ppinfer.kernels import cpu

KQUANTS = (Q.Q4_K, Q.Q5_K, Q.Q6_K)
# ggml's block layouts: byte ranges of the codes, of the scales (Q4_K / Q5_K: 12 bytes of
# packed 6-bit scales and mins; Q6_K: 16 int8 scales) and the offsets of the fp16 fields.
CODES = {Q.Q4_K: ((16, 144),), Q.Q5_K: ((16, 176),), Q.Q6_K: ((0, 192),)}
SCALES = {Q.Q4_K: (4, 16), Q.Q5_K: (4, 16), Q.Q6_K: (192, 208)}
HALVES = {Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,)}
# Bytes for all scales: Q4_K / Q5_K: 0xff makes every scale and min 63, 0x00 every one 0,
# and the third pattern gives scales 63 with mins 0. Q6_K: 0x7f = 127, 0x80 = -128, 0x01 = 1.
SCALE_PATTERNS = {
    Q.Q4_K: (b"\xff" * 12, b"\x00" * 12, b"\xff" * 4 + b"\x00" * 4 + b"\x0f" * 4),
    Q.Q6_K: (b"\x7f" * 16, b"\x80" * 16, b"\x01" * 16),
}
SCALE_PATTERNS[Q.Q5_K] = SCALE_PATTERNS[Q.Q4_K]
EXTREME_HALVES = np.array([65504.0, -65504.0, 1.0, 6e-8, 6.1e-5], dtype=np.float16)  # 6e-8, 6.1e-5: subnormal


CODE_PATTERNS = dict.fromkeys(KQUANTS, (0x00, 0xFF))  # every code at its smallest or largest


def patterned_blocks(
    qtype: Q,
    n: int,
    k: int,
    codes: dict[Q, tuple[tuple[int, int], ...]],
    code_patterns: dict[Q, tuple[int, ...]],
    scales: dict[Q, tuple[int, int]],
    scale_patterns: dict[Q, tuple[bytes, ...]],
    halves: dict[Q, tuple[int, ...]],
) -> np.ndarray:
    """[n, row_bytes] uint8: every block one code byte over its `codes` ranges, one scale
    pattern over its `scales` range and extreme values in the fp16 fields at `halves`,
    cycling through all combinations."""
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    fields = list(itertools.product(EXTREME_HALVES, repeat=len(halves[qtype])))
    combos = list(itertools.product(code_patterns[qtype], scale_patterns[qtype], fields))
    n_blocks = n * k // block_elems
    assert n_blocks >= len(combos), "too few blocks to cover every combination"
    blocks = np.zeros((n_blocks, block_bytes), dtype=np.uint8)
    for b in range(n_blocks):
        code, pattern, values = combos[b % len(combos)]
        for lo, hi in codes[qtype]:
            blocks[b, lo:hi] = code
        lo, hi = scales[qtype]
        blocks[b, lo:hi] = np.frombuffer(pattern, dtype=np.uint8)
        for offset, half in zip(halves[qtype], values):
            blocks[b, offset : offset + 2] = np.array([half], dtype=np.float16).view(np.uint8)
    return blocks.reshape(n, -1)


def saturated_blocks(qtype: Q, n: int, k: int) -> np.ndarray:
    """[n, row_bytes] uint8: every block all-zero or all-one codes, one scale pattern and
    extreme fp16 fields, cycling through all combinations."""
    return patterned_blocks(qtype, n, k, CODES, CODE_PATTERNS, SCALES, SCALE_PATTERNS, HALVES)


def q8_exact(rows: int, k: int, rng: np.random.Generator, full: bool = False) -> torch.Tensor:
    """[rows, k] float32, 2^e * q per 32-value block; `full`: |q| = 127 everywhere, with rows
    all positive, all negative and of random signs."""
    if full:
        signs = np.stack([np.ones(k), -np.ones(k)] + [rng.choice([-1.0, 1.0], k) for _ in range(rows - 2)])
        q = 127 * signs.reshape(rows, k // 32, 32)
    else:
        q = rng.integers(-127, 128, (rows, k // 32, 32)).astype(np.float64)
        q[..., 0] = 127 * rng.choice([-1, 1], (rows, k // 32))
    return torch.from_numpy((q * 2.0 ** rng.integers(-8, 5, (rows, k // 32, 1))).reshape(rows, k).astype(np.float32))


def assert_within_accum_bound(got: torch.Tensor, x: torch.Tensor, raw: np.ndarray, qtype: Q) -> None:
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    err = np.abs(got.double().numpy() - x.double().numpy() @ w.T)
    bound = accum_bound(x, w, offsets(raw, qtype))
    worst = np.unravel_index(np.argmax(err - bound), err.shape)
    assert (err <= bound).all(), f"error {err[worst]} > bound {bound[worst]} at {worst}"


def test_kquants_are_supported() -> None:
    assert set(KQUANTS) <= set(cpu.supported_types())


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_saturated_blocks_dequantize_exactly(ops, qtype: Q) -> None:
    raw = saturated_blocks(qtype, 40, 1024)
    got = ops.dequantize(torch.from_numpy(raw), int(qtype), 1024).numpy()
    np.testing.assert_array_equal(got, gguf.quants.dequantize(raw, qtype))


@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_saturated_blocks_multiply_within_accum_bound(ops, isa: str, qtype: Q) -> None:
    k = 1024
    raw = saturated_blocks(qtype, 40, k)
    x = q8_exact(20, k, np.random.default_rng(int(qtype)), full=True)  # a group of 16 rows, 4 more
    got = ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k)
    assert torch.isfinite(got).all()
    assert_within_accum_bound(got, x, raw, qtype)


@pytest.mark.parametrize("rows, superblocks", [(1, 53), (16, 7), (45, 5)])
@pytest.mark.parametrize("qtype", KQUANTS, ids=lambda t: t.name)
def test_long_rows_split_into_k_chunks(ops, isa: str, qtype: Q, rows: int, superblocks: int) -> None:
    k = 256 * superblocks
    rng = np.random.default_rng(rows)
    raw = random_byte_blocks(qtype, 9, k, rng)
    x = q8_exact(rows, k, rng)
    assert_within_accum_bound(ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k), x, raw, qtype)
