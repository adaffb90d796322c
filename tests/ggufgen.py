"""Writers of tiny random-weight GGUF files, one per family and per quirk.

The test side's own description of what a GGUF file of each family holds (tensor names,
torch shapes [out, in], metadata keys), written from the reference page
`shared/reference/gguf-families.md` and gguf-py's constants, independently of ppinfer.

Weights are drawn directly in the file's layout: llama-family q/k rows are therefore already
"permuted" (a reference built from them has to un-permute, as transformers' loader does) and
Gemma norm weights already include the +1 that llama.cpp's converter adds.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

LLAMA_LIKE = ("llama", "mistral3", "granite", "granitemoe")
"""Families whose GGUF q/k rows are permuted for ggml's NORM rope (llama4's are not: Meta's
checkpoints already store them pair-interleaved)."""

GEMMA_LIKE = ("gemma", "gemma2", "gemma3")
"""Families whose GGUF RMSNorm weights include +1 and whose embeddings are scaled by sqrt(E)."""

LAYERNORM_FAMILIES = ("phi2", "starcoder2")
"""Families that use LayerNorm with bias (the others use RMSNorm)."""

EMBED_STD = 0.3
"""Token embedding scale: with a tied head this keeps logits around a few units."""

QUANT_BLOCK = 32
"""Row length granularity of the simple quant types this module writes."""

EXPERT_WIDTH_PER_USED = ("qwen2moe", "qwen3moe", "glm4moe", "deepseek2")
"""llama.cpp's expert width without `expert_feed_forward_length`: feed_forward_length divided
by expert_used_count for these, feed_forward_length itself for the others."""


@dataclass(frozen=True)
class TinySpec:
    """What a tiny file contains: its family, its sizes and which quirks are switched on."""

    arch: str
    n_layer: int = 2
    n_embd: int = 64
    n_head: int = 4
    n_head_kv: int = 2
    head_dim: int = 16
    """Per-head q/k/v width; written as attention.key_length only when it differs from E/H
    (and always for the Gemma families, as llama.cpp's converter does)."""
    n_ff: int = 128
    n_vocab: int = 160
    n_ctx: int = 128
    rope_dims: int | None = None
    """rope.dimension_count (rotated dims per head); None means all of head_dim."""
    rope_base: float = 10000.0
    rope_base_swa: float | None = None
    """rope.freq_base_swa; None leaves the key out (gemma3 then uses 10000)."""
    rope_linear_factor: float | None = None
    """rope.scaling.type=linear with this factor (positions divided by it)."""
    rope_yarn: tuple[float, int] | None = None
    """rope.scaling.type=yarn with (factor, original_context_length)."""
    rope_attn_factor: float | None = None
    """rope.scaling.attn_factor (multiplies YaRN's attention factor)."""
    rope_freqs: bool = False
    """Write a `rope_freqs.weight` tensor of per-frequency divisors (Llama-3.1 style)."""
    tied: bool = False
    """No `output.weight`: the output head reuses `token_embd`."""
    fused_qkv: bool = False
    """One `attn_qkv` tensor [q | k | v] instead of attn_q/attn_k/attn_v (phi3 always)."""
    attn_bias: bool = False
    """q/k/v/o biases on llama, where they are optional (qwen2, phi2, starcoder2 always
    have their own fixed set)."""
    sliding_window: int | None = None
    """attention.sliding_window; which layers slide is the family's fixed pattern (gemma2:
    even layers, gemma3: il % 6 < 5); llama.cpp ignores the key for phi3."""
    attn_softcap: float | None = None
    final_softcap: float | None = None
    qtype: QType = QType.F32
    """Storage type of every 2-D weight (norms, biases and rope_freqs stay F32)."""
    qk_gain: float = 1.0
    """Multiplies q/k weights so attention scores are large enough for softcaps to bite."""
    n_expert: int = 0
    """expert_count: > 0 gives every layer routed experts (3-D ffn_*_exps tensors) instead of a
    dense feed-forward."""
    n_expert_used: int = 2
    n_ff_exp: int | None = None
    """expert_feed_forward_length; None leaves the key out (the family's default width)."""
    n_ff_shexp: int = 0
    """Width of qwen2moe's shared expert (written as expert_shared_feed_forward_length)."""
    n_shared: int = 0
    """expert_shared_count: ungated shared experts as wide as n_shared routed ones (glm4moe)."""
    n_dense_lead: int = 0
    """leading_dense_block_count: the first layers have a dense feed-forward of width n_ff."""
    n_nextn: int = 0
    """nextn_predict_layers: trailing blocks (in block_count) that llama.cpp never runs."""
    gating_func: int | None = None
    """expert_gating_func (1 softmax, 2 sigmoid); None leaves the key out."""
    weights_norm: bool | None = None
    """expert_weights_norm; None leaves the key out."""
    weights_scale: float | None = None
    """expert_weights_scale; None leaves the key out."""
    selection_bias: bool = False
    """A per-expert selection bias `exp_probs_b.bias` in every MoE layer."""
    qk_norm: bool = False
    """Per-head attn_q_norm / attn_k_norm where the family has them optionally (glm4moe)."""
    n_group: int = 1
    """expert_group_count (written when > 1) and expert_group_used_count: group-limited routing."""
    n_group_used: int = 1
    kv_lora_rank: int = 0
    """> 0: multi-head latent attention (deepseek2) with keys/values from a latent of this rank;
    head_dim is then the query/key head (non-rotary dims then rope_dims rotary ones)."""
    q_lora_rank: int = 0
    """Latent attention's query bottleneck (0: one attn_q projection)."""
    head_dim_v: int = 0
    """Latent attention's value head size."""
    split_kv_b: bool = False
    """Latent attention's decompression as attn_k_b / attn_v_b (llama.cpp's newer files, with
    *_length_mla keys and one latent kv head) instead of attn_kv_b."""
    yarn_log_mul: float | None = None
    """rope.scaling.yarn_log_multiplier (deepseek2: 0.1 mscale_all_dim)."""
    longrope_orig_ctx: int | None = None
    """phi3 longrope: random `rope_factors_long` / `rope_factors_short` tensors, this
    rope.scaling.original_context_length, and the converter's rope.scaling.attn_factor
    sqrt(1 + ln(n_ctx / orig) / ln(orig)) (1 when n_ctx <= orig)."""
    llama3_rope: tuple[float, float, float, int] | None = None
    """(factor, low_freq_factor, high_freq_factor, original context): a `rope_freqs` tensor
    computed as llama.cpp's converter computes it from a llama3 rope_scaling."""
    granite_scales: tuple[float, float, float, float] | None = None
    """granite's (embedding_scale, residual_scale, attention.scale, logit_scale)."""
    rope_finetuned: bool | None = None
    """rope.scaling.finetuned (None leaves the key out): granite's rope switch, false for no rope
    in any layer."""
    moe_step: int = 0
    """interleave_moe_layer_step (llama4; written when > 0): experts in layers il with
    (il + 1) % moe_step == 0 only."""
    seed: int = 0

    @property
    def n_rot(self) -> int:
        """Rotated dims per head."""
        return self.head_dim if self.rope_dims is None else self.rope_dims

    def is_moe_layer(self, il: int) -> bool:
        """Whether layer il has routed experts."""
        step = self.moe_step or 1
        return self.n_expert > 0 and il >= self.n_dense_lead and (il + 1) % step == 0

    @property
    def expert_width(self) -> int:
        """Rows of each expert's gate and up projections."""
        if self.n_ff_exp is not None:
            return self.n_ff_exp
        return self.n_ff // self.n_expert_used if self.arch in EXPERT_WIDTH_PER_USED else self.n_ff

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_head_kv * self.head_dim


def _linear(rng: np.random.Generator, n_out: int, n_in: int, gain: float = 1.0) -> np.ndarray:
    """A [out, in] weight whose outputs have about unit variance for unit-RMS inputs."""
    return (rng.standard_normal((n_out, n_in)) * (gain / np.sqrt(n_in))).astype(np.float32)


def _norm(rng: np.random.Generator, n: int) -> np.ndarray:
    """A norm weight near 1 (Gemma's +1 included, since its GGUF stores 1 + w)."""
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)


