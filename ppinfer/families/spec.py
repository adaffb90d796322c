"""What a model family is, as data: `FamilySpec` (the architecture's fixed choices).

Every field is explicit for every family (no silent llama defaults); the values for the ten
supported architectures live in `registry.py` and were checked against llama.cpp (see
`shared/reference/gguf-families.md`). Nothing here runs a forward pass.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum


class Norm(str, Enum):
    RMS = "rms"  # x * rsqrt(mean(x^2) + eps) * w
    LAYER = "layer"  # LayerNorm with weight and bias


class Rope(str, Enum):
    NORM = "norm"  # rotate consecutive pairs (x[2i], x[2i+1]) - ggml's default mode
    NEOX = "neox"  # rotate (x[i], x[i + n_rot/2]) - HF's rotate_half


class Mlp(str, Enum):
    SWIGLU = "swiglu"  # down(silu(gate(h)) * up(h))
    GEGLU = "geglu"  # down(gelu_tanh(gate(h)) * up(h))
    GELU = "gelu"  # down(gelu_tanh(up(h)))  (no gate)


class QkNorm(str, Enum):
    NONE = "none"
    HEAD = "head"  # RMSNorm of each q and k head over D, weights [D] (qwen3, gemma3)
    HEAD_IF_PRESENT = "head_if_present"  # HEAD where the file has attn_q_norm / attn_k_norm (glm4moe)
    FULL = "full"  # RMSNorm of the whole q and k projections, weights [H D] / [Hkv D] (olmoe)


class AttnKind(str, Enum):
    STANDARD = "standard"  # q/k/v projections (or fused attn_qkv), grouped-query attention
    LATENT = "latent"  # multi-head latent attention (deepseek2): keys and values decompressed per
    # head from a low-rank latent (attn_kv_a_mqa, attn_kv_b or attn_k_b/attn_v_b), one shared
    # rotary key, optional low-rank queries (attn_q_a, attn_q_b); YaRN's mscale folded into
    # the score scale as mscale^2 with `rope.scaling.yarn_log_multiplier`


class Gating(str, Enum):
    SOFTMAX = "softmax"  # expert probabilities: softmax over the router logits
    SIGMOID = "sigmoid"  # each expert's probability on its own: sigmoid(logit)
    SOFTMAX_CHOSEN = "softmax_chosen"  # experts chosen by their logits, softmax over the chosen (gpt-oss)


class SharedExpert(str, Enum):
    NONE = "none"
    GATED = "gated"  # ffn_*_shexp, scaled by sigmoid(ffn_gate_inp_shexp . x) (qwen2moe)
    PLAIN = "plain"  # ffn_*_shexp added as is, expert_shared_count experts wide (glm4moe, deepseek2)
    ONE = "one"  # ffn_*_shexp added as is, one routed expert wide (llama4)
    SIZED = "sized"  # ffn_*_shexp added as is, expert_shared_feed_forward_length wide; none when that
    # key is absent or 0 (granitemoe: llama.cpp maps GraniteMoeShared to the same architecture)


class ExpertWidth(str, Enum):
    """Rows of each expert when `{arch}.expert_feed_forward_length` is absent (llama.cpp's
    per-architecture defaults)."""

    FF = "ff"  # feed_forward_length (llama's Mixtral layout, olmoe)
    FF_PER_USED = "ff_per_used"  # feed_forward_length / expert_used_count (qwen2moe, qwen3moe)


class Tying(str, Enum):
    OPTIONAL = "optional"  # `output` may be absent -> reuse token_embd
    ALWAYS = "always"  # never has `output`; always token_embd
    NEVER = "never"  # `output` is required


@dataclass(frozen=True, kw_only=True)
class SlidingWindow:
    """Interleaved local attention: layer il is sliding iff il % pattern < pattern - 1."""

    default_window: int  # when `{arch}.attention.sliding_window` is absent (0 = none)
    default_pattern: int  # when `{arch}.attention.sliding_window_pattern` is absent
    default_rope_base: float | None  # base of sliding layers when freq_base_swa is absent
    # (None = the global freq_base)
    rope_scaling: bool  # whether sliding layers apply the file's rope scaling


@dataclass(frozen=True, kw_only=True)
class Experts:
    """A Mixture-of-Experts feed-forward: a router picks `{arch}.expert_used_count` of
    `{arch}.expert_count` experts per token (stored as 3-D `ffn_{gate,up,down}_exps` tensors)
    and sums their outputs weighted by the router's probabilities."""

    required: bool  # expert_count must be > 0; else a count of 0 (or none) means a dense model
    gating: Gating
    normalize: bool  # the chosen experts' weights are divided by their sum
    width_default: ExpertWidth
    shared: SharedExpert
    # DeepSeek-style routing read from the file (glm4moe, deepseek2): expert_gating_func
    # (`gating` when absent), expert_weights_norm (`normalize` when absent),
    # expert_weights_scale, expert_group_count / expert_group_used_count,
    # leading_dense_block_count, and an optional per-expert selection bias `exp_probs_b`.
    routing_keys: bool
    biases: bool  # a router bias `ffn_gate_inp.bias` and per-expert biases `ffn_*_exps.bias` (gpt-oss)
    clamped_swiglu: bool  # min(g, 7) sigmoid(1.702 min(g, 7)) (clamp(u, -7, 7) + 1) (gpt-oss)
    interleaved: bool  # experts only in layers il with (il + 1) % `{arch}.interleave_moe_layer_step` == 0,
    # a dense feed-forward of feed_forward_length in the others (llama4)
    weight_input: bool  # the router weight multiplies the expert's input, not its output (llama4)


