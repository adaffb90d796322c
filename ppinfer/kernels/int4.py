"""Q4_0 / Q4_1 / Q4_K weights through torch's int4 "tinygemm" matmul.

torch's int4 kernels (`aten._weight_int4pack_mm` on CUDA, `aten._weight_int4pack_mm_for_cpu`
on the CPU) take a weight `[N, K]` of 4-bit values q in 0..15, split along K into groups that
each carry a scale and a zero, and compute

    w = (q - 8) * scale + zero

(read in torch's int4mm.cu / int4mm_kernel.cpp, checked by experiment: scale 1 and zero 8
give back q). Each 32-value GGUF block (each 32-value sub-block of a Q4_K super-block) is
exactly one such group of 32, so the file's nibbles are used as they are:

    Q4_0  d*(q-8)           scale d,        zero 0
    Q4_1  d*q + m           scale d,        zero m + 8d
    Q4_K  d*sc_j*q - dmin*m_j   scale D = d*sc_j, zero 8D - dmin*m_j (D, dmin*m_j in float32)

The kernels take scales and zeros as one tensor `[K/32, N, 2]` ([..., 0] scale, [..., 1]
zero) in the activation dtype: bfloat16 here, the only dtype the CUDA kernel accepts.

Packed layouts (torch 2.5 and later): CUDA's `_convert_weight_to_int4pack` takes uint8
`[N, K/2]` holding q[2j] in the high nibble and q[2j+1] in the low one, and needs N a
multiple of 8; the CPU's `_convert_weight_to_int4pack_for_cpu` takes int32 `[N, K]` and needs
N a multiple of 16. Both lay rows out in independent tiles of 8 / 64 rows, so a matrix can be
packed in row chunks and the chunks concatenated.
"""

from __future__ import annotations

import numpy as np
import torch
from gguf import GGML_QUANT_SIZES, GGMLQuantizationType
from torch import nn
from torch.torch_version import TorchVersion

GROUP = 32  # values per int4 group: one GGUF block, or one Q4_K sub-block
_INT4_TYPES = (GGMLQuantizationType.Q4_0, GGMLQuantizationType.Q4_1, GGMLQuantizationType.Q4_K)
_ROW_MULTIPLE = {"cuda": 8, "cpu": 16}  # N must be a multiple of this for each kernel
_PACK_CHUNK_ROWS = 4096  # rows unpacked and packed at a time (a multiple of both tile heights)


def supported_int4_types() -> tuple[GGMLQuantizationType, ...]:
    """The GGUF types whose blocks map exactly onto torch's int4 groups."""
    return _INT4_TYPES


def int4_available(device: torch.device | str) -> bool:
    """Whether this torch build can run Int4Linear on `device` (CUDA: compute capability 8.0
    or later and torch >= 2.5, whose packing op takes uint8; CPU: torch >= 2.6's _for_cpu ops)."""
    device = torch.device(device)
    if device.type == "cuda":
        return (
            torch.cuda.is_available()
            and TorchVersion(torch.__version__) >= (2, 5)
            and torch.cuda.get_device_capability(device) >= (8, 0)
        )
    if device.type == "cpu":
        return hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu")
    return False


def _fp16(pair: torch.Tensor) -> torch.Tensor:
    """[..., 2] uint8 little-endian IEEE halves -> [...] float32 (exact)."""
    return pair.contiguous().view(torch.float16).squeeze(-1).float()


