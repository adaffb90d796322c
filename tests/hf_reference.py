"""Reference logits from Hugging Face transformers for the tiny GGUF files.

Two routes build a transformers model for a tiny file, both with a config written here from
the file's `TinySpec` (so settings transformers' GGUF loader drops — rope scaling, starcoder2's
freq_base, gemma softcaps and query scale, qwen3's key_length, phi3's rope.dimension_count,
gemma3's freq_base_swa — are set explicitly):

- `load_with_gguf_loader`: weights through transformers' own GGUF loader (it dequantizes with
  gguf-py, un-permutes llama q/k and subtracts Gemma's +1 itself). Used wherever it supports
  the family and the tensor layout.
- `load_by_hand`: weights read with gguf-py and mapped onto the transformers module here, for
  the families and layouts the loader cannot read (phi2, gemma, mistral3, llama's fused qkv).

`rope_freqs` factors, which no transformers rope type represents directly, are applied by
dividing the model's rotary `inv_freq` buffer by them, exactly as the reference page defines
theta_i. None of this imports ppinfer.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator
from pathlib import Path
from unittest import mock

import gguf
import numpy as np
import torch
from ggufgen import GEMMA_LIKE, LLAMA_LIKE, TinySpec, tiny_tensors
from transformers import (
    AutoModelForCausalLM,
    DeepseekV2Config,
    DeepseekV3Config,
    Gemma2Config,
    Gemma3TextConfig,
    GemmaConfig,
    Glm4MoeConfig,
    GptOssConfig,
    GraniteConfig,
    GraniteMoeConfig,
    GraniteMoeHybridConfig,
    GraniteMoeSharedConfig,
    Llama4TextConfig,
    LlamaConfig,
    MixtralConfig,
    OlmoeConfig,
    Phi3Config,
    PhiConfig,
    PretrainedConfig,
    PreTrainedModel,
    Qwen2Config,
    Qwen2MoeConfig,
    Qwen3Config,
    Qwen3MoeConfig,
    Starcoder2Config,
)
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

GGUF_LOADER_ARCHS = ("llama", "qwen2", "qwen3", "phi3", "starcoder2", "gemma2", "gemma3", "qwen2moe", "qwen3moe")
"""Families transformers' GGUF loader can read (reference page §7; its MoE support covers the
two Qwen MoE families, not llama's Mixtral layout nor olmoe)."""


def loader_reads(spec: TinySpec) -> bool:
    """Whether transformers' GGUF loader reads this file's tensors (not llama's fused qkv, not
    llama with experts)."""
    return spec.arch in GGUF_LOADER_ARCHS and not (spec.arch == "llama" and (spec.fused_qkv or spec.n_expert))


def _rope(spec: TinySpec, base: float, linear: float | None, yarn: bool = True) -> dict[str, object]:
    params: dict[str, object] = {"rope_type": "default", "rope_theta": base}
    if linear is not None:
        params = {"rope_type": "linear", "factor": linear, "rope_theta": base}
    if yarn and spec.rope_yarn is not None:
        factor, original = spec.rope_yarn
        params = {
            "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original, "rope_theta": base,
            "beta_fast": 32.0, "beta_slow": 1.0,
        }
        if spec.rope_attn_factor is not None:  # given, transformers uses it instead of its default
            params["attention_factor"] = spec.rope_attn_factor * (0.1 * math.log(factor) + 1.0)
    if spec.longrope_orig_ctx is not None:
        params = {
            "rope_type": "longrope", "rope_theta": base, "original_max_position_embeddings": spec.longrope_orig_ctx,
            "long_factor": _gguf_floats(spec, "rope_factors_long.weight"),
            "short_factor": _gguf_floats(spec, "rope_factors_short.weight"),
        }
    if spec.llama3_rope is not None:
        factor, low, high, original = spec.llama3_rope
        params = {
            "rope_type": "llama3", "rope_theta": base, "factor": factor, "low_freq_factor": low,
            "high_freq_factor": high, "original_max_position_embeddings": original,
        }
    # Always explicit: PhiConfig silently defaults to a factor of 0.5.
    params["partial_rotary_factor"] = spec.n_rot / spec.head_dim
    return params


