"""The named tiny models the tests use (one per family, quirk and storage type) and a cache.

Each case is a `TinySpec`; `TinyFiles` writes a case's file once per pytest session into a
shared directory, so that every test module can ask for the same files cheaply.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
from gguf import GGMLQuantizationType as QType
from ggufgen import TinySpec, with_changes, write_tiny_gguf

FAMILY_CASES: dict[str, TinySpec] = {
    "llama": TinySpec("llama"),
    "mistral3": TinySpec("mistral3", seed=1),
    "qwen2": TinySpec("qwen2", seed=2),
    # key_length 24 != E/H = 16: head dim must come from the file, not E/H.
    "qwen3": TinySpec("qwen3", head_dim=24, seed=3),
    # Partial rotary: 6 of 16 dims rotate.
    "phi2": TinySpec("phi2", rope_dims=6, seed=4),
    # Fused qkv and fused gate|up; partial rotary with rope.dimension_count 12 < 16.
    "phi3": TinySpec("phi3", fused_qkv=True, rope_dims=12, seed=5),
    # freq_base 1e5 (transformers' GGUF loader drops it); tied output as in real models.
    "starcoder2": TinySpec("starcoder2", rope_base=1e5, tied=True, seed=6),
    "gemma": TinySpec("gemma", tied=True, seed=7),
    # 4 layers: sliding layers 0 and 2 with a window of 6 (sequences are 20 long);
    # small softcaps and large q/k so that both caps change the result.
    "gemma2": TinySpec(
        "gemma2", n_layer=4, tied=True, sliding_window=6, attn_softcap=5.0, final_softcap=3.0,
        qk_gain=3.0, seed=8,
    ),
    # 6 layers so that layer 5 is global; freq_base 1e6 with freq_base_swa absent (=10000).
    "gemma3": TinySpec("gemma3", n_layer=6, tied=True, sliding_window=5, rope_base=1e6, seed=9),
    # Granite 3.x dense: embedding x12, residual branches x0.22, attention scale 1/64 instead of
    # 1/sqrt(16), logits divided by 8 (Granite-3.1-8B's values, the attention one made tiny-sized).
    "granite": TinySpec("granite", granite_scales=(12.0, 0.22, 0.015625, 8.0), seed=31),
}

QUIRK_CASES: dict[str, TinySpec] = {
    "llama_tied": TinySpec("llama", n_layer=4, tied=True, seed=10),
    "llama_fused_qkv": TinySpec("llama", fused_qkv=True, seed=11),
    # q/k biases are permuted with their rows by llama.cpp's converter.
    "llama_attn_bias": TinySpec("llama", attn_bias=True, seed=17),
    "llama_rope_linear": TinySpec("llama", rope_linear_factor=4.0, seed=12),
    "llama_rope_freqs": TinySpec("llama", rope_freqs=True, rope_base=500.0, seed=13),
    # YaRN as Qwen2.5/Qwen3 128k files set it: factor 4 over an original context of 4096, so
    # that the ramp between extrapolated and interpolated pairs spans pairs 3..9 of 12.
    "qwen3_rope_yarn": TinySpec("qwen3", head_dim=24, n_ctx=16384, rope_yarn=(4.0, 4096), seed=24),
    # NORM rope with YaRN and the rope.scaling.attn_factor key.
    "llama_rope_yarn_attn_factor": TinySpec(
        "llama", n_ctx=16384, rope_base=500.0, rope_yarn=(8.0, 2048), rope_attn_factor=0.8, seed=25
    ),
    "phi2_fused_qkv": TinySpec("phi2", rope_dims=6, fused_qkv=True, seed=14),
    # Phi-3.5 / Phi-4-mini longrope. llama.cpp takes the long factors when the context per
    # sequence (here the file's 128) exceeds the original 16; transformers when the forward's
    # longest position does (20 tokens > 16): both use the long factors and the attention
    # factor sqrt(1 + ln 8 / ln 16).
    "phi3_longrope_long": TinySpec(
        "phi3", fused_qkv=True, rope_dims=12, n_ctx=128, longrope_orig_ctx=16, seed=32
    ),
    # A context equal to the original one: both take the short factors (attention factor 1).
    "phi3_longrope_short": TinySpec(
        "phi3", fused_qkv=True, rope_dims=12, n_ctx=32, longrope_orig_ctx=32, seed=33
    ),
    # Real Phi-3 files carry a sliding_window key that llama.cpp ignores.
    "phi3_sliding_window_key": TinySpec("phi3", fused_qkv=True, rope_dims=12, sliding_window=4, seed=18),
    # Sliding layers use freq_base_swa, global ones freq_base with linear scaling.
    "gemma3_swa_base_linear": TinySpec(
        "gemma3", n_layer=6, tied=True, sliding_window=5, rope_base=1e6, rope_base_swa=100.0,
        rope_linear_factor=4.0, seed=15,
    ),
    "gemma3_final_softcap": TinySpec(
        "gemma3", n_layer=6, tied=True, sliding_window=5, final_softcap=3.0, seed=16,
    ),
    # A false rope.scaling.finetuned: llama.cpp ropes no layer of a granite file (Granite 4's NoPE
    # attention; transformers: GraniteMoeHybrid with position_embedding_type None). Attention
    # scale 1/4 and residual 0.5 so that rope matters: roped, the logits move by ~0.25.
    "granite_nope": TinySpec("granite", granite_scales=(12.0, 0.5, 0.25, 2.0), rope_finetuned=False, seed=36),
}

MOE_CASES: dict[str, TinySpec] = {
    # key_length 24 != E/H; expert width from expert_feed_forward_length; 3 of 8 experts.
    "qwen3moe": TinySpec("qwen3moe", n_layer=3, head_dim=24, n_expert=8, n_expert_used=3, n_ff_exp=32, seed=20),
    # Width without the key: feed_forward_length / expert_used_count = 32; shared expert of 64.
    "qwen2moe": TinySpec("qwen2moe", n_layer=3, n_ff=64, n_expert=6, n_expert_used=2, n_ff_shexp=64, seed=21),
    # Mixtral's layout: llama with expert_count; experts as wide as feed_forward_length.
    "mixtral": TinySpec("llama", n_layer=3, n_ff=32, n_expert=4, n_expert_used=2, seed=22),
    # q/k norms over the whole projections; unnormalised top-k weights.
    "olmoe": TinySpec("olmoe", n_layer=3, n_ff=32, n_expert=8, n_expert_used=2, seed=23),
    # GLM-4.5-Air's layout: half of each head rotates (NEOX), q/k/v biases, a dense first
    # layer, sigmoid gating with a selection bias, normalised and scaled weights, one shared
    # expert, and a trailing next-token prediction block that is never run.
    "glm4moe": TinySpec(
        "glm4moe", n_layer=3, head_dim=24, rope_dims=12, n_ff=64, n_expert=8, n_expert_used=3, n_ff_exp=32,
        n_shared=1, n_dense_lead=1, n_nextn=1, gating_func=2, weights_norm=True, weights_scale=2.5,
        selection_bias=True, seed=26,
    ),
    # DeepSeek-V3's layout: queries through a low-rank bottleneck, keys and values from a latent
    # (split attn_k_b / attn_v_b as llama.cpp's newer files have them), sigmoid gating with a
    # selection bias over 4 groups of which 2 are eligible, normalised and scaled weights, a
    # shared expert, a dense first layer, and YaRN with its mscale folded into the scores.
    "deepseek3": TinySpec(
        "deepseek2", n_layer=3, n_head_kv=1, head_dim=48, rope_dims=16, head_dim_v=32, kv_lora_rank=32,
        q_lora_rank=32, split_kv_b=True, n_ff=64, n_expert=8, n_expert_used=3, n_ff_exp=32, n_shared=1,
        n_dense_lead=1, gating_func=2, weights_norm=True, weights_scale=2.5, selection_bias=True, n_group=4,
        n_group_used=2, n_ctx=16384, rope_yarn=(4.0, 4096), yarn_log_mul=0.0707, seed=28,
    ),
    # DeepSeek-V2-Lite's layout: one query projection, attn_kv_b, softmax gating (the default
    # without expert_gating_func), greedy top-k, unnormalised scaled weights, 2 shared experts.
    "deepseek2": TinySpec(
        "deepseek2", n_layer=3, n_head_kv=4, head_dim=48, rope_dims=16, head_dim_v=32, kv_lora_rank=32,
        n_ff=64, n_expert=8, n_expert_used=2, n_ff_exp=32, n_shared=2, n_dense_lead=1, weights_scale=1.5,
        seed=29,
    ),
    # gpt-oss: sliding layers 0 and 2 of 4 (window 6 over 20 tokens), sinks, q/k/v/o, router and
    # expert biases, the clamped SwiGLU, softmax over the chosen experts' logits, YaRN.
    "gpt_oss": TinySpec(
        "gpt-oss", n_layer=4, n_head=4, n_head_kv=2, head_dim=16, n_ff=32, n_expert=8, n_expert_used=2,
        n_ff_exp=32, sliding_window=6, n_ctx=16384, rope_yarn=(4.0, 4096), rope_base=150000.0, seed=30,
    ),
    # GraniteMoeShared (llama.cpp writes it as granitemoe with ffn_*_shexp): the four scales,
    # Mixtral's routing, a shared expert of 48, and rope.scaling.finetuned = true (rope on) as the
    # converter writes it for Granite 4's attention-only files.
    "granitemoe": TinySpec(
        "granitemoe", n_layer=3, n_ff=32, n_expert=4, n_expert_used=2, n_ff_shexp=48,
        granite_scales=(12.0, 0.22, 0.015625, 8.0), rope_finetuned=True, seed=34,
    ),
    # Llama 4 Scout's layout: experts in layers 1 and 3 (dense 128 wide in 0 and 2), chosen by
    # sigmoid(logit) with the weight on the expert's input, a shared expert, layer 3 NoPE, L2
    # q/k norm after rope in the others, llama3 rope scaling as a rope_freqs tensor.
    "llama4": TinySpec(
        "llama4", n_layer=4, n_ff=128, n_expert=4, n_expert_used=1, n_ff_exp=32, moe_step=2,
        rope_base=500.0, llama3_rope=(8.0, 1.0, 4.0, 64), seed=35,
    ),
    # Llama 4 Maverick's layout: 128 experts (here 8 wide), which llama.cpp and transformers
    # (use_qk_norm false) run without the L2 q/k norm.
    "llama4_128e": TinySpec(
        "llama4", n_layer=4, n_ff=128, n_expert=128, n_expert_used=1, n_ff_exp=8, moe_step=2,
        rope_base=500.0, llama3_rope=(8.0, 1.0, 4.0, 64), seed=37,
    ),
}

MOE_QUANT_CASES: dict[str, TinySpec] = {
    "qwen3moe_q4_0": with_changes(MOE_CASES["qwen3moe"], qtype=QType.Q4_0),
    "qwen2moe_q8_0": with_changes(MOE_CASES["qwen2moe"], qtype=QType.Q8_0),
    "mixtral_q4_1": with_changes(MOE_CASES["mixtral"], qtype=QType.Q4_1),
    "olmoe_q5_0": with_changes(MOE_CASES["olmoe"], qtype=QType.Q5_0),
    # GLM-4.5 (355B) adds per-head q/k norms.
    "glm4moe_q8_0": with_changes(MOE_CASES["glm4moe"], qtype=QType.Q8_0, qk_norm=True, seed=27),
    "deepseek3_q8_0": with_changes(MOE_CASES["deepseek3"], qtype=QType.Q8_0),
    "deepseek2_q8_0": with_changes(MOE_CASES["deepseek2"], qtype=QType.Q8_0),
    "gpt_oss_q8_0": with_changes(MOE_CASES["gpt_oss"], qtype=QType.Q8_0),
    # GraniteMoe without the shared expert.
    "granitemoe_q8_0": with_changes(MOE_CASES["granitemoe"], qtype=QType.Q8_0, n_ff_shexp=0),
    # Two of four experts, and a file whose sliding_window is 0: every layer ropes.
    "llama4_q4_0": with_changes(MOE_CASES["llama4"], qtype=QType.Q4_0, n_expert_used=2, sliding_window=0),
    # gpt-oss files store their experts in MXFP4 (here every weight, attention included).
    "gpt_oss_mxfp4": with_changes(MOE_CASES["gpt_oss"], qtype=QType.MXFP4),
}

QUANT_CASES: dict[str, TinySpec] = {
    f"llama_{q.name.lower()}": with_changes(FAMILY_CASES["llama"], qtype=q)
    for q in (QType.Q8_0, QType.Q4_0, QType.Q4_1, QType.Q5_0, QType.Q5_1, QType.F16, QType.BF16)
}
QUANT_CASES["phi3_q8_0"] = with_changes(FAMILY_CASES["phi3"], qtype=QType.Q8_0)
QUANT_CASES["gemma3_q4_1"] = with_changes(FAMILY_CASES["gemma3"], qtype=QType.Q4_1)
QUANT_CASES["qwen3_q5_0"] = with_changes(FAMILY_CASES["qwen3"], qtype=QType.Q5_0)
QUANT_CASES["granite_q8_0"] = with_changes(FAMILY_CASES["granite"], qtype=QType.Q8_0)
QUANT_CASES["gemma2_q8_0"] = with_changes(FAMILY_CASES["gemma2"], qtype=QType.Q8_0)
QUANT_CASES["qwen2_q8_0"] = with_changes(FAMILY_CASES["qwen2"], qtype=QType.Q8_0)

ALL_CASES: dict[str, TinySpec] = {
    **FAMILY_CASES, **QUIRK_CASES, **QUANT_CASES, **MOE_CASES, **MOE_QUANT_CASES,
}


class TinyFiles:
    """Writes each named case into `root` the first time it is asked for."""

    def __init__(self, root: Path) -> None:
        self.root = root
        root.mkdir(parents=True, exist_ok=True)

    def path(self, case: str) -> Path:
        """The file of `case`, written now if this session has not written it yet."""
        path = self.root / f"{case}.gguf"
        if not path.exists():
            # Written under a temporary name and renamed, so a reader never sees half a file.
            partial = path.with_suffix(".partial")
            write_tiny_gguf(partial, ALL_CASES[case])
            partial.rename(path)
        return path


def token_batch(spec: TinySpec, batch: int = 2, length: int = 20, seed: int = 0) -> np.ndarray:
    """Random token ids [B, T] int64 within the tiny vocabulary."""
    return np.random.default_rng(seed).integers(0, spec.n_vocab, (batch, length), dtype=np.int64)