def _q4_0(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [N, nb, 18]: d fp16, 16 bytes (low nibbles are values 0..15, high 16..31)."""
    d = _fp16(blocks[..., 0:2])  # [N, nb]
    qs = blocks[..., 2:18]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [N, nb, 32]
    return q, d, torch.zeros_like(d)


def _q4_1(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [N, nb, 20]: d fp16, m fp16, 16 bytes of nibbles as in Q4_0."""
    d = _fp16(blocks[..., 0:2])
    m = _fp16(blocks[..., 2:4])
    qs = blocks[..., 4:20]
    q = torch.cat((qs & 0x0F, qs >> 4), dim=-1)  # [N, nb, 32]
    return q, d, m + 8.0 * d


def _q4_k_scales(packed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """packed [N, nb, 12] -> 6-bit (sc, m) [N, nb, 8] each, as llama.cpp's get_scale_min_k4:
    sub-blocks 0..3 sit in the low 6 bits of bytes 0..3 (sc) and 4..7 (m); sub-blocks 4..7
    take their low 4 bits from bytes 8..11 and their top 2 bits from bytes 0..7's top bits."""
    lo_sc, lo_m, mixed = packed[..., 0:4], packed[..., 4:8], packed[..., 8:12]
    sc = torch.cat((lo_sc & 63, (mixed & 0x0F) | ((lo_sc >> 6) << 4)), dim=-1)
    m = torch.cat((lo_m & 63, (mixed >> 4) | ((lo_m >> 6) << 4)), dim=-1)
    return sc, m


def _q4_k(blocks: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """blocks [N, nb, 144]: d fp16, dmin fp16, 12 bytes of scales, 128 bytes of nibbles (each
    32-byte run holds sub-block 2c in its low nibbles and sub-block 2c+1 in its high ones)."""
    n, nb = blocks.shape[:2]
    d = _fp16(blocks[..., 0:2])[..., None]  # [N, nb, 1]
    dmin = _fp16(blocks[..., 2:4])[..., None]
    sc, m = _q4_k_scales(blocks[..., 4:16])
    qs = blocks[..., 16:144].reshape(n, nb, 4, 1, 32)
    q = torch.cat((qs & 0x0F, qs >> 4), dim=3)  # [N, nb, 4, 2, 32]
    scale = d * sc.float()  # [N, nb, 8], exact: 11-bit x 6-bit significands
    offset = dmin * m.float()
    return q.reshape(n, nb * 8, 32), scale, 8.0 * scale - offset


_UNPACK = {
    GGMLQuantizationType.Q4_0: _q4_0,
    GGMLQuantizationType.Q4_1: _q4_1,
    GGMLQuantizationType.Q4_K: _q4_k,
}


def int4_groups(
    raw: np.ndarray | torch.Tensor, qtype: GGMLQuantizationType, k: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GGUF rows -> torch's int4 group form, on raw's device (numpy input: the CPU).

    raw: uint8 `[N, row_bytes]`, each row `k` values stored as consecutive blocks.
    Returns q uint8 `[N, k]` (0..15), scales and zeros float32 `[N, k/32]`, such that
    `(q - 8) * scale + zero` in float32 is the GGUF value: bit for bit for Q4_0, and for
    Q4_1 / Q4_K wherever the zero (m + 8d, 8D - dmin*m_j) is exact in float32, else within
    that zero's own rounding (half an ulp of the zero).
    """
    if qtype not in _UNPACK:
        raise ValueError(f"{qtype.name} has no int4 form (supported: {[t.name for t in _INT4_TYPES]})")
    block_elems, block_bytes = GGML_QUANT_SIZES[qtype]
    rows = torch.from_numpy(np.array(raw)) if isinstance(raw, np.ndarray) else raw  # a writable copy
    if rows.dtype != torch.uint8 or rows.dim() != 2:
        raise ValueError(f"expected uint8 [N, row_bytes] rows, got {rows.dtype} {tuple(rows.shape)}")
    if k % block_elems or rows.shape[1] != k // block_elems * block_bytes:
        raise ValueError(
            f"{qtype.name} rows of {k} values take {k // block_elems * block_bytes} bytes "
            f"(k a multiple of {block_elems}), got {rows.shape[1]}"
        )
    n = rows.shape[0]
    q, scales, zeros = _UNPACK[qtype](rows.reshape(n, k // block_elems, block_bytes))
    return q.reshape(n, k), scales.reshape(n, k // GROUP), zeros.reshape(n, k // GROUP)


def _inner_k_tiles(k: int) -> int:
    """CUDA packs 2, 4 or 8 k-tiles of 16 together; the widest that divides k loads fastest."""
    return next(t for t in (8, 4, 2) if k % (16 * t) == 0)


def _pad_rows(t: torch.Tensor, multiple: int) -> torch.Tensor:
    """Zero rows appended up to a multiple of `multiple` rows (a pad row has scale 0 and
    zero 0, so it reads as 0 whatever its q)."""
    missing = -t.shape[0] % multiple
    if missing == 0:
        return t
    return torch.cat((t, t.new_zeros((missing, *t.shape[1:]))))


def _pack(q: torch.Tensor, k: int) -> torch.Tensor:
    """q uint8 [n, k] (n a multiple of the device's row tile) -> the kernel's packed weight."""
    if q.device.type == "cuda":
        pairs = q.reshape(q.shape[0], k // 2, 2)
        high_even = (pairs[..., 0] << 4) | pairs[..., 1]  # [n, k/2]: q[2j] high, q[2j+1] low
        return torch.ops.aten._convert_weight_to_int4pack(high_even.contiguous(), _inner_k_tiles(k))
    return torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32), 2)


class Int4Linear(nn.Module):
    """y = x W^T (+ b) with W a Q4_0 / Q4_1 / Q4_K GGUF weight run through torch's int4 kernel.

    Packed once at construction, on `device` (CUDA, or the CPU for tests and measurement);
    only the packed int4 weight (K/2 bytes a row) and the scales and zeros `[K/32, N, 2]` in
    bfloat16 are kept, since bfloat16 is what the CUDA kernel takes. That rounding is the
    precision cost: scale and zero lose their low bits (relative error up to 2^-8 each, so a
    weight errs by up to 2^-8 (8|scale| + |zero|)), activations are rounded to bfloat16 on the
    way in, and the output comes back in bfloat16 before it is cast to x's dtype. The CUDA
    kernel also rounds each dequantized weight to bfloat16; the CPU one keeps it in float32.

    The packed weight is device-specific (the CPU layout even depends on the vector width
    torch dispatched to), so it is a plain attribute, not a buffer that `.to()` would move.
    """

    def __init__(
        self,
        raw: np.ndarray | torch.Tensor,  # uint8 [N, row_bytes]: the tensor's bytes as stored
        qtype: GGMLQuantizationType,
        in_features: int,
        device: torch.device | str,
        bias: torch.Tensor | None = None,
    ) -> None:
        super().__init__()
        device = torch.device(device)
        if not int4_available(device):
            raise ValueError(f"torch {torch.__version__} has no int4 matmul for device {device}")
        self.in_features = in_features
        self.out_features = raw.shape[0]
        self.qtype = qtype
        tile = _ROW_MULTIPLE[device.type]
        packed, scales_and_zeros = [], []
        for start in range(0, self.out_features, _PACK_CHUNK_ROWS):  # only the last chunk pads
            chunk = raw[start:start + _PACK_CHUNK_ROWS]
            chunk = torch.from_numpy(np.array(chunk)) if isinstance(chunk, np.ndarray) else chunk
            q, scales, zeros = int4_groups(chunk.to(device), qtype, in_features)
            packed.append(_pack(_pad_rows(q, tile), in_features))
            group_info = torch.stack((scales, zeros), dim=-1).to(torch.bfloat16)  # [n, K/32, 2]
            scales_and_zeros.append(_pad_rows(group_info, tile))
        self.packed = torch.cat(packed)
        self.scales_and_zeros = torch.cat(scales_and_zeros).transpose(0, 1).contiguous()  # [K/32, N', 2]
        self.bias = bias.to(device) if bias is not None else None

    @property
    def nbytes(self) -> int:
        tensors = [self.packed, self.scales_and_zeros] + ([self.bias] if self.bias is not None else [])
        return sum(t.numel() * t.element_size() for t in tensors)

    def extra_repr(self) -> str:
        return f"{self.qtype.name}, in_features={self.in_features}, out_features={self.out_features}"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., K] (any float dtype) -> [..., N] in x's dtype."""
        flat = x.reshape(-1, self.in_features).to(torch.bfloat16).contiguous()  # [M, K]
        if self.packed.device.type == "cuda":
            y = torch.ops.aten._weight_int4pack_mm(flat, self.packed, GROUP, self.scales_and_zeros)
        else:
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(flat, self.packed, GROUP, self.scales_and_zeros)
        y = y[:, : self.out_features].to(x.dtype)  # [M, N]
        if self.bias is not None:
            y = y + self.bias.to(y.dtype)
        return y.reshape(*x.shape[:-1], self.out_features)