def _gguf_floats(spec: TinySpec, name: str) -> list[float]:
    """A 1-D F32 tensor of the file `spec` describes (the arrays the file holds), as
    transformers' config takes it."""
    return [float(v) for v in tiny_tensors(spec)[name]]


def hf_config(spec: TinySpec) -> PretrainedConfig:
    """The transformers config equivalent to what llama.cpp reads from the tiny file."""
    common: dict[str, object] = {
        "vocab_size": spec.n_vocab,
        "hidden_size": spec.n_embd,
        "intermediate_size": spec.n_ff,
        "num_hidden_layers": spec.n_layer,
        "num_attention_heads": spec.n_head,
        "num_key_value_heads": spec.n_head_kv,
        "max_position_embeddings": spec.n_ctx,
        "tie_word_embeddings": spec.tied,
        "pad_token_id": None,
        "bos_token_id": None,
        "eos_token_id": None,
    }
    rope = _rope(spec, spec.rope_base, spec.rope_linear_factor)
    arch = spec.arch
    # Every layer sparse: transformers' Qwen MoE defaults leave some layers dense otherwise.
    qwen_moe: dict[str, object] = {
        "num_experts": spec.n_expert,
        "num_experts_per_tok": spec.n_expert_used,
        "moe_intermediate_size": spec.expert_width,
        "decoder_sparse_step": 1,
        "mlp_only_layers": [],
    }
    if arch == "llama" and spec.n_expert:
        return MixtralConfig(
            **dict(common, intermediate_size=spec.expert_width), head_dim=spec.head_dim, rms_norm_eps=1e-5,
            num_local_experts=spec.n_expert, num_experts_per_tok=spec.n_expert_used, sliding_window=None,
            rope_parameters=rope,
        )
    if arch in ("granite", "granitemoe"):
        return _granite_config(spec, common, rope)
    if arch == "llama4":
        return _llama4_config(spec, common, rope)
    if arch == "qwen2moe":
        return Qwen2MoeConfig(
            **common, **qwen_moe, rms_norm_eps=1e-5, norm_topk_prob=False, qkv_bias=True,
            shared_expert_intermediate_size=spec.n_ff_shexp, rope_parameters=rope,
        )
    if arch == "qwen3moe":
        return Qwen3MoeConfig(
            **common, **qwen_moe, head_dim=spec.head_dim, rms_norm_eps=1e-5, norm_topk_prob=True, rope_parameters=rope
        )
    if arch == "deepseek2":
        return _deepseek_config(spec, common)
    if arch == "gpt-oss":
        if spec.rope_yarn is not None:  # llama.cpp floors and ceils the ramp's ends, as truncate does
            rope = dict(rope, truncate=True)
        return GptOssConfig(
            **dict(common, intermediate_size=spec.expert_width), head_dim=spec.head_dim, rms_norm_eps=1e-5,
            num_local_experts=spec.n_expert, num_experts_per_tok=spec.n_expert_used,
            sliding_window=spec.sliding_window, rope_parameters=rope,
            layer_types=["sliding_attention" if i % 2 == 0 else "full_attention" for i in range(spec.n_layer)],
        )
    if arch == "glm4moe":
        return Glm4MoeConfig(
            **common, head_dim=spec.head_dim, rms_norm_eps=1e-5, attention_bias=True, use_qk_norm=spec.qk_norm,
            moe_intermediate_size=spec.expert_width, num_experts_per_tok=spec.n_expert_used,
            n_routed_experts=spec.n_expert, n_shared_experts=spec.n_shared, first_k_dense_replace=spec.n_dense_lead,
            norm_topk_prob=bool(spec.weights_norm), routed_scaling_factor=spec.weights_scale or 1.0,
            n_group=1, topk_group=1, rope_parameters=rope,
        )
    if arch == "olmoe":
        return OlmoeConfig(
            **dict(common, intermediate_size=spec.expert_width), rms_norm_eps=1e-5, num_experts=spec.n_expert,
            num_experts_per_tok=spec.n_expert_used, norm_topk_prob=False, clip_qkv=None, rope_parameters=rope,
        )
    if arch in LLAMA_LIKE:
        return LlamaConfig(
            **common, head_dim=spec.head_dim, rms_norm_eps=1e-5, attention_bias=spec.attn_bias, rope_parameters=rope
        )
    if arch == "qwen2":
        return Qwen2Config(**common, rms_norm_eps=1e-5, rope_parameters=rope)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=spec.head_dim, rms_norm_eps=1e-5, rope_parameters=rope)
    if arch == "phi2":
        return PhiConfig(**common, layer_norm_eps=1e-5, hidden_act="gelu_new", rope_parameters=rope)
    if arch == "phi3":
        # Phi3Config's own original_max_position_embeddings (default 4096) overrides the rope's.
        original = {"original_max_position_embeddings": spec.longrope_orig_ctx} if spec.longrope_orig_ctx else {}
        return Phi3Config(**common, rms_norm_eps=1e-5, rope_parameters=rope, **original)
    if arch == "starcoder2":
        return Starcoder2Config(
            **common, norm_epsilon=1e-5, use_bias=True, hidden_act="gelu_pytorch_tanh", rope_parameters=rope
        )
    # Gemma families: llama.cpp scales scores by 1/sqrt(head_dim), transformers by
    # query_pre_attn_scalar**-0.5 (default 256), so the scalar is set to head_dim.
    gemma: dict[str, object] = dict(common, head_dim=spec.head_dim, rms_norm_eps=1e-6)
    if spec.sliding_window is None:
        gemma["layer_types"] = ["full_attention"] * spec.n_layer
    if arch == "gemma":
        return GemmaConfig(**gemma, hidden_act="gelu_pytorch_tanh", rope_parameters=rope)
    if arch == "gemma2":
        return Gemma2Config(
            **gemma,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=spec.head_dim,
            sliding_window=spec.sliding_window,
            attn_logit_softcapping=spec.attn_softcap,
            final_logit_softcapping=spec.final_softcap,
            rope_parameters=rope,
        )
    if arch == "gemma3":
        # Sliding layers: freq_base_swa (10000 when absent) and no rope scaling.
        local = _rope(spec, 10000.0 if spec.rope_base_swa is None else spec.rope_base_swa, None, yarn=False)
        return Gemma3TextConfig(
            **gemma,
            hidden_activation="gelu_pytorch_tanh",
            query_pre_attn_scalar=spec.head_dim,
            sliding_window=spec.sliding_window,
            final_logit_softcapping=spec.final_softcap,
            rope_parameters={"full_attention": rope, "sliding_attention": local},
        )
    raise ValueError(f"no transformers config for arch {arch!r}")


