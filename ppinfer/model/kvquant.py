"""The KV cache's storage types (`runtime.kv_dtype`): a float dtype, or `Q8_0` blocks.

A Q8_0 cache keeps each slot's D values (D a multiple of 32) as D / 32 blocks in GGUF's Q8_0
layout: a float16 scale d followed by 32 int8 values q, x ~= d * q, 34 bytes per 32 values
(0.27 of float32's). The fused decode attention reads the blocks directly; the other paths
(prefill chunks, GPUs, explicit attention) quantize what they write and widen what they read
with the two functions here, which round exactly as the fused op does.
"""

from __future__ import annotations

import torch

Q8_0 = "q8_0"
"""The `runtime.kv_dtype` name of Q8_0 blocks."""

KVType = torch.dtype | str
"""A KV cache's storage type: a torch float dtype, or `Q8_0`."""

Q8_VALUES = 32
"""Values per Q8_0 block."""
Q8_BYTES = 34
"""Bytes per Q8_0 block: the float16 scale and 32 int8 values."""


def storage(kv: KVType, head_dim: int) -> tuple[torch.dtype, int]:
    """The pool tensor's dtype and last dim for heads of `head_dim` values stored as `kv`."""
    if kv == Q8_0:
        if head_dim % Q8_VALUES:
            raise ValueError(f"runtime.kv_dtype=q8_0: head size {head_dim} is not a multiple of {Q8_VALUES}")
        return torch.uint8, head_dim // Q8_VALUES * Q8_BYTES
    if not isinstance(kv, torch.dtype) or not kv.is_floating_point:
        raise ValueError(f"KV storage type {kv!r}: must be a float dtype or {Q8_0!r}")
    return kv, head_dim


def bytes_per_value(kv: KVType) -> float:
    """Bytes one cached value takes (scales included)."""
    return Q8_BYTES / Q8_VALUES if kv == Q8_0 else torch.finfo(kv).bits / 8


def quantize_q8_0(x: torch.Tensor) -> torch.Tensor:
    """x [..., D] (D a multiple of 32) -> uint8 [..., D / 32 * 34] Q8_0 blocks: per 32 values
    d = max |x| / 127 and q = round(x / d) (halves away from zero), d stored as float16."""
    *lead, d = x.shape
    blocks = x.float().reshape(*lead, d // Q8_VALUES, Q8_VALUES)  # [..., nb, 32]
    scale = blocks.abs().amax(dim=-1, keepdim=True) / 127.0  # [..., nb, 1]
    inverse = torch.where(scale == 0, 0.0, 1.0 / scale)
    scaled = blocks * inverse
    q = (scaled.sign() * (scaled.abs() + 0.5).floor()).to(torch.int8)  # [..., nb, 32]
    packed = torch.cat((scale.half().view(torch.uint8), q.view(torch.uint8)), dim=-1)  # [..., nb, 34]
    return packed.reshape(*lead, d // Q8_VALUES * Q8_BYTES)


def dequantize_q8_0(packed: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 [..., nb * 34] Q8_0 blocks -> [..., nb * 32] values d * q in `dtype`."""
    *lead, r = packed.shape
    blocks = packed.reshape(*lead, r // Q8_BYTES, Q8_BYTES)  # [..., nb, 34]
    scale = blocks[..., :2].contiguous().view(torch.float16).float()  # [..., nb, 1]
    q = blocks[..., 2:].contiguous().view(torch.int8).float()  # [..., nb, 32]
    return (scale * q).reshape(*lead, r // Q8_BYTES * Q8_VALUES).to(dtype)