def _bias(rng: np.random.Generator, n: int) -> np.ndarray:
    # Large enough that a bias applied in the wrong place (e.g. not permuted with its rows)
    # moves the logits well past the test tolerance.
    return (0.5 * rng.standard_normal(n)).astype(np.float32)


def _latent_attention(spec: TinySpec, rng: np.random.Generator, p: str, out: dict[str, np.ndarray]) -> None:
    """Multi-head latent attention's projections (deepseek2)."""
    e, h, d, dv, r, rq = spec.n_embd, spec.n_head, spec.head_dim, spec.head_dim_v, spec.kv_lora_rank, spec.q_lora_rank
    nope = d - spec.n_rot
    if rq:
        out[f"{p}.attn_q_a.weight"] = _linear(rng, rq, e)
        out[f"{p}.attn_q_a_norm.weight"] = _norm(rng, rq)
        out[f"{p}.attn_q_b.weight"] = _linear(rng, h * d, rq)
    else:
        out[f"{p}.attn_q.weight"] = _linear(rng, h * d, e)
    out[f"{p}.attn_kv_a_mqa.weight"] = _linear(rng, r + spec.n_rot, e)  # [latent | shared rotary key]
    out[f"{p}.attn_kv_a_norm.weight"] = _norm(rng, r)
    kv_b = _linear(rng, h * (nope + dv), r)  # per head: nope key rows, then value rows
    if spec.split_kv_b:
        per_head = kv_b.reshape(h, nope + dv, r)
        out[f"{p}.attn_k_b.weight"] = np.ascontiguousarray(per_head[:, :nope].transpose(0, 2, 1))  # [H, R, nope]
        out[f"{p}.attn_v_b.weight"] = np.ascontiguousarray(per_head[:, nope:])  # [H, Dv, R]
    else:
        out[f"{p}.attn_kv_b.weight"] = kv_b
    out[f"{p}.attn_output.weight"] = _linear(rng, e, h * dv)