def _granite_config(spec: TinySpec, common: dict[str, object], rope: dict[str, object]) -> PretrainedConfig:
    """Granite (dense), GraniteMoe, or GraniteMoeShared when the file has a shared expert; the
    four multipliers from the file's scales. A file whose rope.scaling.finetuned is false: a
    GraniteMoeHybrid of attention layers only without rotary embedding (Granite 4's NoPE
    attention; its dense feed-forward, or shared expert, is its `shared_mlp`)."""
    assert spec.granite_scales is not None
    embedding, residual, attention, logit = spec.granite_scales
    scales: dict[str, object] = {
        "embedding_multiplier": embedding, "residual_multiplier": residual, "attention_multiplier": attention,
        "logits_scaling": logit, "rms_norm_eps": 1e-5, "rope_parameters": rope,
    }
    if spec.rope_finetuned is False:
        assert spec.arch == "granite" or spec.n_ff_shexp, "GraniteMoeHybrid's experts come with a shared_mlp"
        return GraniteMoeHybridConfig(
            **dict(common, intermediate_size=spec.expert_width), **scales, position_embedding_type=None,
            layer_types=["full_attention"] * spec.n_layer, num_local_experts=spec.n_expert,
            num_experts_per_tok=spec.n_expert_used,
            shared_intermediate_size=spec.n_ff if spec.arch == "granite" else spec.n_ff_shexp,
        )
    if spec.arch == "granite":
        return GraniteConfig(**common, **scales)
    moe: dict[str, object] = dict(
        common, intermediate_size=spec.expert_width, num_local_experts=spec.n_expert,
        num_experts_per_tok=spec.n_expert_used, **scales,
    )
    if spec.n_ff_shexp:
        return GraniteMoeSharedConfig(**moe, shared_intermediate_size=spec.n_ff_shexp)
    return GraniteMoeConfig(**moe)


