"""Expert weights of a Mixture-of-Experts layer kept as GGUF blocks on the CPU.

A 3-D expert tensor (`ffn_*_exps`, [n_expert, out, in]) is held as the file's bytes,
[n_expert, out, bytes_per_row] uint8. `BlockExperts(x, counts)` takes the rows of a layer's
tokens grouped by expert and multiplies each group by its expert's blocks alone, all in one
kernel call: a decode step reads only the chosen experts' blocks, a prefill chunk costs one
product per active expert, and the threads split every active expert's weight rows at once.
"""

from __future__ import annotations

import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn

from ppinfer.kernels import build


class BlockExperts(nn.Module):
    """y = x @ W[e].T for one expert e of W [n_expert, out_features, in_features] in blocks.

    `w` is [n_expert, out_features, bytes_per_row] uint8 and is only read (a view into a
    memory-mapped file will do): the module copies the blocks into new memory on huge pages where
    Linux grants them, with `packed` each expert's rows 16 interleaved
    (`ppinfer.kernels.cpu.packed_types`), the same bits out."""

    def __init__(self, w: torch.Tensor, qtype: GGMLQuantizationType, in_features: int, packed: bool = False) -> None:
        super().__init__()
        qtype = GGMLQuantizationType(qtype)
        block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
        if w.dtype != torch.uint8 or w.dim() != 3 or w.device.type != "cpu":
            raise ValueError(
                f"BlockExperts: w must be a 3-D uint8 CPU tensor, got {w.dtype} {tuple(w.shape)} on {w.device}"
            )
        if in_features <= 0 or in_features % block_elems or w.shape[2] != in_features // block_elems * block_bytes:
            raise ValueError(
                f"BlockExperts: {w.shape[2]} bytes per row do not hold {in_features} {qtype.name} values"
            )
        self.qtype = qtype
        self._type_id = int(qtype)
        self.in_features = in_features
        self.n_expert, self.out_features = w.shape[0], w.shape[1]
        self.packed = packed
        ops = build.ops()
        if packed:
            if int(qtype) not in ops.packed_qtypes():
                raise ValueError(f"BlockExperts: {qtype.name} has no packed layout")
            first = ops.pack_rows(w[0], self._type_id, in_features)
            packed_w = ops.empty_on_huge_pages([self.n_expert, *first.shape])
            packed_w[0] = first
            for e in range(1, self.n_expert):
                packed_w[e] = ops.pack_rows(w[e], self._type_id, in_features)
            w = packed_w
        else:
            w = ops.empty_on_huge_pages(list(w.shape)).copy_(w)  # a decode step streams it: 2 MiB pages
        # [n_expert, out_features, row_bytes], or [n_expert, ceil(out_features / 16), 16 * row_bytes] packed
        self.register_buffer("w", w)
        self._matmul = ops.experts_matmul.default
        self._packed_matmul = ops.packed_experts_matmul.default

    @property
    def nbytes(self) -> int:
        """Resident bytes: every expert's stored blocks."""
        return self.w.numel()

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, in_features], rows grouped by expert (counts [n_expert] int64 rows each, in
        expert order) -> [M, out_features] in x's dtype, each row times its expert's weights."""
        if self.packed:
            return self._packed_matmul(x, self.w, self._type_id, self.in_features, self.out_features, counts)
        return self._matmul(x, self.w, self._type_id, self.in_features, counts)

    def extra_repr(self) -> str:
        return (
            f"n_expert={self.n_expert}, in_features={self.in_features}, out_features={self.out_features}, "
            f"qtype={self.qtype.name}, packed={self.packed}"
        )
