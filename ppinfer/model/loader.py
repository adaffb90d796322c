"""Build a `PipelineStage` from a GGUF file: the one name table from GGUF tensors to modules.

Only the tensors the stage owns are read: `blk.N.*` for its layers, `token_embd` on the first
stage, `output_norm` and `output` (or `token_embd` when tied) on the last. Missing, mis-shaped
and unexpected tensors are `ModelFileError`s naming the file and the tensor.
"""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ppinfer.errors import ModelFileError
from ppinfer.families.hparams import HParams, MoeParams, RopeParams, read_hparams
from ppinfer.families.registry import get_spec
from ppinfer.families.spec import AttnKind, FamilySpec, Mlp, QkNorm, Rope, SharedExpert, Tying
from ppinfer.gguf.reader import GGUFFile
from ppinfer.kernels.capabilities import cpu_capabilities
from ppinfer.kernels.select import WEIGHT_MODES, block_backend
from ppinfer.model.block import Attention, DecoderBlock, FeedForward
from ppinfer.model.latent import LatentAttention, LowRankQuery
from ppinfer.model.layer_op import layer_op
from ppinfer.model.layers import (
    ProjectionQkNorm,
    RMSNorm,
    RotaryEmbedding,
    RowEmbedding,
)
from ppinfer.model.moe import MoeFeedForward, SharedExpertGate
from ppinfer.model.report import WeightsReport
from ppinfer.model.stage import PipelineStage
from ppinfer.model.weights import RowTransform, Weights
from ppinfer.plan.stage_plan import StagePlan

GLOBAL_TENSORS = (
    "token_embd.weight",
    "output_norm.weight",
    "output_norm.bias",
    "output.weight",
    "output.bias",
    "rope_freqs.weight",
    "rope_factors_long.weight",
    "rope_factors_short.weight",
)
_LAYER_NAME = re.compile(r"blk\.(\d+)\.")


