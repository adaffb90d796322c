"""Tiny cases for the comparison with llama.cpp (`ppinfer.bench.family_logits`) beside
`tiny_cases.ALL_CASES`: shapes llama.cpp 0.3.36 loads where a test case's does not, and an F32
twin of a quantized case, each written by the same `ggufgen` writer."""

from __future__ import annotations

from ggufgen import TinySpec, with_changes
from tiny_cases import ALL_CASES

VARIANTS: dict[str, TinySpec] = {
    # glm4moe_q8_0's per-head q/k norms on the exact path (the F32 glm4moe case has none).
    "glm4moe_qk_norm_f32": with_changes(ALL_CASES["glm4moe_q8_0"], qtype=ALL_CASES["glm4moe"].qtype),
    # llama.cpp sizes OLMoE's q/k norms by n_embd, so it loads only n_head_kv == n_head.
    "olmoe_mha": with_changes(ALL_CASES["olmoe"], n_head_kv=4),
    "olmoe_mha_q5_0": with_changes(ALL_CASES["olmoe_q5_0"], n_head_kv=4),
    # llama.cpp reads DeepSeek-V2 without q_lora_rank only when block_count is 27 (V2-Lite's).
    "deepseek2_27_layers": with_changes(ALL_CASES["deepseek2"], n_layer=27),
    # llama4_q4_0 without sliding_window = 0 (llama.cpp asserts on that file).
    "llama4_q4_0_window_key_absent": with_changes(ALL_CASES["llama4_q4_0"], sliding_window=None),
    # llama.cpp pads the context to 256 and picks the long factors when 256 > the original
    # context: with an original context of 256 both sides take the short factors.
    "phi3_longrope_short_256": with_changes(ALL_CASES["phi3_longrope_short"], n_ctx=256, longrope_orig_ctx=256),
}
