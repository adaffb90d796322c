"""Linear layers whose GGUF weights stay in their stored blocks on the CPU.

`BlockLinear` keeps a weight as the file's bytes ([out, bytes_per_row] uint8) and multiplies
it in place with the C++ block kernels (`ppinfer.kernels.build`): a 4-bit weight takes about
a seventh of its float32 size in memory, and a decode step reads it at that size. Types with a
packed layout (`packed_types`) may keep the same bytes with 16 rows interleaved block by block
(csrc/packed.cpp), which the decode products stream fastest; the products are the same bits.
`InvariantLinear` is their float counterpart on a quantized stage (csrc/floats.cpp).
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ppinfer.kernels import build


def packed_types(runnable: bool = False) -> frozenset[GGMLQuantizationType]:
    """The types whose rows the kernels can interleave 16 at a time (csrc/packed.cpp); with
    `runnable`, those whose packed products have a kernel on the active instruction set."""
    if build.unavailable_reason() is not None:
        return frozenset()
    return frozenset(GGMLQuantizationType(t) for t in build.ops().packed_qtypes(runnable))


def supported_types() -> tuple[GGMLQuantizationType, ...]:
    """The GGUF types the CPU block kernels multiply (none where they are unavailable)."""
    if build.unavailable_reason() is not None:
        return ()
    return tuple(GGMLQuantizationType(t) for t in build.ops().qtypes())


class BlockLinear(nn.Module):
    """y = x @ W.T + bias with W held as GGUF blocks.

    `w` is [out_features, bytes_per_row] uint8, the row's blocks byte for byte as stored, and is
    only read (a view into a memory-mapped file will do): the module copies the blocks into new
    memory, on huge pages where Linux grants them (`empty_on_huge_pages`), or with `packed` (one
    of `packed_types`) into the packed layout, the same bytes plus the zero rows that fill the
    last group of 16. `forward` takes x [..., in_features] in float32 or bfloat16 and returns
    [..., out_features] in x's dtype.
    """

    def __init__(
        self,
        w: torch.Tensor,
        qtype: GGMLQuantizationType,
        in_features: int,
        bias: torch.Tensor | None = None,
        packed: bool = False,
    ) -> None:
        super().__init__()
        qtype = GGMLQuantizationType(qtype)
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        if w.dtype != torch.uint8 or w.dim() != 2 or w.device.type != "cpu":
            raise ValueError(
                f"BlockLinear: w must be a 2-D uint8 CPU tensor, got {w.dtype} {tuple(w.shape)} on {w.device}"
            )
        if in_features <= 0 or in_features % block_elems:
            raise ValueError(
                f"BlockLinear: in_features={in_features} is not a multiple of {qtype.name}'s {block_elems}-value blocks"
            )
        row_bytes = in_features // block_elems * block_bytes
        if w.shape[1] != row_bytes:
            raise ValueError(
                f"BlockLinear: w has {w.shape[1]} bytes per row; {in_features} {qtype.name} values take {row_bytes}"
            )
        if packed and qtype not in packed_types():
            raise ValueError(f"BlockLinear: {qtype.name} has no packed layout")
        self.qtype = qtype
        self._type_id = int(qtype)
        self.in_features = in_features
        self.out_features = w.shape[0]
        self.packed = packed
        ops = build.ops()
        if packed:
            w = ops.pack_rows(w, self._type_id, in_features)  # [ceil(out_features / 16), 16 * row_bytes]
        else:
            w = ops.empty_on_huge_pages(list(w.shape)).copy_(w)  # a decode step streams it: 2 MiB pages
        self.register_buffer("w", w)  # [out_features, row_bytes], or packed as above (on huge pages)
        if bias is not None:
            bias = bias.detach().to(torch.float32).contiguous()  # [out_features]; bfloat16 works too
        self.register_buffer("bias", bias)
        self._matmul = ops.block_matmul.default
        self._packed_matmul = ops.packed_matmul.default

    @property
    def nbytes(self) -> int:
        """Resident bytes: the stored blocks and the bias."""
        bias = self.bias.numel() * self.bias.element_size() if self.bias is not None else 0
        return self.w.numel() + bias

    def rows(self) -> torch.Tensor:
        """The weight's blocks row by row, [out_features, row_bytes] uint8, as the file stores them."""
        if not self.packed:
            return self.w
        return build.ops().unpack_rows(self.w, self._type_id, self.in_features, self.out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed:
            return self._packed_matmul(x, self.w, self._type_id, self.in_features, self.out_features, self.bias)
        return self._matmul(x, self.w, self._type_id, self.in_features, self.bias)  # [..., out_features]

    def extra_repr(self) -> str:
        bias = self.bias is not None
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, qtype={self.qtype.name}, "
            f"bias={bias}, packed={self.packed}"
        )


class InvariantLinear(nn.Module):
    """y = x @ W.T + bias for a float32 weight, every output one fixed chain (csrc/floats.cpp):
    a row's result does not depend on the rows beside it, as a float GEMM's does (its blocking
    follows the row count). A quantized stage's float weights use it (MoE routers, a DeepSeek
    file's assembled decompression, F16 or F32 tensors, types without a kernel), so the stage
    stays batch-invariant; within 15% of torch's GEMM for prefill, faster for one row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = nn.Parameter(weight.float().contiguous(), requires_grad=False)  # [out, in]
        self.bias = None if bias is None else nn.Parameter(bias.float().contiguous(), requires_grad=False)
        self._matmul = build.ops().float_matmul.default

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] float32 -> [..., out]."""
        return self._matmul(x, self.weight, self.bias)