def pair_order(w: np.ndarray, n_head: int, n_rot: int) -> np.ndarray:
    """Reorder each head's first n_rot rows of a NEOX-mode q/k projection (rows
    `[n_head * D, ...]`) from halves (x0..x_{n/2-1} | x_{n/2}..) to interleaved pairs
    (x0, x_{n/2}), (x1, x_{n/2+1}), ...: rotating pairs then computes exactly what NEOX
    rotation computes on the stored rows (the same permutation llama.cpp's converter
    applies to llama-family weights, whose GGUF rows are already paired)."""
    rest = w.shape[1:]
    heads = w.reshape(n_head, -1, *rest)  # [H, D, ...]
    rot = heads[:, :n_rot].reshape(n_head, 2, n_rot // 2, *rest).swapaxes(1, 2)
    rot = rot.reshape(n_head, n_rot, *rest)
    return np.concatenate([rot, heads[:, n_rot:]], axis=1).reshape(w.shape)


def _reorder_parts(rows: np.ndarray, sizes: tuple[int, ...], order: list[RowTransform]) -> np.ndarray:
    """Rows of a fused tensor split into parts of `sizes` rows, each part transformed."""
    parts = np.split(rows, np.cumsum(sizes)[:-1])
    return np.concatenate([t(part) if t is not None else part for part, t in zip(parts, order)])


def _attention(
    w: Weights, spec: FamilySpec, hp: HParams, il: int, rope: RotaryEmbedding | None
) -> Attention:
    lp, e, d, p = hp.layers[il], hp.n_embd, hp.head_dim, f"blk.{il}."
    sizes = (lp.n_head * d, lp.n_head_kv * d, lp.n_head_kv * d)
    # NEOX-mode q/k rows (and biases) are reordered into rotation pairs; v is left as stored.
    heads = (lp.n_head, lp.n_head_kv, None)
    n_rot = rope.n_rot if rope is not None else d
    neox = spec.rope is Rope.NEOX and rope is not None
    order: list[RowTransform] = [
        (lambda rows, h=h: pair_order(rows, h, n_rot)) if neox and h is not None else None
        for h in heads
    ]
    if w.has(p + "attn_qkv.weight"):
        name = p + "attn_qkv.weight"
        bias = w.array(p + "attn_qkv.bias", (sum(sizes),)) if w.has(p + "attn_qkv.bias") else None
        if bias is not None:
            bias = _reorder_parts(bias, sizes, order)
        stored = w.stored(name, (sum(sizes), e))
        if stored is not None:
            qkv = w.block_linear([stored], [_reorder_parts(stored.raw, sizes, order)], bias)
        else:
            qkv = w.linear_from(_reorder_parts(w.array(name, (sum(sizes), e)), sizes, order), bias)
    else:
        biases = [
            w.array(p + f"attn_{n}.bias", (s,)) if w.has(p + f"attn_{n}.bias") else None
            for n, s in zip("qkv", sizes)
        ]
        biases = [t(b) if t is not None and b is not None else b for b, t in zip(biases, order)]
        qkv = w.fused_linear([(p + f"attn_{n}.weight", (s, e), t) for n, s, t in zip("qkv", sizes, order)], biases)
    out = w.linear(p + "attn_output.weight", (e, sizes[0]), w.optional(p + "attn_output.bias", (e,)))
    qk_norm: nn.Module | None = None
    if spec.qk_norm is QkNorm.HEAD or (spec.qk_norm is QkNorm.HEAD_IF_PRESENT and w.has(p + "attn_q_norm.weight")):
        q_w, k_w = w.array(p + "attn_q_norm.weight", (d,)), w.array(p + "attn_k_norm.weight", (d,))
        if neox:  # the norm acts per dim, so its weight follows the rows
            q_w, k_w = pair_order(q_w, 1, n_rot), pair_order(k_w, 1, n_rot)
        per_head = np.concatenate([np.broadcast_to(q_w, (lp.n_head, d)), np.broadcast_to(k_w, (lp.n_head_kv, d))])
        qk_norm = RMSNorm(w.tensor(per_head), hp.norm_eps, w.fused)  # weight [H + Hkv, D]
    elif spec.qk_norm is QkNorm.FULL:
        q_w = w.array(p + "attn_q_norm.weight", (sizes[0],))  # [H D]
        k_w = w.array(p + "attn_k_norm.weight", (sizes[1],))  # [Hkv D]
        if neox:
            q_w, k_w = pair_order(q_w, lp.n_head, n_rot), pair_order(k_w, lp.n_head_kv, n_rot)
        qk_norm = ProjectionQkNorm(
            RMSNorm(w.tensor(q_w), hp.norm_eps, w.fused), RMSNorm(w.tensor(k_w), hp.norm_eps, w.fused), lp.n_head
        )
    sinks = w.get(p + "attn_sinks.weight", (lp.n_head,)) if spec.attn_sinks else None
    # llama4: an RMSNorm without weight of each q and k head after rope (weight ones: the same
    # arithmetic), and the temperature on the queries of its NoPE layers.
    post_rope_norm = RMSNorm(w.tensor(np.ones(d, dtype=np.float32)), hp.norm_eps) if lp.qk_l2_norm else None
    temperature = spec.nope.temperature if spec.nope is not None and rope is None else None
    return Attention(
        qkv, out, lp.n_head, lp.n_head_kv, d, hp.attn_scale, rope,
        lp.sliding_window, hp.attn_softcap, qk_norm, w.fused, sinks, post_rope_norm, temperature, lp.attn_chunk,
    )


def _latent_attention(w: Weights, hp: HParams, il: int, rope: RotaryEmbedding) -> LatentAttention:
    """Multi-head latent attention; the decompression of keys and values is one [H (nope + Dv), R]
    projection, read from `attn_kv_b` or assembled from the split `attn_k_b` [H, R, nope] and
    `attn_v_b` [H, Dv, R] (dequantized: their blocks run along the other dimension)."""
    latent = hp.latent
    assert latent is not None
    h, e, d, dv, p = hp.layers[il].n_head, hp.n_embd, hp.head_dim, hp.head_dim_v, f"blk.{il}."
    r, n_rot, eps = latent.kv_lora_rank, rope.n_rot, hp.norm_eps
    nope = d - n_rot
    if latent.q_lora_rank > 0:
        rq = latent.q_lora_rank
        q: nn.Module = LowRankQuery(
            w.linear(p + "attn_q_a.weight", (rq, e)),
            RMSNorm(w.get(p + "attn_q_a_norm.weight", (rq,)), eps, w.fused),
            w.linear(p + "attn_q_b.weight", (h * d, rq)),
        )
    else:
        q = w.linear(p + "attn_q.weight", (h * d, e))
    kv_a = w.linear(p + "attn_kv_a_mqa.weight", (r + n_rot, e))
    kv_norm = RMSNorm(w.get(p + "attn_kv_a_norm.weight", (r,)), eps, w.fused)
    if w.has(p + "attn_kv_b.weight"):
        kv_b = w.linear(p + "attn_kv_b.weight", (h * (nope + dv), r))
    else:
        k_b = w.array(p + "attn_k_b.weight", (h, r, nope)).transpose(0, 2, 1)  # [H, nope, R]
        v_b = w.array(p + "attn_v_b.weight", (h, dv, r))  # [H, Dv, R]
        kv_b = w.linear_from(np.concatenate([k_b, v_b], axis=1).reshape(h * (nope + dv), r))
    out = w.linear(p + "attn_output.weight", (e, h * dv))
    return LatentAttention(q, kv_a, kv_norm, kv_b, out, h, d, dv, r, hp.attn_scale, rope, w.fused)


def _moe(w: Weights, spec: FamilySpec, hp: HParams, il: int, moe: MoeParams) -> MoeFeedForward:
    n, f, e, p = moe.n_expert, moe.n_ff_exp, hp.n_embd, f"blk.{il}."
    expert_shapes = {"gate": (n, f, e), "up": (n, f, e), "down": (n, e, f)}  # checked by read_hparams
    assert spec.experts is not None
    biases = spec.experts.biases
    router_bias = w.get(p + "ffn_gate_inp.bias", (n,)) if biases else None
    router = w.linear(p + "ffn_gate_inp.weight", (n, e), router_bias)
    gate_up = w.experts([(p + f"ffn_{role}_exps.weight", expert_shapes[role]) for role in ("gate", "up")])
    down = w.experts([(p + "ffn_down_exps.weight", expert_shapes["down"])])
    shared = shared_gate = None
    assert spec.experts is not None
    if spec.experts.shared is not SharedExpert.NONE and moe.n_ff_shexp > 0:
        fs = moe.n_ff_shexp
        up = w.fused_linear([(p + "ffn_gate_shexp.weight", (fs, e), None), (p + "ffn_up_shexp.weight", (fs, e), None)])
        shared = FeedForward(Mlp.SWIGLU, up, w.linear(p + "ffn_down_shexp.weight", (e, fs)), w.fused)
    if spec.experts.shared is SharedExpert.GATED:
        name = p + "ffn_gate_inp_shexp.weight"
        stored_shape = w.gf.info(name).shape  # llama.cpp accepts [E] and [1, E]
        gate = w.array(name, stored_shape if stored_shape in ((e,), (1, e)) else (e,))
        shared_gate = SharedExpertGate(w.linear_from(gate.reshape(1, e)), w.fused)
    bias = None
    if spec.experts.routing_keys and w.has(p + "exp_probs_b.bias"):
        bias = torch.from_numpy(w.array(p + "exp_probs_b.bias", (n,)).copy())  # [n_expert] float32
    expert_biases = None
    if biases:
        gate_up_bias = torch.cat([w.get(p + f"ffn_{role}_exps.bias", (n, f)) for role in ("gate", "up")], dim=1)
        expert_biases = (gate_up_bias, w.get(p + "ffn_down_exps.bias", (n, e)))  # [n, 2F], [n, E]
    return MoeFeedForward(
        moe, router, gate_up, down, shared, shared_gate, bias, expert_biases, spec.experts.clamped_swiglu, w.fused,
        spec.experts.weight_input,
    )


def _feed_forward(w: Weights, spec: FamilySpec, hp: HParams, il: int) -> nn.Module:
    moe = hp.layers[il].moe
    if moe is not None:
        return _moe(w, spec, hp, il, moe)
    f, e, p = hp.layers[il].n_ff, hp.n_embd, f"blk.{il}."
    if spec.mlp is Mlp.GELU:
        up = w.linear(p + "ffn_up.weight", (f, e), w.optional(p + "ffn_up.bias", (f,)))
    elif spec.fused_gate_up:
        up = w.linear(p + "ffn_up.weight", (2 * f, e))  # rows: [gate; up]
    else:
        up = w.fused_linear([(p + "ffn_gate.weight", (f, e), None), (p + "ffn_up.weight", (f, e), None)])
    down = w.linear(p + "ffn_down.weight", (e, f), w.optional(p + "ffn_down.bias", (e,)))
    return FeedForward(spec.mlp, up, down, w.fused)


def _block(w: Weights, spec: FamilySpec, hp: HParams, il: int, rope: RotaryEmbedding | None) -> DecoderBlock:
    p, e, eps = f"blk.{il}.", hp.n_embd, hp.norm_eps
    attn_norm = w.norm(spec, p + "attn_norm", e, eps)
    if spec.attention is AttnKind.LATENT:
        assert rope is not None
        attn: nn.Module = _latent_attention(w, hp, il, rope)
    else:
        attn = _attention(w, spec, hp, il, rope)
    ffn_norm = None if spec.parallel_block else w.norm(spec, p + spec.ffn_norm, e, eps)
    mlp = _feed_forward(w, spec, hp, il)
    post_attn = post_ffn = None
    if spec.post_norms:
        post_attn = w.norm(spec, p + "post_attention_norm", e, eps)
        post_ffn = w.norm(spec, p + "post_ffw_norm", e, eps)
    block = DecoderBlock(attn_norm, attn, mlp, ffn_norm, post_attn, post_ffn, hp.residual_scale)
    block.layer_op = layer_op(block)
    return block


def _check_names(gf: GGUFFile, plan: StagePlan, n_block: int, used: set[str]) -> None:
    """No tensor of this stage's layers may go unused, and no unknown global tensor may exist:
    either would mean a model feature silently ignored. Blocks past the decoder's layers (up to
    `n_block`) are ones the family skips."""
    for name in gf.tensors:
        match = _LAYER_NAME.match(name)
        if match:
            layer = int(match.group(1))
            if layer >= n_block:
                raise ModelFileError(f"{gf.path}: tensor {name!r} is beyond block_count {n_block}")
            if layer in plan.layer_ids and name not in used:
                raise ModelFileError(f"{gf.path}: unexpected tensor {name!r} for architecture {gf.architecture!r}")
        elif name not in GLOBAL_TENSORS:
            raise ModelFileError(f"{gf.path}: unsupported tensor {name!r} for architecture {gf.architecture!r}")


def build_stage(
    path: str | Path,
    plan: StagePlan,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    family: str | None = None,
    packed: bool | None = None,
    weights: str = "quantized",
) -> PipelineStage:
    """Load the stage `plan` of the GGUF model at `path`.

    `family`, when given, must equal the file's `general.architecture`. `weights="quantized"`
    keeps quantized weights in their stored blocks wherever a kernel multiplies their type on
    `device` (the others are dequantized); `"dequantized"` dequantizes every weight to `dtype`
    (the exact reference path). `packed` prepacks float linear weights for oneDNN (None: on CPU
    where oneDNN supports `dtype` on this CPU).
    """
    gf = GGUFFile(path)
    arch = gf.architecture
    if family is not None and family != arch:
        raise ModelFileError(f"{gf.path}: model.family={family!r} but the file's general.architecture is {arch!r}")
    spec = get_spec(arch, str(gf.path))
    hp = read_hparams(gf, spec)
    if plan.total_layers != hp.n_layer:
        raise ModelFileError(f"{gf.path}: plan covers {plan.total_layers} layers but the model has {hp.n_layer}")
    device = torch.device(device)
    if weights not in WEIGHT_MODES:
        raise ValueError(f"weights={weights!r}: expected one of {', '.join(WEIGHT_MODES)}")
    if packed is None:
        packed = device.type == "cpu" and cpu_capabilities().prepacks(dtype)
    blocks = block_backend(device) if weights == "quantized" else None
    report = WeightsReport(
        weights,
        float_path=cpu_capabilities().describe(dtype) if device.type == "cpu" else device.type,
        block_kernel=blocks.describe() if blocks is not None else None,
    )
    w = Weights(gf, dtype, device, packed, blocks, report)

    ropes: dict[RopeParams, RotaryEmbedding] = {}
    layers = []
    for il in plan.layer_ids:
        params = hp.layers[il].rope
        if params is not None and params not in ropes:
            factors = None
            if params.factors is not None:  # rope_freqs, or longrope's chosen factors
                factors = torch.from_numpy(w.array(params.factors, (params.n_rot // 2,)).copy())
            ropes[params] = RotaryEmbedding(params, factors, device)
        layers.append(_block(w, spec, hp, il, None if params is None else ropes[params]))

    embedding = final_norm = output = None
    e, v = hp.n_embd, hp.n_vocab
    if plan.is_first:
        info = gf.info("token_embd.weight")
        if info.shape[1] != e:
            raise ModelFileError(
                f"{gf.path}: tensor 'token_embd.weight' has shape {list(info.shape)}, expected [{v}, {e}]"
            )
        w.used.add(info.name)
        embedding = RowEmbedding(
            gf.raw(info.name), info.qtype, hp.embed_scale, dtype, f"{gf.path}: tensor 'token_embd.weight'"
        )
    if plan.is_last:
        final_norm = w.norm(spec, "output_norm", e, hp.norm_eps)
        has_output = w.has("output.weight")
        if spec.tying is Tying.NEVER and not has_output:
            raise ModelFileError(f"{gf.path}: required tensor 'output.weight' is missing")
        head = "token_embd.weight" if spec.tying is Tying.ALWAYS or not has_output else "output.weight"
        out_bias = w.get("output.bias", (v,)) if spec.output_bias else None
        output = w.linear(head, (v, e), out_bias)
    _check_names(gf, plan, hp.n_block, w.used)
    return PipelineStage(plan, hp, layers, list(ropes.values()), embedding, final_norm, output, dtype, device, report)