@dataclass(frozen=True, kw_only=True)
class AttnTemperature:
    """Queries of NoPE layers scaled per position by 1 + scale ln(floor((pos + offset) / floor_scale) + 1)
    (llama4's attention temperature tuning; llama.cpp's constants, no GGUF key)."""

    floor_scale: int
    scale: float
    offset: float


@dataclass(frozen=True, kw_only=True)
class NoPE:
    """Layers without rotary embedding: il with (il + 1) % `step` == 0 (llama4), the others
    chunked. A file whose `{arch}.attention.sliding_window` is 0 ropes every layer and chunks
    none (llama.cpp's rule)."""

    step: int
    chunk: int  # the other layers attend within chunks of this many positions (llama.cpp: 8192)
    temperature: AttnTemperature | None  # on the NoPE layers' queries
    l2_norm: bool  # RMSNorm without weight of each q and k head after rope on the other layers,
    l2_norm_off_experts: int | None  # ...except in files with this expert_count (llama.cpp and
    # transformers: Llama 4 Maverick, 128 experts, has none; Scout, 16, has it)


@dataclass(frozen=True, kw_only=True)
class FamilySpec:
    """The fixed architectural choices of one `general.architecture`."""

    arch: str
    norm: Norm
    rope: Rope
    mlp: Mlp
    fused_gate_up: bool  # `ffn_up` holds [gate; up] stacked (phi3): first F rows are the gate
    parallel_block: bool  # x + attn(LN(x)) + mlp(LN(x)) with one norm (phi2)
    qk_norm: QkNorm  # RMSNorm of q and k before rope
    post_norms: bool  # post_attention_norm / post_ffw_norm on branch outputs (gemma2/3)
    embed_scale: bool  # multiply embeddings by sqrt(E) (gemma family)
    tying: Tying
    output_bias: bool  # `output.bias` exists (phi2)
    sliding: SlidingWindow | None
    attn_softcap_default: float | None  # None: no attention softcap; else key or this value
    final_softcap_key: bool  # read `{arch}.final_logit_softcapping`
    final_softcap_default: float | None  # used when the key is absent (gemma2: 30)
    experts: Experts | None  # None: a dense feed-forward in every layer
    attention: AttnKind
    attn_sinks: bool  # a learned logit per head `attn_sinks` joins each query's softmax (gpt-oss)
    ffn_norm: str  # the pre-feed-forward norm's tensor (glm4moe: post_attention_norm)
    scales: bool  # granite: `{arch}.embedding_scale` multiplies the embeddings, `residual_scale` each
    # branch before its residual add, `attention.scale` replaces 1/sqrt(D), logits divided by `logit_scale`
    nope: NoPE | None  # layers without rotary embedding (llama4)
    rope_switch: bool  # `{arch}.rope.scaling.finetuned` = false turns rope off in every layer; absent
    # or true: on (granite, as llama.cpp reads it: the converter writes false for NoPE Granite 4 files)
    nextn_layers: bool  # the trailing `nextn_predict_layers` blocks (next-token prediction
    # heads for speculative decoding) are in the file but not part of the decoder: never run,
    # never loaded, as llama.cpp skips them (glm4moe)
