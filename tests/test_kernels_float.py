"""`float_matmul` (csrc/floats.cpp, `InvariantLinear`) and the fused `sigmoid`: the float
products and the one transcendental of a quantized stage that torch would round differently
depending on how many rows share them.

- Against float64 on shapes that exercise every tile (rows and outputs not multiples of the
  4 x 3 tiles, k not a multiple of 8), on every instruction set the CPU has.
- Batch invariance: each row's outputs are the same bits computed alone, among 37 rows, and
  from a slice of a larger tensor; the same for `sigmoid` at any position.
- Bad shapes name the value.
"""

from __future__ import annotations

import pytest
import torch

from ppinfer.kernels import fused
from ppinfer.kernels.cpu import InvariantLinear


@pytest.mark.parametrize("shape", [(1, 64, 2048), (37, 67, 130), (5, 3, 7), (9, 1, 16)])
def test_float_matmul_matches_float64(ops, isa: str, shape: tuple[int, int, int]) -> None:
    m, n, k = shape
    g = torch.Generator().manual_seed(m * n + k)
    x, w, b = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g), torch.randn(n, generator=g)
    got = ops.float_matmul(x, w, b)  # [m, n]
    expected = x.double() @ w.double().T + b.double()
    torch.testing.assert_close(got.double(), expected, atol=2e-5 * k**0.5, rtol=1e-5)
    torch.testing.assert_close(ops.float_matmul(x, w, None).double(), expected - b.double(), atol=2e-5 * k**0.5,
                               rtol=1e-5)


def test_a_row_is_the_same_bits_alone_and_among_others(ops, isa: str) -> None:
    g = torch.Generator().manual_seed(7)
    x, w, b = torch.randn(40, 130, generator=g), torch.randn(67, 130, generator=g), torch.randn(67, generator=g)
    together = ops.float_matmul(x[:37], w, b)  # 37 rows: 9 tiles of 4 and one row left over
    alone = torch.cat([ops.float_matmul(x[i : i + 1], w, b) for i in range(37)])
    shifted = ops.float_matmul(x[3:40], w, b)  # the same rows at other places in the tiles
    assert torch.equal(together, alone)
    assert torch.equal(together[3:], shifted[:34])
    layer = InvariantLinear(w, b)
    assert torch.equal(layer(x[None, :37]), together[None])


def test_sigmoid_is_the_same_bits_wherever_an_element_sits(ops) -> None:
    x = torch.randn(40, 8, generator=torch.Generator().manual_seed(3)) * 6
    together = fused.sigmoid_op()(x)
    alone = torch.cat([fused.sigmoid_op()(x[i : i + 1]) for i in range(40)])
    assert torch.equal(together, alone)
    torch.testing.assert_close(together.double(), torch.sigmoid(x.double()), atol=1e-6, rtol=1e-6)


def test_float_matmul_names_bad_shapes(ops) -> None:
    x, w = torch.randn(2, 8), torch.randn(3, 8)
    with pytest.raises(RuntimeError, match=r"w must be float32 \[n, k=8\], got Float \[3, 9\]"):
        ops.float_matmul(x, torch.randn(3, 9), None)
    with pytest.raises(RuntimeError, match=r"bias must be float32 \[3\]"):
        ops.float_matmul(x, w, torch.randn(4))
    with pytest.raises(RuntimeError, match="x must be a float32 CPU tensor"):
        ops.float_matmul(x.double(), w, None)
