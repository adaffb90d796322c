"""The low-bit kernels (MXFP4, Q2_K, Q3_K: csrc/lowbit.cpp) at the edges that
tests/test_kernels.py, which runs every supported type on random blocks, leaves to chance:

(a) the three types are among the supported ones, and gpt-oss's MXFP4 experts are among the
    types whose 3-D expert tensors stay in their blocks;
(b) saturated blocks: every code at its largest or smallest value (MXFP4: +-12, the unsigned
    code 24 the SIMD dots use at its largest), every scale and min at its extremes, the fp16
    fields (Q2_K: d, dmin; Q3_K: d) from +-65504 down to subnormal and MXFP4's power-of-two
    scale from 2^-129 up, multiplied by activations that quantize to +-127 everywhere, through
    every way block_matmul splits x rows: an int16 overflow or saturation in the integer sums
    would show far above the bound;
(c) (in tests/test_kernels.py, for every type) dequantization equals gguf-py's bit for bit and
    a row's result does not depend on the rows beside it.

Activations quantize exactly (2^e * q, |q| = 127), so the only error left is the float
accumulation, `accum` in the docstring of tests/test_kernels.py.
"""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q
from test_kernels import accum_bound, offsets
from test_kernels_kquants import patterned_blocks, q8_exact

from ppinfer.kernels import cpu, select

LOWBIT = (Q.MXFP4, Q.Q2_K, Q.Q3_K)
# ggml's block layouts: the byte ranges of the codes, the range of the scale bytes with the
# patterns they take, and the offsets of the fp16 fields.
CODES = {Q.MXFP4: ((1, 17),), Q.Q2_K: ((16, 80),), Q.Q3_K: ((0, 96),)}
# Code bytes: MXFP4 0x77 = 12 in both nibbles (the unsigned code 24), 0xff = -12, 0x88 = -0;
# Q2_K 0xff = 3 everywhere; Q3_K 0xff = 3 (high bits set), 0x00 = -4.
CODE_PATTERNS = {Q.MXFP4: (0x77, 0xFF, 0x88), Q.Q2_K: (0x00, 0xFF), Q.Q3_K: (0x00, 0xFF)}
SCALES = {Q.MXFP4: (0, 1), Q.Q2_K: (0, 16), Q.Q3_K: (96, 108)}
# MXFP4: e = 0 (2^-129), 1, 128 (1), 140. Q2_K: scale and min 15, scale 15 with min 0, both 0.
# Q3_K: every six-bit scale 63 (31 after the offset), 0 (-32), and 0x20 patterns (low 0, top 2).
SCALE_PATTERNS = {
    Q.MXFP4: (b"\x00", b"\x01", b"\x80", b"\x8c"),
    Q.Q2_K: (b"\xff" * 16, b"\x0f" * 16, b"\x00" * 16),
    Q.Q3_K: (b"\xff" * 12, b"\x00" * 12, b"\x00" * 8 + b"\xaa" * 4),
}
HALVES = {Q.MXFP4: (), Q.Q2_K: (80, 82), Q.Q3_K: (108,)}


def saturated_blocks(qtype: Q, n: int, k: int) -> np.ndarray:
    """[n, row_bytes] uint8: every block one code pattern, one scale pattern and extreme fp16
    fields, cycling through all combinations."""
    return patterned_blocks(qtype, n, k, CODES, CODE_PATTERNS, SCALES, SCALE_PATTERNS, HALVES)


def test_lowbit_types_are_supported_and_mxfp4_experts_stay_in_blocks() -> None:
    assert set(LOWBIT) <= set(cpu.supported_types())
    backend = select.block_backend(torch.device("cpu"))
    assert all(backend.supports_experts(t) for t in LOWBIT)


@pytest.mark.parametrize("qtype", LOWBIT, ids=lambda t: t.name)
def test_saturated_blocks(ops, isa: str, qtype: Q) -> None:
    block_elems = GGML_QUANT_SIZES[qtype][0]
    k = block_elems * (45 if block_elems == 32 else 5)
    n = 40
    raw = saturated_blocks(qtype, n, k)
    w = gguf.quants.dequantize(raw, qtype).astype(np.float64)
    got_dequant = ops.dequantize(torch.from_numpy(raw), int(qtype), k).numpy()
    np.testing.assert_array_equal(got_dequant, gguf.quants.dequantize(raw, qtype))
    assert np.isfinite(w).all()
    o = offsets(raw, qtype)
    xs = q8_exact(45, k, np.random.default_rng(int(qtype)), full=True)  # all +127, all -127, random signs
    for rows in (1, 2, 5, 13, 16, 45):  # weight rows, pair tile, 8-row tiles, 16-row tiles
        x = xs[:rows]
        got = ops.block_matmul(x, torch.from_numpy(raw), int(qtype), k).double().numpy()
        err = np.abs(got - x.double().numpy() @ w.T)
        bound = accum_bound(x, w, o)
        worst = np.unravel_index(np.argmax(err - bound), err.shape)
        assert (err <= bound).all(), f"M={rows}: error {err[worst]} > bound {bound[worst]} at {worst}"