def _llama4_config(spec: TinySpec, common: dict[str, object], rope: dict[str, object]) -> PretrainedConfig:
    """Llama4TextConfig: experts every moe_step layers, NoPE every 4th layer and 8192-position
    chunks on the others unless the file's sliding_window is 0, L2 q/k norm, temperature tuning
    with llama.cpp's constants (floor 8192)."""
    no_rope = [1] * spec.n_layer if spec.sliding_window == 0 else [int((i + 1) % 4 != 0) for i in range(spec.n_layer)]
    return Llama4TextConfig(
        **dict(common, intermediate_size=spec.expert_width), intermediate_size_mlp=spec.n_ff, head_dim=spec.head_dim,
        rms_norm_eps=1e-5, num_local_experts=spec.n_expert, num_experts_per_tok=spec.n_expert_used,
        interleave_moe_layer_step=spec.moe_step, no_rope_layers=no_rope, use_qk_norm=spec.n_expert != 128,
        attn_temperature_tuning=True, floor_scale=8192, attn_scale=0.1, attention_chunk_size=8192,
        layer_types=["chunked_attention" if r else "full_attention" for r in no_rope] if spec.sliding_window != 0
        else ["full_attention"] * spec.n_layer,
        rope_parameters=rope,
    )


def _deepseek_config(spec: TinySpec, common: dict[str, object]) -> PretrainedConfig:
    """DeepseekV3 (sigmoid gating with a selection bias, groups, low-rank queries) or DeepseekV2
    (softmax gating, greedy top-k, unnormalised weights)."""
    rope: dict[str, object] = {"rope_type": "default", "rope_theta": spec.rope_base}
    if spec.rope_yarn is not None:
        factor, original = spec.rope_yarn
        mscale = (spec.yarn_log_mul or 0.0) / 0.1  # the file holds 0.1 * mscale_all_dim
        rope = {
            "rope_type": "yarn", "factor": factor, "original_max_position_embeddings": original,
            "rope_theta": spec.rope_base, "beta_fast": 32.0, "beta_slow": 1.0, "mscale": mscale,
            "mscale_all_dim": mscale,
        }
    mla: dict[str, object] = dict(
        common, num_key_value_heads=spec.n_head, intermediate_size=spec.n_ff, rms_norm_eps=1e-6,
        moe_intermediate_size=spec.expert_width, n_routed_experts=spec.n_expert, num_experts_per_tok=spec.n_expert_used,
        n_shared_experts=spec.n_shared, first_k_dense_replace=spec.n_dense_lead,
        routed_scaling_factor=spec.weights_scale or 1.0, kv_lora_rank=spec.kv_lora_rank,
        q_lora_rank=spec.q_lora_rank or None, qk_rope_head_dim=spec.n_rot, qk_nope_head_dim=spec.head_dim - spec.n_rot,
        v_head_dim=spec.head_dim_v, rope_parameters=rope,
    )
    if spec.gating_func == 2:
        return DeepseekV3Config(
            **mla, n_group=spec.n_group, topk_group=spec.n_group_used, norm_topk_prob=bool(spec.weights_norm),
            rope_interleave=True,
        )
    return DeepseekV2Config(**mla, topk_method="greedy")


