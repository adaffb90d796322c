"""The supported families, one explicit `FamilySpec` each, looked up by architecture."""

from __future__ import annotations

from dataclasses import replace

from ppinfer.errors import ModelFileError
from ppinfer.families.spec import (
    AttnKind,
    AttnTemperature,
    Experts,
    ExpertWidth,
    FamilySpec,
    Gating,
    Mlp,
    NoPE,
    Norm,
    QkNorm,
    Rope,
    SharedExpert,
    SlidingWindow,
    Tying,
)

LLAMA = FamilySpec(
    arch="llama",
    norm=Norm.RMS,
    rope=Rope.NORM,  # llama.cpp's converter permutes q/k rows for ggml's NORM rope
    mlp=Mlp.SWIGLU,
    fused_gate_up=False,
    parallel_block=False,
    qk_norm=QkNorm.NONE,
    post_norms=False,
    embed_scale=False,
    tying=Tying.OPTIONAL,
    output_bias=False,
    sliding=None,  # llama.cpp ignores Mistral 7B's sliding window too
    attn_softcap_default=None,
    final_softcap_key=False,
    final_softcap_default=None,
    # Mixtral's layout: a file with expert_count > 0 has experts in every layer.
    experts=Experts(
        required=False, gating=Gating.SOFTMAX, normalize=True, width_default=ExpertWidth.FF,
        shared=SharedExpert.NONE, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
    ffn_norm="ffn_norm",
    scales=False,
    nope=None,
    rope_switch=False,
    nextn_layers=False,
    attention=AttnKind.STANDARD,
    attn_sinks=False,
)

MISTRAL3 = replace(LLAMA, arch="mistral3", experts=None)

QWEN2 = replace(LLAMA, arch="qwen2", rope=Rope.NEOX, experts=None)

QWEN3 = replace(QWEN2, arch="qwen3", qk_norm=QkNorm.HEAD)

QWEN2MOE = replace(
    QWEN2,
    arch="qwen2moe",
    tying=Tying.NEVER,
    experts=Experts(
        required=True, gating=Gating.SOFTMAX, normalize=False, width_default=ExpertWidth.FF_PER_USED,
        shared=SharedExpert.GATED, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
)

QWEN3MOE = replace(
    QWEN3,
    arch="qwen3moe",
    experts=Experts(
        required=True, gating=Gating.SOFTMAX, normalize=True, width_default=ExpertWidth.FF_PER_USED,
        shared=SharedExpert.NONE, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
)

OLMOE = replace(
    LLAMA,
    arch="olmoe",
    rope=Rope.NEOX,
    qk_norm=QkNorm.FULL,
    tying=Tying.NEVER,
    experts=Experts(
        required=True, gating=Gating.SOFTMAX, normalize=False, width_default=ExpertWidth.FF,
        shared=SharedExpert.NONE, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
)

GLM4MOE = replace(
    QWEN2,
    arch="glm4moe",
    qk_norm=QkNorm.HEAD_IF_PRESENT,  # GLM-4.5 (355B) has them, GLM-4.5-Air not
    experts=Experts(
        required=True, gating=Gating.SIGMOID, normalize=False, width_default=ExpertWidth.FF_PER_USED,
        shared=SharedExpert.PLAIN, routing_keys=True, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
    ffn_norm="post_attention_norm",
    nextn_layers=True,
)

DEEPSEEK2 = replace(
    LLAMA,
    arch="deepseek2",
    rope=Rope.NORM,  # the rotary halves of q and k are stored pair-interleaved
    attention=AttnKind.LATENT,
    experts=Experts(
        required=True, gating=Gating.SOFTMAX, normalize=False, width_default=ExpertWidth.FF_PER_USED,
        shared=SharedExpert.PLAIN, routing_keys=True, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
)

GPT_OSS = replace(
    QWEN2,
    arch="gpt-oss",
    tying=Tying.NEVER,
    sliding=SlidingWindow(default_window=128, default_pattern=2, default_rope_base=None, rope_scaling=True),
    experts=Experts(
        required=True, gating=Gating.SOFTMAX_CHOSEN, normalize=False, width_default=ExpertWidth.FF,
        shared=SharedExpert.NONE, routing_keys=False, biases=True, clamped_swiglu=True,
        interleaved=False, weight_input=False,
    ),
    ffn_norm="post_attention_norm",
    attn_sinks=True,
)

# Granite keeps llama's layout (the converter permutes q/k for NORM rope) and adds four scales;
# a false rope.scaling.finetuned makes every layer NoPE.
GRANITE = replace(LLAMA, arch="granite", experts=None, scales=True, rope_switch=True)

# Granite MoE and Granite MoE Shared: Mixtral-style routing; the shared expert (GraniteMoeShared)
# is there when expert_shared_feed_forward_length is.
GRANITEMOE = replace(
    GRANITE,
    arch="granitemoe",
    experts=Experts(
        required=True, gating=Gating.SOFTMAX, normalize=True, width_default=ExpertWidth.FF,
        shared=SharedExpert.SIZED, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=False, weight_input=False,
    ),
)

# Llama 4 (text): q/k as HF stores them (already pair-interleaved: NORM rope, no permutation),
# experts every interleave_moe_layer_step layers chosen by sigmoid(logit) top-k with the weight on
# the expert's input, one shared expert, NoPE every 4th layer with temperature tuning, L2 q/k
# norm after rope (not in 128-expert files: Maverick) and attention within 8192-token chunks
# elsewhere, rope_freqs (llama3 scaling).
LLAMA4 = replace(
    LLAMA,
    arch="llama4",
    experts=Experts(
        required=False, gating=Gating.SIGMOID, normalize=False, width_default=ExpertWidth.FF,
        shared=SharedExpert.ONE, routing_keys=False, biases=False, clamped_swiglu=False,
        interleaved=True, weight_input=True,
    ),
    nope=NoPE(
        step=4, chunk=8192, temperature=AttnTemperature(floor_scale=8192, scale=0.1, offset=1.0), l2_norm=True,
        l2_norm_off_experts=128,
    ),
)

PHI2 = replace(
    LLAMA,
    arch="phi2",
    experts=None,
    norm=Norm.LAYER,
    rope=Rope.NEOX,
    mlp=Mlp.GELU,
    parallel_block=True,
    tying=Tying.NEVER,
    output_bias=True,
)

PHI3 = replace(LLAMA, arch="phi3", rope=Rope.NEOX, fused_gate_up=True, experts=None)

STARCODER2 = replace(
    LLAMA, arch="starcoder2", norm=Norm.LAYER, rope=Rope.NEOX, mlp=Mlp.GELU, experts=None
)

GEMMA = replace(
    LLAMA,
    arch="gemma",
    experts=None,
    rope=Rope.NEOX,
    mlp=Mlp.GEGLU,
    embed_scale=True,
    tying=Tying.ALWAYS,
)

GEMMA2 = replace(
    GEMMA,
    arch="gemma2",
    post_norms=True,
    tying=Tying.OPTIONAL,
    sliding=SlidingWindow(
        default_window=4096, default_pattern=2, default_rope_base=None, rope_scaling=True
    ),
    attn_softcap_default=50.0,
    final_softcap_key=True,
    final_softcap_default=30.0,
)

GEMMA3 = replace(
    GEMMA2,
    arch="gemma3",
    qk_norm=QkNorm.HEAD,
    sliding=SlidingWindow(
        default_window=0, default_pattern=6, default_rope_base=10000.0, rope_scaling=False
    ),
    attn_softcap_default=None,
    final_softcap_default=None,
)

FAMILIES: dict[str, FamilySpec] = {
    spec.arch: spec
    for spec in (
        LLAMA, MISTRAL3, QWEN2, QWEN3, PHI2, PHI3, STARCODER2, GEMMA, GEMMA2, GEMMA3,
        QWEN2MOE, QWEN3MOE, OLMOE, GLM4MOE, DEEPSEEK2, GPT_OSS, GRANITE, GRANITEMOE, LLAMA4,
    )
}
SUPPORTED_ARCHITECTURES: tuple[str, ...] = tuple(FAMILIES)


def get_spec(arch: str, source: str = "") -> FamilySpec:
    """The spec for `general.architecture` = `arch`; unknown ones list what is supported."""
    if arch not in FAMILIES:
        where = f"{source}: " if source else ""
        raise ModelFileError(
            f"{where}unsupported architecture {arch!r}; supported: "
            + ", ".join(SUPPORTED_ARCHITECTURES)
        )
    return FAMILIES[arch]