def _attention(spec: TinySpec, rng: np.random.Generator, p: str, out: dict[str, np.ndarray]) -> None:
    """q/k/v/o projections (+ biases, q/k norms) of one layer, in the family's layout."""
    if spec.kv_lora_rank:
        _latent_attention(spec, rng, p, out)
        return
    e, g = spec.n_embd, spec.qk_gain
    wq = _linear(rng, spec.q_width, e, g)
    wk = _linear(rng, spec.kv_width, e, g)
    wv = _linear(rng, spec.kv_width, e)
    with_qkv_bias = spec.attn_bias or spec.arch in ("qwen2", "qwen2moe", "phi2", "starcoder2", "glm4moe", "gpt-oss")
    if spec.fused_qkv:
        out[f"{p}.attn_qkv.weight"] = np.concatenate([wq, wk, wv], axis=0)  # [(H+2Hkv)·D, E]
        if with_qkv_bias:
            out[f"{p}.attn_qkv.bias"] = _bias(rng, spec.q_width + 2 * spec.kv_width)
    else:
        out[f"{p}.attn_q.weight"], out[f"{p}.attn_k.weight"], out[f"{p}.attn_v.weight"] = wq, wk, wv
        if with_qkv_bias:
            out[f"{p}.attn_q.bias"] = _bias(rng, spec.q_width)
            out[f"{p}.attn_k.bias"] = _bias(rng, spec.kv_width)
            out[f"{p}.attn_v.bias"] = _bias(rng, spec.kv_width)
    if spec.arch in ("qwen3", "qwen3moe", "gemma3") or spec.qk_norm:
        out[f"{p}.attn_q_norm.weight"] = _norm(rng, spec.head_dim)
        out[f"{p}.attn_k_norm.weight"] = _norm(rng, spec.head_dim)
    if spec.arch == "olmoe":  # one norm over the whole q (and k) projection
        out[f"{p}.attn_q_norm.weight"] = _norm(rng, spec.q_width)
        out[f"{p}.attn_k_norm.weight"] = _norm(rng, spec.kv_width)
    out[f"{p}.attn_output.weight"] = _linear(rng, e, spec.q_width)
    if spec.attn_bias or spec.arch in ("phi2", "starcoder2", "gpt-oss"):
        out[f"{p}.attn_output.bias"] = _bias(rng, e)
    if spec.arch == "gpt-oss":  # a sink logit per head, large enough to take real probability mass
        out[f"{p}.attn_sinks.weight"] = rng.uniform(-1.0, 3.0, spec.n_head).astype(np.float32)