def _gpt_oss_experts(
    name: str, w: np.ndarray, tensors: dict[str, np.ndarray], out: dict[str, torch.Tensor]
) -> None:
    """transformers' GptOssExperts multiply x @ W with W [n, in, out], gate and up interleaved
    (columns 0, 2, .. the gate), biases likewise."""
    layer, role, kind = name.split(".")[1], name.split(".")[2], name.split(".")[3]
    prefix = f"model.layers.{layer}.mlp.experts."
    if role == "ffn_down_exps":
        out[prefix + ("down_proj" if kind == "weight" else "down_proj_bias")] = torch.from_numpy(
            np.array(w.transpose(0, 2, 1) if kind == "weight" else w)
        )
    elif role == "ffn_gate_exps":
        up = tensors[name.replace("ffn_gate_exps", "ffn_up_exps")]
        if kind == "weight":  # [n, F, E] each -> [n, E, 2F]
            both = np.stack([w.transpose(0, 2, 1), up.transpose(0, 2, 1)], axis=-1)
            out[prefix + "gate_up_proj"] = torch.from_numpy(both.reshape(*both.shape[:2], -1).copy())
        else:  # [n, F] each -> [n, 2F]
            out[prefix + "gate_up_proj_bias"] = torch.from_numpy(np.stack([w, up], axis=-1).reshape(w.shape[0], -1))


def _granite_llama4_experts(
    spec: TinySpec, name: str, w: np.ndarray, tensors: dict[str, np.ndarray], out: dict[str, torch.Tensor]
) -> None:
    """GraniteMoe: experts.gate_up_proj [n, 2F, E] ([gate; up]), down_proj [n, E, F], the shared
    expert as shared_mlp.input_linear [2Fs, E] ([gate; up]) and output_linear. Llama4: x @ W with
    gate_up_proj [n, E, 2F] ([gate | up] columns) and down_proj [n, F, E]; its shared expert has
    the usual gate/up/down projections (mapped by name)."""
    layer, role = name.split(".")[1], name.split(".")[2]
    granite = spec.arch in ("granite", "granitemoe")
    prefix = f"model.layers.{layer}." + ("block_sparse_moe.experts." if granite else "feed_forward.experts.")
    up = tensors.get(name.replace("_gate_", "_up_"))
    if role == "ffn_gate_exps":  # [n, F, E] gate and up
        both = np.concatenate([w, up], axis=1)  # [n, 2F, E]
        out[prefix + "gate_up_proj"] = torch.from_numpy(np.array(both if granite else both.transpose(0, 2, 1)))
    elif role == "ffn_down_exps":  # [n, E, F]
        out[prefix + "down_proj"] = torch.from_numpy(np.array(w if granite else w.transpose(0, 2, 1)))
    elif not granite:
        out[_hf_name(spec.arch, name)] = torch.from_numpy(np.array(w))
    elif role == "ffn_gate_shexp":
        out[f"model.layers.{layer}.shared_mlp.input_linear.weight"] = torch.from_numpy(np.concatenate([w, up]))
    elif role == "ffn_down_shexp":
        out[f"model.layers.{layer}.shared_mlp.output_linear.weight"] = torch.from_numpy(np.array(w))


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Undo llama.cpp's q/k row permutation (pairs -> halves) for weights [R, in] or biases [R]."""
    d = w.shape[0] // n_head
    return w.reshape(n_head, d // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def read_gguf_tensors(path: Path) -> dict[str, np.ndarray]:
    """Every tensor of the file dequantized to float32 with gguf-py, in torch layout."""
    reader = gguf.GGUFReader(path)
    return {
        t.name: np.asarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
        for t in reader.tensors
    }


_LAYER_NAMES: dict[str, str] = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "ffn_gate_inp": "mlp.gate",
    "ffn_gate_shexp": "mlp.shared_expert.gate_proj",
    "ffn_up_shexp": "mlp.shared_expert.up_proj",
    "ffn_down_shexp": "mlp.shared_expert.down_proj",
    "ffn_gate_inp_shexp": "mlp.shared_expert_gate",
    "ffn_down_exps": "mlp.experts.down_proj",
    "exp_probs_b": "mlp.gate.e_score_correction_bias",
}
"""GGUF layer tensor -> transformers module for the llama-shaped families (experts: 3-D
parameters, gate and up stacked into one `gate_up_proj`)."""

