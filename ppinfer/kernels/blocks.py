"""Checks on stored GGUF blocks before a kernel multiplies them in place.

A dequantized weight shows a bad scale as NaNs in the logits; a weight that stays quantized
must be checked when it is loaded, so a corrupt file fails with the tensor's name.
"""

from __future__ import annotations

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as Q

# Byte offsets of the fp16 scale fields inside one block, per type (ggml's block layouts).
SCALE_OFFSETS: dict[Q, tuple[int, ...]] = {
    Q.Q4_0: (0,), Q.Q4_1: (0, 2), Q.Q5_0: (0,), Q.Q5_1: (0, 2), Q.Q8_0: (0,),
    Q.Q2_K: (80, 82), Q.Q3_K: (108,), Q.Q4_K: (0, 2), Q.Q5_K: (0, 2), Q.Q6_K: (208,),
    Q.MXFP4: (),  # its e8m0 scale byte decodes to a finite power of two whatever its value
}


def nonfinite_scale_block(raw: np.ndarray, qtype: Q) -> int | None:
    """Index of the first block of `raw` (rows of stored blocks, uint8) whose fp16 scales are
    not finite, or None. Types without an entry in SCALE_OFFSETS are not checked."""
    offsets = SCALE_OFFSETS.get(qtype)
    if offsets is None:
        return None
    block_bytes = GGML_QUANT_SIZES[qtype][1]
    blocks = raw.reshape(-1, block_bytes)  # [n_blocks, block_bytes]
    for offset in offsets:
        scales = np.ascontiguousarray(blocks[:, offset : offset + 2]).view(np.float16)  # [n_blocks, 1]
        bad = np.flatnonzero(~np.isfinite(scales))
        if bad.size:
            return int(bad[0])
    return None