def _experts(spec: TinySpec, rng: np.random.Generator, p: str, out: dict[str, np.ndarray]) -> None:
    """Router, routed experts [n_expert, out, in] and (qwen2moe) the gated shared expert."""
    e, f, n = spec.n_embd, spec.expert_width, spec.n_expert
    out[f"{p}.ffn_gate_inp.weight"] = _linear(rng, n, e, gain=2.0)  # router logits [n_expert, E]
    out[f"{p}.ffn_gate_exps.weight"] = np.stack([_linear(rng, f, e) for _ in range(n)])  # [n, F, E]
    out[f"{p}.ffn_up_exps.weight"] = np.stack([_linear(rng, f, e) for _ in range(n)])
    out[f"{p}.ffn_down_exps.weight"] = np.stack([_linear(rng, e, f) for _ in range(n)])  # [n, E, F]
    if spec.arch == "gpt-oss":  # router and per-expert biases
        out[f"{p}.ffn_gate_inp.bias"] = _bias(rng, n)
        for role, width in (("gate", f), ("up", f), ("down", e)):
            out[f"{p}.ffn_{role}_exps.bias"] = _bias(rng, n * width).reshape(n, width)
    if spec.selection_bias:  # large enough to change which experts are chosen
        out[f"{p}.exp_probs_b.bias"] = rng.uniform(0.0, 0.5, n).astype(np.float32)
    if spec.n_shared:  # ungated shared experts
        fs = f * spec.n_shared
        out[f"{p}.ffn_gate_shexp.weight"] = _linear(rng, fs, e)
        out[f"{p}.ffn_up_shexp.weight"] = _linear(rng, fs, e)
        out[f"{p}.ffn_down_shexp.weight"] = _linear(rng, e, fs)
    if spec.arch == "llama4":  # one shared expert as wide as a routed one
        out[f"{p}.ffn_gate_shexp.weight"] = _linear(rng, f, e)
        out[f"{p}.ffn_up_shexp.weight"] = _linear(rng, f, e)
        out[f"{p}.ffn_down_shexp.weight"] = _linear(rng, e, f)
    if spec.arch == "qwen2moe":  # gated by sigmoid(ffn_gate_inp_shexp . x)
        out[f"{p}.ffn_gate_inp_shexp.weight"] = _linear(rng, 1, e, gain=2.0)[0]  # [E]
    if spec.arch in ("qwen2moe", "granitemoe") and spec.n_ff_shexp:
        fs = spec.n_ff_shexp
        out[f"{p}.ffn_gate_shexp.weight"] = _linear(rng, fs, e)
        out[f"{p}.ffn_up_shexp.weight"] = _linear(rng, fs, e)
        out[f"{p}.ffn_down_shexp.weight"] = _linear(rng, e, fs)


def _ffn(spec: TinySpec, rng: np.random.Generator, il: int, out: dict[str, np.ndarray]) -> None:
    """The feed-forward weights of layer il, in the family's layout."""
    e, f, p = spec.n_embd, spec.n_ff, f"blk.{il}"
    if spec.is_moe_layer(il):
        _experts(spec, rng, p, out)
        return
    if spec.arch == "phi3":
        out[f"{p}.ffn_up.weight"] = _linear(rng, 2 * f, e)  # [2F, E]: gate rows, then up rows
    elif spec.arch in ("phi2", "starcoder2"):
        out[f"{p}.ffn_up.weight"] = _linear(rng, f, e)
        out[f"{p}.ffn_up.bias"] = _bias(rng, f)
    else:
        out[f"{p}.ffn_gate.weight"] = _linear(rng, f, e)
        out[f"{p}.ffn_up.weight"] = _linear(rng, f, e)
    out[f"{p}.ffn_down.weight"] = _linear(rng, e, f)
    if spec.arch in ("phi2", "starcoder2"):
        out[f"{p}.ffn_down.bias"] = _bias(rng, e)