_LAYER_OVERRIDES: dict[str, dict[str, str]] = {
    "gemma2": {
        "ffn_norm": "pre_feedforward_layernorm",
        "post_attention_norm": "post_attention_layernorm",
        "post_ffw_norm": "post_feedforward_layernorm",
    },
    "phi3": {"attn_qkv": "self_attn.qkv_proj", "ffn_up": "mlp.gate_up_proj"},
    "starcoder2": {"ffn_up": "mlp.c_fc", "ffn_down": "mlp.c_proj"},
    "phi2": {"attn_output": "self_attn.dense", "ffn_up": "mlp.fc1", "ffn_down": "mlp.fc2"},
}
_LAYER_OVERRIDES["gemma3"] = _LAYER_OVERRIDES["gemma2"]
_SHARED_EXPERTS = {f"ffn_{role}_shexp": f"mlp.shared_experts.{role}_proj" for role in ("gate", "up", "down")}
_LAYER_OVERRIDES["deepseek2"] = {
    "attn_q_a": "self_attn.q_a_proj",
    "attn_q_a_norm": "self_attn.q_a_layernorm",
    "attn_q_b": "self_attn.q_b_proj",
    "attn_kv_a_mqa": "self_attn.kv_a_proj_with_mqa",
    "attn_kv_a_norm": "self_attn.kv_a_layernorm",
    "attn_kv_b": "self_attn.kv_b_proj",
    **_SHARED_EXPERTS,
}
_LAYER_OVERRIDES["gpt-oss"] = {
    "post_attention_norm": "post_attention_layernorm",
    "attn_sinks": "self_attn.sinks",
    "ffn_gate_inp": "mlp.router",
}
_LAYER_OVERRIDES["granitemoe"] = {"ffn_gate_inp": "block_sparse_moe.router"}
_LAYER_OVERRIDES["llama4"] = {
    "ffn_gate": "feed_forward.gate_proj",
    "ffn_up": "feed_forward.up_proj",
    "ffn_down": "feed_forward.down_proj",
    "ffn_gate_inp": "feed_forward.router",
    **{f"ffn_{role}_shexp": f"feed_forward.shared_expert.{role}_proj" for role in ("gate", "up", "down")},
}
_LAYER_OVERRIDES["glm4moe"] = {
    "post_attention_norm": "post_attention_layernorm",
    **{f"ffn_{role}_shexp": f"mlp.shared_experts.{role}_proj" for role in ("gate", "up", "down")},
}


def _hf_name(arch: str, gguf_name: str) -> str:
    parts = gguf_name.split(".")
    if parts[0] == "blk":
        role = parts[2]
        overrides = _LAYER_OVERRIDES.get(arch, {})
        module = overrides[role] if role in overrides else _LAYER_NAMES[role]
        if role in ("ffn_down_exps", "exp_probs_b", "attn_sinks"):
            return f"model.layers.{parts[1]}.{module}"  # a bare parameter or buffer, no .weight
        return f"model.layers.{parts[1]}.{module}.{parts[3]}"
    top = {
        "token_embd": "model.embed_tokens",
        "output_norm": "model.final_layernorm" if arch == "phi2" else "model.norm",
        "output": "lm_head",
    }
    return f"{top[parts[0]]}.{parts[1]}"


