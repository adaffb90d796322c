"""GGUF Q4_0 / Q4_1 / Q4_K weights as torch int4 groups (ppinfer.kernels.int4).

(a) The unpacking is exact: `(q - 8) * scale + zero` in float32 gives gguf-py's dequantized
    values bit for bit, except where the zero (Q4_1: m + 8d, Q4_K: 8*d*sc - dmin*m) is not
    representable in float32; there it differs by that one rounding (asserted below as
    half an ulp of the zero plus one ulp of the value). Q4_0's zero is 0: bitwise everywhere.
(b) torch's CPU int4 kernel fed those groups matches x W^T computed from the dequantized
    weights in float64, within the bound that its bfloat16 activations, scales and zeros
    imply (`kernel_bound`); so does Int4Linear on the CPU.
(c) The same on CUDA (skipped without a GPU of compute capability 8.0+).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QT
from gguf import quants

from ppinfer.kernels import int4
from ppinfer.kernels.int4 import Int4Linear, int4_available, int4_groups, supported_int4_types

needs_cpu_int4 = pytest.mark.skipif(
    not int4_available("cpu"),
    reason=f"torch {torch.__version__} has no CPU int4 matmul (_weight_int4pack_mm_for_cpu, torch >= 2.6)",
)
needs_cuda_int4 = pytest.mark.skipif(
    not int4_available("cuda"), reason="needs a CUDA GPU of compute capability >= 8.0 and torch >= 2.5"
)

U_BF16 = 2.0**-8  # bfloat16 keeps 8 significant bits: rounding errs by at most 2^-8 relative
U_F32 = 2.0**-24


def _fp16_field(raw: np.ndarray, block_bytes: int, offset: int) -> np.ndarray:
    """The fp16 at `offset` of every block of raw [N, row_bytes] -> float32 [N, blocks]."""
    blocks = raw.reshape(raw.shape[0], -1, block_bytes)
    return np.ascontiguousarray(blocks[..., offset:offset + 2]).view(np.float16)[..., 0].astype(np.float32)


def legacy_rows(qtype: QT, n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_0 / Q4_1 rows quantized by gguf-py from shifted, scaled normal data. Every other
    row is made non-negative with a tiny block minimum next to a wide range, so Q4_1's zero
    m + 8d needs more than float32's 24 bits in some blocks."""
    w = (rng.standard_normal((n, k)) + rng.uniform(-2, 2, (n, 1))) * rng.uniform(0.05, 3, (n, 1))
    wide = rng.uniform(0, 40, (n // 2, k))
    wide[:, ::32] = rng.uniform(1e-6, 1e-5, (n // 2, k // 32))
    w[::2] = wide
    return quants.quantize(w.astype(np.float32), qtype)


def q4_k_rows(n: int, k: int, rng: np.random.Generator) -> np.ndarray:
    """Q4_K rows made byte-wise: d and dmin log-uniform over [1e-4, 0.1] (so d*sc and
    dmin*m often differ by more than float32 can hold in one sum), random 6-bit scales and
    mins (any 12 bytes are valid), random nibbles."""
    nb = k // 256
    blocks = rng.integers(0, 256, (n, nb, 144), dtype=np.uint8)
    for offset in (0, 2):  # d, dmin
        halves = np.exp(rng.uniform(np.log(1e-4), np.log(0.1), (n, nb))).astype(np.float16)
        blocks[..., offset:offset + 2] = halves[..., None].view(np.uint8)
    return blocks.reshape(n, -1)


def make_rows(qtype: QT, n: int, k: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return q4_k_rows(n, k, rng) if qtype == QT.Q4_K else legacy_rows(qtype, n, k, rng)


def group_params(raw: np.ndarray, qtype: QT) -> tuple[np.ndarray, np.ndarray]:
    """Each group's scale (float32) and exact zero (float64) [N, K/32], from the block fields
    as gguf-py reads them and the mapping value = (q - 8) * scale + zero."""
    if qtype == QT.Q4_0:
        d = _fp16_field(raw, 18, 0)
        return d, np.zeros(d.shape)
    if qtype == QT.Q4_1:
        d, m = _fp16_field(raw, 20, 0), _fp16_field(raw, 20, 2)
        return d, m.astype(np.float64) + 8 * d.astype(np.float64)
    n = raw.shape[0]
    d, dmin = _fp16_field(raw, 144, 0), _fp16_field(raw, 144, 2)  # [N, nb]
    sc, m = quants.Q4_K.get_scale_min(raw.reshape(-1, 144)[:, 4:16])  # [N*nb, 8] each
    scale = d[..., None] * sc.reshape(n, -1, 8).astype(np.float32)  # exact in float32
    offset = dmin[..., None].astype(np.float64) * m.reshape(n, -1, 8)
    return scale.reshape(n, -1), (8 * scale.astype(np.float64) - offset).reshape(n, -1)


def per_value(groups: np.ndarray) -> np.ndarray:
    """[N, K/32] -> [N, K]."""
    return np.repeat(groups, 32, axis=1)


@pytest.mark.parametrize("qtype", supported_int4_types(), ids=lambda t: t.name)
def test_groups_reproduce_gguf_values(qtype: QT) -> None:
    k = 512
    raw = make_rows(qtype, 64, k)
    reference = quants.dequantize(raw, qtype)  # [N, K] float32
    q, scales, zeros = (t.numpy() for t in int4_groups(raw, qtype, k))
    assert q.dtype == np.uint8 and q.shape == reference.shape and q.max() <= 15
    want_scale, exact_zero = group_params(raw, qtype)
    np.testing.assert_array_equal(scales, want_scale)
    np.testing.assert_array_equal(zeros, exact_zero.astype(np.float32))  # one rounding at most

    rebuilt = (q.astype(np.float32) - 8) * per_value(scales) + per_value(zeros)
    zero_is_exact = per_value(zeros.astype(np.float64) == exact_zero)
    np.testing.assert_array_equal(rebuilt[zero_is_exact], reference[zero_is_exact])
    off = ~zero_is_exact
    bound = 0.5 * np.spacing(np.abs(per_value(zeros)[off])) + np.spacing(np.abs(reference[off]))
    assert np.all(np.abs(rebuilt[off] - reference[off]) <= bound)
    if qtype == QT.Q4_0:
        assert zero_is_exact.all()
    else:  # the data must exercise both branches
        assert off.any() and zero_is_exact.any()


def test_groups_from_torch_rows_match_numpy() -> None:
    raw = make_rows(QT.Q4_K, 8, 256)
    from_numpy = int4_groups(raw, QT.Q4_K, 256)
    from_torch = int4_groups(torch.from_numpy(raw), QT.Q4_K, 256)
    for a, b in zip(from_numpy, from_torch):
        assert torch.equal(a, b)


def test_groups_reject_wrong_rows() -> None:
    raw = make_rows(QT.Q4_0, 4, 64)
    with pytest.raises(ValueError, match="take 36 bytes"):
        int4_groups(raw[:, :20], QT.Q4_0, 64)
    with pytest.raises(ValueError, match="Q8_0 has no int4 form"):
        int4_groups(raw, QT.Q8_0, 64)


def kernel_bound(
    x: np.ndarray, w: np.ndarray, scales: np.ndarray, zeros: np.ndarray, y_ref: np.ndarray
) -> np.ndarray:
    """Largest |y - x W^T| [M, N] torch's int4 kernels may give for x [M, K], W [N, K]:
    x is rounded to bf16 (u|x||w|), each group's scale and zero too, so a weight
    (q - 8) * s + z errs by up to u(8|s| + |z|); the CUDA kernel rounds that weight to bf16
    (another u|w|; the CPU one keeps it in float32); products are summed in float32 (K u32
    each) and the sum is rounded to bf16 (u|y|)."""
    per_weight = 2 * np.abs(w) + 8 * np.abs(per_value(scales)) + np.abs(per_value(zeros))  # [N, K]
    spread = np.abs(x).astype(np.float64) @ per_weight.T.astype(np.float64)  # [M, N]
    k = x.shape[1]
    return U_BF16 * (1 + U_BF16) ** 2 * spread + k * U_F32 * spread + U_BF16 * np.abs(y_ref)


def _check_product(y: torch.Tensor, x: np.ndarray, raw: np.ndarray, qtype: QT) -> None:
    """y [M, N] against x [M, K] times gguf-py's dequantized weights, in float64."""
    k = x.shape[1]
    w = quants.dequantize(raw, qtype)
    y_ref = x.astype(np.float64) @ w.T.astype(np.float64)
    _, scales, zeros = (t.numpy() for t in int4_groups(raw, qtype, k))
    error = np.abs(y.double().cpu().numpy() - y_ref)
    assert np.all(error <= kernel_bound(x, w, scales, zeros, y_ref)), f"max error {error.max():.3g}"


@needs_cpu_int4
@pytest.mark.parametrize("qtype", supported_int4_types(), ids=lambda t: t.name)
def test_cpu_kernel_matches_dequantized_product(qtype: QT) -> None:
    n, k = 64, 512
    raw = make_rows(qtype, n, k, seed=1)
    q, scales, zeros = int4_groups(raw, qtype, k)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)
    scales_and_zeros = torch.stack((scales, zeros), dim=-1).transpose(0, 1).contiguous()  # [K/32, N, 2]
    x = np.random.default_rng(2).standard_normal((6, k)).astype(np.float32)
    y = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.from_numpy(x).bfloat16(), packed, 32, scales_and_zeros.bfloat16()
    )
    _check_product(y, x, raw, qtype)


@needs_cpu_int4
@pytest.mark.parametrize("qtype", supported_int4_types(), ids=lambda t: t.name)
def test_cpu_int4_linear(qtype: QT, monkeypatch: pytest.MonkeyPatch) -> None:
    """Packed in chunks of 64 rows, N = 200 padded to 208: the output equals x W^T + b
    within the kernel's bound, in x's dtype and leading shape."""
    monkeypatch.setattr(int4, "_PACK_CHUNK_ROWS", 64)
    n, k = 200, 512
    raw = make_rows(qtype, n, k, seed=3)
    rng = np.random.default_rng(4)
    bias = rng.standard_normal(n).astype(np.float32)
    layer = Int4Linear(raw, qtype, k, "cpu", bias=torch.from_numpy(bias))
    assert layer.nbytes == 208 * k // 2 + (k // 32) * 208 * 2 * 2 + n * 4
    x = rng.standard_normal((2, 5, k)).astype(np.float32)
    y = layer(torch.from_numpy(x))
    assert y.shape == (2, 5, n) and y.dtype == torch.float32
    _check_product(y.reshape(10, n) - torch.from_numpy(bias), x.reshape(10, k), raw, qtype)
    assert layer(torch.from_numpy(x).bfloat16()).dtype == torch.bfloat16


@needs_cuda_int4
@pytest.mark.parametrize("k", [288, 768], ids=["k288", "k768"])  # inner k-tiles 2 and 8
@pytest.mark.parametrize("qtype", supported_int4_types(), ids=lambda t: t.name)
def test_cuda_int4_linear(qtype: QT, k: int) -> None:
    if k % 256 and qtype == QT.Q4_K:
        pytest.skip("Q4_K rows are whole 256-value super-blocks")
    n = 200  # padded to 208 on CUDA
    raw = make_rows(qtype, n, k, seed=5)
    layer = Int4Linear(raw, qtype, k, "cuda")
    assert layer.packed.is_cuda
    for m in (1, 37):  # a single token; several 16-row tiles with a remainder
        x = np.random.default_rng(m).standard_normal((m, k)).astype(np.float32)
        y = layer(torch.from_numpy(x).cuda())
        assert y.dtype == torch.float32 and y.shape == (m, n)
        _check_product(y, x, raw, qtype)