def _layer_norms(spec: TinySpec, rng: np.random.Generator, p: str, out: dict[str, np.ndarray]) -> None:
    """The per-layer norms: pre-attention always; pre-FFN except phi2's parallel block."""
    e = spec.n_embd
    out[f"{p}.attn_norm.weight"] = _norm(rng, e)
    if spec.arch in LAYERNORM_FAMILIES:
        out[f"{p}.attn_norm.bias"] = _bias(rng, e)
    if spec.arch in ("glm4moe", "gpt-oss"):  # the pre-feed-forward norm under another name
        out[f"{p}.post_attention_norm.weight"] = _norm(rng, e)
    elif spec.arch != "phi2":
        out[f"{p}.ffn_norm.weight"] = _norm(rng, e)
        if spec.arch == "starcoder2":
            out[f"{p}.ffn_norm.bias"] = _bias(rng, e)
    if spec.arch in ("gemma2", "gemma3"):
        out[f"{p}.post_attention_norm.weight"] = _norm(rng, e)
        out[f"{p}.post_ffw_norm.weight"] = _norm(rng, e)


def tiny_tensors(spec: TinySpec) -> dict[str, np.ndarray]:
    """All tensors of the file as float32 arrays in torch layout ([out, in] for 2-D)."""
    rng = np.random.default_rng(spec.seed)
    e, v = spec.n_embd, spec.n_vocab
    out: dict[str, np.ndarray] = {"token_embd.weight": (EMBED_STD * rng.standard_normal((v, e))).astype(np.float32)}
    if spec.rope_freqs:
        # Divisors between 1 and 8 per rotated frequency, so that every pair is affected.
        out["rope_freqs.weight"] = rng.uniform(1.0, 8.0, spec.n_rot // 2).astype(np.float32)
    if spec.llama3_rope is not None:
        out["rope_freqs.weight"] = llama3_rope_factors(spec)
    if spec.longrope_orig_ctx is not None:  # per-frequency divisors, as Phi-3.5's (1 to ~30)
        out["rope_factors_long.weight"] = rng.uniform(1.0, 30.0, spec.n_rot // 2).astype(np.float32)
        out["rope_factors_short.weight"] = rng.uniform(1.0, 3.0, spec.n_rot // 2).astype(np.float32)
    for i in range(spec.n_layer + spec.n_nextn):
        p = f"blk.{i}"
        _layer_norms(spec, rng, p, out)
        _attention(spec, rng, p, out)
        _ffn(spec, rng, i, out)
        if i >= spec.n_layer:  # a next-token prediction block's own tensors
            out[f"{p}.nextn.eh_proj.weight"] = _linear(rng, e, 2 * e)
            for norm in ("enorm", "hnorm", "shared_head_norm"):
                out[f"{p}.nextn.{norm}.weight"] = _norm(rng, e)
    out["output_norm.weight"] = _norm(rng, e)
    if spec.arch in LAYERNORM_FAMILIES:
        out["output_norm.bias"] = _bias(rng, e)
    if not spec.tied:
        out["output.weight"] = _linear(rng, v, e, gain=2.0)
        if spec.arch == "phi2":
            out["output.bias"] = _bias(rng, v)
    return out


def llama3_rope_factors(spec: TinySpec) -> np.ndarray:
    """The per-frequency divisors llama.cpp's converter writes as `rope_freqs` for a llama3
    rope_scaling: 1 for wavelengths below orig / high_freq_factor, `factor` above
    orig / low_freq_factor, and 1 / ((1 - s) / factor + s) in between, s = (orig / wavelength -
    low) / (high - low)."""
    assert spec.llama3_rope is not None
    factor, low, high, orig = spec.llama3_rope
    freqs = 1.0 / (spec.rope_base ** (np.arange(0, spec.n_rot, 2, dtype=np.float64) / spec.n_rot))
    out = []
    for freq in freqs:
        wavelen = 2 * np.pi / freq
        if wavelen < orig / high:
            out.append(1.0)
        elif wavelen > orig / low:
            out.append(factor)
        else:
            smooth = (orig / wavelen - low) / (high - low)
            out.append(1.0 / ((1 - smooth) / factor + smooth))
    return np.array(out, dtype=np.float32)


def longrope_attn_factor(spec: TinySpec) -> float:
    """phi3 longrope's attention factor as llama.cpp's converter computes it."""
    assert spec.longrope_orig_ctx is not None
    scale = spec.n_ctx / spec.longrope_orig_ctx
    return float(np.sqrt(1 + np.log(scale) / np.log(spec.longrope_orig_ctx))) if scale > 1.0 else 1.0


def _write_metadata(w: gguf.GGUFWriter, spec: TinySpec, name: str) -> None:
    """The hyperparameter keys llama.cpp reads for the family (no tokenizer section)."""
    arch = spec.arch
    w.add_name(name)
    w.add_block_count(spec.n_layer + spec.n_nextn)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_vocab_size(spec.n_vocab)
    if spec.kv_lora_rank:
        w.add_kv_lora_rank(spec.kv_lora_rank)
        if spec.q_lora_rank:
            w.add_q_lora_rank(spec.q_lora_rank)
        if spec.split_kv_b:  # one latent head: [latent | rotary key], values the latent
            w.add_key_length(spec.kv_lora_rank + spec.n_rot)
            w.add_value_length(spec.kv_lora_rank)
            w.add_key_length_mla(spec.head_dim)
            w.add_value_length_mla(spec.head_dim_v)
        else:
            w.add_key_length(spec.head_dim)
            w.add_value_length(spec.head_dim_v)
    elif spec.head_dim != spec.n_embd // spec.n_head or arch in GEMMA_LIKE:
        w.add_key_length(spec.head_dim)
        w.add_value_length(spec.head_dim)
    if arch in LAYERNORM_FAMILIES:
        w.add_layer_norm_eps(1e-5)
    else:
        # deepseek2: transformers' latent norms always use 1e-6, so the file says 1e-6 too
        w.add_layer_norm_rms_eps(1e-6 if arch in (*GEMMA_LIKE, "deepseek2") else 1e-5)
    w.add_rope_dimension_count(spec.n_rot)
    w.add_rope_freq_base(spec.rope_base)
    if spec.rope_base_swa is not None:
        w.add_rope_freq_base_swa(spec.rope_base_swa)
    if spec.rope_linear_factor is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(spec.rope_linear_factor)
    if spec.rope_yarn is not None:
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(spec.rope_yarn[0])
        w.add_rope_scaling_orig_ctx_len(spec.rope_yarn[1])
    if spec.yarn_log_mul is not None:
        w.add_rope_scaling_yarn_log_mul(spec.yarn_log_mul)
    if spec.rope_attn_factor is not None:
        w.add_rope_scaling_attn_factors(spec.rope_attn_factor)
    if spec.longrope_orig_ctx is not None:
        w.add_rope_scaling_orig_ctx_len(spec.longrope_orig_ctx)
        w.add_rope_scaling_attn_factors(longrope_attn_factor(spec))
    if spec.granite_scales is not None:
        embedding, residual, attention, logit = spec.granite_scales
        w.add_embedding_scale(embedding)
        w.add_residual_scale(residual)
        w.add_attention_scale(attention)
        w.add_logit_scale(logit)
    if spec.rope_finetuned is not None:
        w.add_rope_scaling_finetuned(spec.rope_finetuned)
    if spec.moe_step:
        w.add_interleave_moe_layer_step(spec.moe_step)
    if spec.sliding_window is not None:
        w.add_sliding_window(spec.sliding_window)
    if spec.n_expert > 0:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        if spec.n_ff_exp is not None:
            w.add_expert_feed_forward_length(spec.n_ff_exp)
        if spec.n_ff_shexp:
            w.add_expert_shared_feed_forward_length(spec.n_ff_shexp)
        if spec.n_shared:
            w.add_expert_shared_count(spec.n_shared)
        if spec.n_dense_lead:
            w.add_leading_dense_block_count(spec.n_dense_lead)
        if spec.n_group > 1:
            w.add_expert_group_count(spec.n_group)
            w.add_expert_group_used_count(spec.n_group_used)
        if spec.gating_func is not None:
            w.add_uint32(f"{arch}.expert_gating_func", spec.gating_func)
        if spec.weights_norm is not None:
            w.add_expert_weights_norm(spec.weights_norm)
        if spec.weights_scale is not None:
            w.add_expert_weights_scale(spec.weights_scale)
    if spec.n_nextn:
        w.add_nextn_predict_layers(spec.n_nextn)
    if spec.attn_softcap is not None:
        w.add_attn_logit_softcapping(spec.attn_softcap)
    if spec.final_softcap is not None:
        w.add_final_logit_softcapping(spec.final_softcap)


@dataclass(frozen=True)
class RawTensor:
    """Bytes already encoded in `qtype` (for types gguf-py cannot quantize, e.g. Q8_1)."""

    data: np.ndarray
    qtype: QType


IQ4_NL_VALUES = np.array([-127, -104, -83, -65, -49, -35, -22, -10, 1, 13, 25, 38, 53, 69, 89, 113], dtype=np.float32)


def encode_iq4_nl(array: np.ndarray) -> np.ndarray:
    """[rows, k] float as IQ4_NL blocks ([rows, k / 32 * 18] uint8; gguf-py dequantizes but
    cannot quantize it): per 32 values fp16 d = max|x| / 127 and each value's nearest d * kvalue
    (value j's code in the low nibble of byte j, value j + 16's in the high nibble)."""
    rows, k = array.shape
    x = array.reshape(rows, k // 32, 32).astype(np.float32)
    d = (np.abs(x).max(axis=-1, keepdims=True) / 127).astype(np.float16)  # [rows, k/32, 1]
    codes = np.abs(d.astype(np.float32)[..., None] * IQ4_NL_VALUES - x[..., None]).argmin(-1).astype(np.uint8)
    qs = codes[..., :16] | (codes[..., 16:] << 4)  # [rows, k/32, 16]
    return np.concatenate([d.view(np.uint8), qs], axis=-1).reshape(rows, -1)


def encode(array: np.ndarray, qtype: QType) -> RawTensor | np.ndarray:
    """`array` stored as `qtype` (F32/F16 as typed arrays, other types as raw blocks)."""
    if qtype == QType.F32:
        return array.astype(np.float32)
    if qtype == QType.F16:
        return array.astype(np.float16)
    if qtype == QType.IQ4_NL:
        return RawTensor(encode_iq4_nl(array.reshape(-1, array.shape[-1])).reshape(*array.shape[:-1], -1), qtype)
    return RawTensor(gguf.quants.quantize(array, qtype), qtype)


def write_gguf(
    path: Path,
    spec: TinySpec,
    tensors: Mapping[str, np.ndarray | RawTensor],
    *,
    arch_name: str | None = None,
    extra: Mapping[str, str | float] | None = None,
) -> Path:
    """Write metadata for `spec` (plus the `extra` string or float32 keys) and the given
    tensors (already encoded) to `path`."""
    w = gguf.GGUFWriter(path, arch_name or spec.arch)
    _write_metadata(w, spec, path.stem)
    for key, value in (extra or {}).items():
        if isinstance(value, str):
            w.add_string(key, value)
        else:
            w.add_float32(key, value)
    for name, t in tensors.items():
        if isinstance(t, RawTensor):
            w.add_tensor(name, t.data, raw_dtype=t.qtype)
        else:
            w.add_tensor(name, t)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


def encoded_tensors(spec: TinySpec) -> dict[str, np.ndarray | RawTensor]:
    """`tiny_tensors(spec)` with every 2-D and 3-D weight stored as `spec.qtype`, except the
    expert router and biases (gpt-oss's per-expert ones are 2-D), which llama.cpp's quantizer
    leaves in F32."""
    out: dict[str, np.ndarray | RawTensor] = {}
    for name, array in tiny_tensors(spec).items():
        if array.ndim >= 2 and spec.qtype != QType.F32 and not name.endswith(("ffn_gate_inp.weight", ".bias")):
            if array.shape[1] % QUANT_BLOCK:
                raise ValueError(f"{name}: row length {array.shape[1]} is not a multiple of {QUANT_BLOCK}")
            out[name] = encode(array, spec.qtype)
        else:
            out[name] = array
    return out


def write_tiny_gguf(path: Path, spec: TinySpec) -> Path:
    """Write the tiny random-weight file described by `spec`."""
    return write_gguf(path, spec, encoded_tensors(spec))


def with_changes(spec: TinySpec, **changes: object) -> TinySpec:
    """A copy of `spec` with some fields replaced."""
    return dataclasses.replace(spec, **changes)