def hf_state_dict(spec: TinySpec, tensors: dict[str, np.ndarray], unpermute_qk: bool = True) -> dict[str, torch.Tensor]:
    """Map GGUF tensors onto transformers parameter names, undoing the converter's changes."""
    out: dict[str, torch.Tensor] = {}
    if spec.arch == "granite" and spec.rope_finetuned is False:
        # GraniteMoeHybrid holds a dense feed-forward as its shared_mlp, as a shared expert.
        tensors = {_as_shared_expert(name): w for name, w in tensors.items()}
    for name, w in tensors.items():
        if name.startswith("rope_") or ".ffn_up_exps." in name:
            continue
        if spec.arch in ("granite", "granitemoe") and ".ffn_up_shexp." in name:
            continue  # fused with ffn_gate_shexp into shared_mlp.input_linear
        if name.startswith("blk.") and int(name.split(".")[1]) >= spec.n_layer:
            continue  # next-token prediction blocks: not part of the decoder
        if ".attn_v_b." in name:
            continue
        if spec.arch == "gpt-oss" and "_exps." in name:
            _gpt_oss_experts(name, w, tensors, out)
            continue
        if spec.arch in ("granite", "granitemoe", "llama4") and ("_exps." in name or "_shexp." in name):
            _granite_llama4_experts(spec, name, w, tensors, out)
            continue
        if ".attn_k_b." in name:  # [H, R, nope] and [H, Dv, R] -> kv_b [H (nope + Dv), R]
            v_b = tensors[name.replace("attn_k_b", "attn_v_b")]
            kv_b = np.concatenate([w.transpose(0, 2, 1), v_b], axis=1).reshape(-1, w.shape[1])
            out[_hf_name(spec.arch, name.replace("attn_k_b", "attn_kv_b"))] = torch.from_numpy(kv_b.copy())
            continue
        if ".ffn_gate_exps." in name:  # [n, F, E] gate and up -> gate_up_proj [n, 2F, E]
            up = tensors[name.replace("ffn_gate_exps", "ffn_up_exps")]
            layer = name.split(".")[1]
            out[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.from_numpy(np.concatenate([w, up], axis=1))
            continue
        if name.endswith("ffn_gate_inp_shexp.weight"):
            w = w.reshape(1, -1)  # transformers' gate is a Linear(E, 1)
        if spec.arch in GEMMA_LIKE and name.endswith("norm.weight"):
            w = w - 1.0  # transformers' Gemma RMSNorm multiplies by (1 + w)
        if ".attn_qkv." in name and spec.arch != "phi3":
            q, k, v = np.split(w, [spec.q_width, spec.q_width + spec.kv_width], axis=0)
            for role, part in (("attn_q", q), ("attn_k", k), ("attn_v", v)):
                split_name = name.replace("attn_qkv", role)
                out[_hf_name(spec.arch, split_name)] = _qk_fix(spec, split_name, part, unpermute_qk)
            continue
        out[_hf_name(spec.arch, name)] = _qk_fix(spec, name, w, unpermute_qk)
    return out


def _as_shared_expert(name: str) -> str:
    """blk.N.ffn_{gate,up,down}.weight -> blk.N.ffn_{gate,up,down}_shexp.weight; others as they are."""
    parts = name.split(".")
    if parts[0] == "blk" and parts[2] in ("ffn_gate", "ffn_up", "ffn_down"):
        parts[2] += "_shexp"
    return ".".join(parts)


def _qk_fix(spec: TinySpec, name: str, w: np.ndarray, unpermute_qk: bool) -> torch.Tensor:
    if unpermute_qk and spec.arch in LLAMA_LIKE:
        if ".attn_q." in name:
            w = _unpermute(w, spec.n_head)
        elif ".attn_k." in name:
            w = _unpermute(w, spec.n_head_kv)
    return torch.from_numpy(np.array(w, dtype=np.float32))  # a writable copy


def _apply_rope_freqs(model: PreTrainedModel, path: Path) -> None:
    """Divide the rotary inverse frequencies by the file's `rope_freqs` factors
    (theta_i = pos · freq_scale · base^(-2i/n_rot) / ff_i)."""
    ff = read_gguf_tensors(path)["rope_freqs.weight"]  # [n_rot / 2]
    rotary = model.model.rotary_emb
    rotary.inv_freq = rotary.inv_freq / torch.from_numpy(ff.copy())


def load_by_hand(path: Path, spec: TinySpec, unpermute_qk: bool = True) -> PreTrainedModel:
    """A transformers model for `spec` with weights mapped here from the file's tensors."""
    config = hf_config(spec)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING[type(config)]
    model = model_class._from_config(config, attn_implementation="eager", dtype=torch.float32).eval()
    state = hf_state_dict(spec, read_gguf_tensors(path), unpermute_qk)
    missing, unexpected = model.load_state_dict(state, strict=False)
    allowed_missing = {"lm_head.weight"} if spec.tied else set()
    if set(missing) - allowed_missing or unexpected:
        raise AssertionError(f"{path}: missing {missing}, unexpected {unexpected}")
    if spec.tied:
        model.tie_weights()
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    if spec.rope_freqs:
        _apply_rope_freqs(model, path)
    return model


@contextlib.contextmanager
def _memoized_gguf_py() -> Iterator[None]:
    """Speed only: while transformers loads a GGUF file it parses the whole file twice with
    `gguf.GGUFReader` (config, then tensors; seconds per pass on a real vocabulary) and builds
    the same `gguf.get_tensor_name_map` once per submodule. Both are pure functions of their
    arguments, so within one load they are memoized; the results are unchanged."""
    reader = functools.cache(gguf.GGUFReader)
    name_map = functools.cache(gguf.get_tensor_name_map)
    with mock.patch.object(gguf, "GGUFReader", reader), mock.patch.object(gguf, "get_tensor_name_map", name_map):
        yield


def load_with_gguf_loader(path: Path, spec: TinySpec | None) -> PreTrainedModel:
    """transformers' GGUF loader; with `spec`, the config is ours (see module docstring),
    without, the loader's own config from the file's metadata."""
    kwargs: dict[str, object] = {} if spec is None else {"config": hf_config(spec)}
    with _memoized_gguf_py():
        model, info = AutoModelForCausalLM.from_pretrained(
            path.parent,
            gguf_file=path.name,
            dtype=torch.float32,
            attn_implementation="eager",
            output_loading_info=True,
            **kwargs,
        )
    if info["missing_keys"] or info["mismatched_keys"]:
        raise AssertionError(f"{path}: loader left {info['missing_keys']} {info['mismatched_keys']}")
    model.eval()
    if spec is not None and spec.rope_freqs:
        _apply_rope_freqs(model, path)
    return model


def reference_model(path: Path, spec: TinySpec) -> PreTrainedModel:
    """The transformers model to compare against: through the GGUF loader where it can
    read the file's tensors, hand-mapped otherwise."""
    if loader_reads(spec):
        return load_with_gguf_loader(path, spec)
    return load_by_hand(path, spec)


@torch.no_grad()
def hf_logits(model: PreTrainedModel, ids: np.ndarray) -> np.ndarray:
    """float32 logits [B, T, V] for token ids [B, T] (no padding, positions 0..T-1)."""
    out = model(input_ids=torch.from_numpy(ids), use_cache=False)
    return out.logits.float().numpy()
