"""A decoder layer as one call on float32 CPU stages (`DecoderLayer`, csrc/block.cpp).

A layer's modules call the fused ops, the products and a MoE layer's routing one by one, each
through Python and torch's dispatcher: SmolLM2's decode step spent over a quarter of its time
there. `layer_op` hands the same tensors to one C++ object that calls the same functions in the
same order, so the layer gives the same bits. Layers with a part it does not run keep their
modules: latent attention, NoPE, chunked or temperature-scaled attention, a plain GELU MLP or the
parallel form, experts with biases or a clamped SwiGLU, routing by group or softmax over the
chosen experts, experts or projections that are neither blocks nor float32 weights.
"""

from __future__ import annotations

import torch
from torch import nn

from ppinfer.families.spec import Gating
from ppinfer.kernels import fused as fused_ops
from ppinfer.kernels.cpu import BlockLinear, InvariantLinear
from ppinfer.kernels.experts import BlockExperts
from ppinfer.model.block import Attention, DecoderBlock, FeedForward
from ppinfer.model.layers import ConcatLinear, Linear, PackedLinear, RMSNorm
from ppinfer.model.moe import MoeFeedForward


def layer_op(block: DecoderBlock) -> torch.ScriptObject | None:
    """`block` as one `DecoderLayer` call, or None where a part has no counterpart in it."""
    attn = block.attn
    if not isinstance(attn, Attention) or not (attn.fused and attn.plain) or block.ffn_norm is None:
        return None
    assert attn.rope is not None
    norms = {
        "attn_norm": block.attn_norm, "ffn_norm": block.ffn_norm, "qk_norm": attn.qk_norm,
        "post_attn_norm": block.post_attn_norm, "post_ffn_norm": block.post_ffn_norm,
    }
    if not all(norm is None or (isinstance(norm, RMSNorm) and norm.fused) for norm in norms.values()):
        return None
    op = fused_ops.decoder_layer(
        attn.n_head, attn.n_head_kv, attn.head_dim, attn.rope.n_rot, attn.scale, attn.softcap or 0.0,
        block.residual_scale,
    )
    if not (_add(op, "qkv", attn.qkv) and _add(op, "out", attn.out) and _set_mlp(op, block.mlp)):
        return None
    for name, norm in norms.items():
        if norm is not None:
            op.set_norm(name, norm.weight, norm.eps)
    if attn.sinks is not None:
        op.set_sinks(attn.sinks)
    return op


def _add(op: torch.ScriptObject, name: str, linear: nn.Module) -> bool:
    """Adds `linear` to `op`'s projection `name`; False where it is a kind `op` does not run."""
    if isinstance(linear, ConcatLinear):
        return all(_add(op, name, part) for part in linear.parts)
    if isinstance(linear, BlockLinear):
        kind = "packed" if linear.packed else "blocks"
        op.add_projection(name, kind, linear.w, int(linear.qtype), linear.in_features, linear.out_features, linear.bias)
    elif isinstance(linear, (Linear, InvariantLinear)):
        kind = "invariant" if isinstance(linear, InvariantLinear) else "float"
        op.add_projection(name, kind, linear.weight, 0, 0, 0, linear.bias)
    elif isinstance(linear, PackedLinear):
        for w, bias in zip(linear.blocks, linear.biases, strict=True):
            op.add_projection(name, "onednn", w, 0, 0, 0, bias)
    else:
        return False
    return True


def _set_mlp(op: torch.ScriptObject, mlp: nn.Module) -> bool:
    """Sets `op`'s feed-forward to `mlp`; False where `op` cannot compute it."""
    if isinstance(mlp, FeedForward):
        if mlp.glu_kind is None:
            return False
        op.set_gated_mlp(mlp.glu_kind)
        return _add(op, "up", mlp.up) and _add(op, "down", mlp.down)
    if not isinstance(mlp, MoeFeedForward):
        return False
    p, shared = mlp.params, mlp.shared
    if (
        not mlp.fused or mlp.clamped or mlp.weight_input or mlp.gate_up_bias is not None
        or p.n_group > 1 or p.gating is Gating.SOFTMAX_CHOSEN
        or not (isinstance(mlp.gate_up, BlockExperts) and isinstance(mlp.down, BlockExperts))
        or (shared is not None and not (isinstance(shared, FeedForward) and shared.glu_kind == 0))
    ):
        return False
    op.set_moe(
        p.n_expert, p.n_expert_used, 0 if p.gating is Gating.SOFTMAX else 1, p.normalize, p.weights_scale,
        mlp.selection_bias,
    )
    for name, experts in (("gate_up", mlp.gate_up), ("down", mlp.down)):
        op.set_experts(name, experts.w, int(experts.qtype), experts.in_features, experts.out_features, experts.packed)
    if not _add(op, "router", mlp.router):
        return False
    if mlp.shared_gate is not None and not _add(op, "shared_gate", mlp.shared_gate.linear):
        return False
    return shared is None or (_add(op, "shared_up", shared.up) and _add(op, "shared_down", shared.down))
