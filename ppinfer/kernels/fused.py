"""Fused float32 CPU ops for a decoder layer's small steps (csrc/fused.cpp).

A decode step of a small model is bound by per-op host cost, not arithmetic: RMSNorm is five
torch ops, rotary embedding, the KV cache write and attention a dozen more per layer, and the
gated MLP's activation three. These ops do each in one call. They are portable C++ (AVX2 where
the CPU has it), so they serve any CPU wherever the kernel library builds; `available` says
where a stage uses them.
"""

from __future__ import annotations

import torch

from ppinfer.kernels import build

# `attend`'s rotations where n_rot is 0 (q and k come rotated, or have no rotary part).
NO_ROTATION = torch.empty(0)


def available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether the fused ops serve a stage on `device` in `dtype` (float32 on the CPU, with
    the kernel library built)."""
    return device.type == "cpu" and dtype == torch.float32 and build.unavailable_reason() is None


def rms_norm_op():
    """rms_norm(x [..., D], w [D] | [P, D] | None, eps) -> x / sqrt(mean(x^2) + eps) * w."""
    return build.ops().rms_norm.default


def glu_op():
    """glu(h [..., 2F], kind) -> act(gate) * up [..., F]: kind 0 SiLU, 1 tanh-approximated
    GELU, over the fused [gate | up] projection."""
    return build.ops().glu.default


def sigmoid_op():
    """sigmoid(x) float32, element by element in scalar code: an element's result does not
    depend on where it sits in x (torch's vector body and scalar tail round differently)."""
    return build.ops().sigmoid.default


def attend_op():
    """attend(qk [b, T, H + Hkv, D], v [b, T, Hkv, Dv], rot [b, T, n_rot/2, 2], k_pool
    [N, Hkv, BS, D], v_pool [N, Hkv, BS, Dv] (float32, float16 or bfloat16, or Q8_0 blocks),
    table [b, nb], cols [b, T], mask [b, 1, T, n], n_head, n_rot, scale, softcap, sinks [H] | None)
    -> [b, T, H * Dv] float32:
    rotates q and k (n_rot 0: neither), writes k and v at each row's slots `cols` (slot s: block table[row, s // BS],
    offset s % BS), and attends over the rows' slots [0, n) under `mask` (softcap 0: none; a sink
    logit per head joins each softmax, its weight going nowhere). Decode and prefill share its
    arithmetic: a query's result depends only on its visible keys, in order."""
    return build.ops().attend.default


def decoder_layer(
    n_head: int, n_head_kv: int, head_dim: int, n_rot: int, scale: float, softcap: float, residual_scale: float
) -> torch.ScriptObject:
    """A `DecoderLayer` (csrc/block.cpp): a pre-norm layer as one call, `forward(x [b, T, E],
    rot, k_pool, v_pool, table, cols, mask) -> [b, T, E]` (the last six as `attend` takes them),
    once its parts are set: norms (`set_norm(name, w, eps)`), projections (`add_projection(name,
    kind, w, qtype, k, n, bias)`, one or more parts whose outputs are concatenated), sinks, and a
    gated MLP (`set_gated_mlp(glu_kind)`) or routed experts (`set_moe`, `set_experts`). The same
    bits as the layer's modules; `ppinfer.model.layer_op` builds one from them."""
    build.ops()  # loads the library, which registers the class
    layer = torch.classes.ppinfer_kernels.DecoderLayer
    return layer(n_head, n_head_kv, head_dim, n_rot, scale, softcap, residual_scale)
