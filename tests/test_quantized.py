"""`runtime.weights=quantized`: weights stay in their GGUF blocks and the stage still computes
the model.

- Fidelity on the real models through two stages: the quantized path's next-token
  distributions sit no further from the exact dequantized path than llama.cpp's own do
  (mean KL measured for issue 11 on 400 tokens of prose: 0.003 for SmolLM2 Q4_1, 0.0055 for
  gemma-3 Q4_K_M), with top-1 agreement of at least 95%.
- A split of quantized stages computes exactly what the whole quantized model computes.
- Batch invariance: a prompt's greedy tokens, and every logit on the way, are the same bits
  decoded alone and as one sequence in a lane of 8; a prefill chunk folded into a decode step
  changes no bit of either.
- A layer whose every part the `DecoderLayer` op knows runs as one call, the same bits as its
  modules one by one (softcaps, q/k norms, post-branch norms, biases, residual scales, float
  weights, routed and shared experts included); the other layers keep their modules.
- Weights are held as blocks (the tied output head included), bad blocks fail by name, a
  type with no kernel is dequantized and reported, not an error, and fused projections whose
  parts are stored in different types keep a layer per part.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ggufgen import QType, RawTensor, encode, encoded_tensors, tiny_tensors, with_changes, write_gguf
from stage_runner import (
    LAYERS,
    PROSE,
    arange_positions,
    build,
    chained_logits,
    chunked_logits,
    full_logits,
    kl_and_top1,
    step,
    whole,
)
from tiny_cases import ALL_CASES, FAMILY_CASES, TinyFiles, token_batch

import ppinfer
from ppinfer.errors import ModelFileError
from ppinfer.kernels import fused as fused_ops
from ppinfer.kernels.cpu import InvariantLinear
from ppinfer.kernels.select import BLOCK_LINEARS
from ppinfer.model import PipelineStage
from ppinfer.model.layers import ConcatLinear

LLAMA_CPP_KL = {"smollm2": 0.003, "gemma3": 0.0055}  # llama.cpp vs the dequantized path (issue 11)
DECODE_CHUNK = 8


def _two_stages(path: Path, n_layer: int, weights: str) -> list[PipelineStage]:
    half = n_layer // 2
    return [build(path, 0, half, n_layer, weights), build(path, half, n_layer, n_layer, weights)]


@pytest.mark.slow
@pytest.mark.parametrize("model", ["smollm2", "gemma3"])
def test_real_model_fidelity_through_two_stages(model: str, request: pytest.FixtureRequest) -> None:
    path = request.getfixturevalue(f"{model}_path")
    ids = np.array([ppinfer.load_tokenizer(path).encode(PROSE)], dtype=np.int64)  # [1, T]
    assert ids.shape[1] >= 250
    exact = chained_logits(_two_stages(path, LAYERS[model], "dequantized"), ids)[0]
    stages = _two_stages(path, LAYERS[model], "quantized")
    assert sum(stages[0].weights_report.kept.values()) > 0
    quant = chunked_logits(stages, ids, DECODE_CHUNK)
    kl, top1 = kl_and_top1(exact, quant)
    assert kl <= LLAMA_CPP_KL[model], f"{model}: mean KL {kl:.5f} > llama.cpp's {LLAMA_CPP_KL[model]}"
    assert top1 >= 0.95, f"{model}: top-1 agreement {top1:.1%}"


@pytest.mark.slow
def test_smollm2_holds_blocks_not_floats(smollm2_path: Path) -> None:
    """Every 2-D weight of SmolLM2 (Q4_1 layers, Q8_0 embedding) runs from its blocks, the tied
    output head included, and the stage holds about the file's bytes, not 5.8x."""
    stage = whole(smollm2_path, 30, "quantized")
    report = stage.weights_report
    assert not report.dequantized, report.describe()
    assert isinstance(stage.output, BLOCK_LINEARS), type(stage.output)
    file_bytes = smollm2_path.stat().st_size
    assert stage.weight_bytes <= 1.1 * file_bytes, f"{stage.weight_bytes / 2**20:.0f} MiB held"


def _greedy(stage: PipelineStage, prompts: np.ndarray, new_tokens: int) -> tuple[np.ndarray, np.ndarray]:
    """Greedy continuations [B, new_tokens] of prompts [B, T] (one prefill, then one token per
    step through the KV cache) and the logits [B, new_tokens, V] each token was chosen from."""
    batch, length = prompts.shape
    state = stage.new_cache(batch=batch, max_len=length + new_tokens)
    logits = step(stage, torch.from_numpy(prompts), arange_positions(batch, length), state)[:, -1]  # [B, V]
    tokens, chosen_from = [], []
    for i in range(new_tokens):
        chosen_from.append(logits)
        tokens.append(logits.argmax(-1))  # [B]
        ids = torch.from_numpy(tokens[-1]).reshape(batch, 1)
        logits = step(stage, ids, arange_positions(batch, 1, length + i), state)[:, -1]
    return np.stack(tokens, 1), np.stack(chosen_from, 1)


@pytest.mark.parametrize("case", ["llama_q4_0", "llama_q8_0", "qwen3_q5_0", "gemma3_q4_1"])
def test_greedy_tokens_alone_equal_those_in_a_lane_of_8(tiny_files: TinyFiles, case: str) -> None:
    """The quantized products take the same 8-bit path for 1 row or 96, so the first prompt's
    continuation does not depend on the 7 others sharing its products (prefill: 12 rows alone,
    96 in the lane; decode: 1 row against 8)."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer, "quantized")
    prompts = token_batch(spec, batch=8, length=12, seed=3)  # [8, 12]
    alone, alone_logits = _greedy(stage, prompts[:1], 8)
    lane, lane_logits = _greedy(stage, prompts, 8)
    np.testing.assert_array_equal(alone[0], lane[0])
    np.testing.assert_array_equal(alone_logits[0], lane_logits[0])
    assert len({tuple(row) for row in lane}) > 1  # the lane's other prompts go elsewhere


@pytest.mark.parametrize(
    "case",
    [
        "llama_q4_0", "gemma3_q4_1", "qwen3_q5_0", "llama_f16", "gpt_oss_q8_0", "llama4_q4_0", "deepseek2_q8_0",
        "deepseek3_q8_0", "glm4moe_q8_0", "qwen2moe_q8_0",
    ],
)
def test_a_prompt_gives_the_same_bits_alone_left_padded_and_token_by_token(tiny_files: TinyFiles, case: str) -> None:
    """Attention sums over each query's visible keys in their order, whatever the forward's
    width, so a prompt's logits are the same bits as one prefill alone, left-padded by 13
    slots beside a longer prompt (a prefill group's shape), and fed one token per step (a
    decode, or a preempted sequence recomputed). With torch's attention for prefill this test
    fails (for llama4 and deepseek2's latent attention, whose q and k are prepared in torch
    before the op: with torch's attention for them), and so it does with float weights (F16,
    routers, deepseek3's assembled decompression) through torch's GEMM instead of
    `InvariantLinear`, or with torch's sigmoid for glm4moe, deepseek3 and qwen2moe's gates; the
    8-bit products already take one path for every row count."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer, "quantized")
    pad, length = 13, 17
    prompts = token_batch(spec, batch=2, length=pad + length, seed=5)  # [2, 30]
    prompt = prompts[:1, pad:]  # [1, 17]
    alone = step(stage, torch.from_numpy(prompt), arange_positions(1, length), stage.new_cache(batch=1, max_len=length))
    positions = arange_positions(2, pad + length).clone()  # [2, 30]
    positions[0, :pad] = -1
    positions[0, pad:] = torch.arange(length)
    beside = step(stage, torch.from_numpy(prompts), positions, stage.new_cache(batch=2, max_len=pad + length))
    state = stage.new_cache(batch=1, max_len=length)
    stepped = [
        step(stage, torch.from_numpy(prompt[:, i, None]), arange_positions(1, 1, i), state) for i in range(length)
    ]
    np.testing.assert_array_equal(beside[:1, pad:], alone)
    np.testing.assert_array_equal(np.concatenate(stepped, axis=1), alone)


@pytest.mark.parametrize("case", ["llama_q4_0", "gemma3_q4_1", "qwen3moe_q4_0", "deepseek3_q8_0", "gpt_oss_q8_0"])
def test_a_folded_chunk_gives_the_bits_of_two_forwards(tiny_files: TinyFiles, case: str) -> None:
    """A decode step of two rows with another row's prefill chunk folded in (one ragged
    forward: the products see 2 + 9 rows at once, attention runs per piece) gives every logit
    of the step and of the chunk that the two forwards apart give: the same 8-bit path for
    every row count, each row attending over its own keys. Covers sliding windows (gemma3),
    experts (qwen3moe), latent attention (deepseek3, piece by piece) and sinks (gpt-oss)."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer, "quantized")
    ids = torch.from_numpy(token_batch(spec, batch=3, length=12, seed=5))  # [3, 12]
    step_ids, step_pos = ids[:2, 11:12], arange_positions(2, 1, 11)  # rows 0, 1 decode their 12th token
    chunk_ids, chunk_pos = ids[2:, :9], arange_positions(1, 9)  # row 2 prefills 9 tokens

    def run(folded: bool) -> tuple[torch.Tensor, torch.Tensor]:
        cache = stage.new_cache(3, 16)
        with torch.inference_mode():
            stage.forward(stage.embed(ids[:2, :11]), arange_positions(2, 11), cache, [0, 1])
            if folded:
                flat = torch.cat([step_ids.flatten(), chunk_ids.flatten()])[None]  # [1, 11]
                out = stage.forward_ragged(stage.embed(flat), [(step_pos, [0, 1]), (chunk_pos, [2])], cache)[0]
                return stage.lm_head(out[None, :2]), stage.lm_head(out[None, 2:])
            a = stage.forward(stage.embed(step_ids), step_pos, cache, [0, 1])  # [2, 1, E]
            b = stage.forward(stage.embed(chunk_ids), chunk_pos, cache, [2])  # [1, 9, E]
            return stage.lm_head(a.flatten(0, 1)[None]), stage.lm_head(b)

    apart, folded = run(False), run(True)
    torch.testing.assert_close(folded[0], apart[0], rtol=0, atol=0)
    torch.testing.assert_close(folded[1], apart[1], rtol=0, atol=0)


LAYER_OP_CASES = {
    "llama_q4_0": "quantized",
    "qwen3_q5_0": "quantized",  # q/k norms, row-major blocks
    "gemma3_q4_1": "quantized",  # post-branch norms, sliding windows, GELU
    "gemma2_q8_0": "quantized",  # softcap
    "qwen2_q8_0": "quantized",  # qkv bias
    "granite_q8_0": "quantized",  # residual scale
    "llama": "dequantized",  # float32 weights prepacked for oneDNN
    "qwen3moe_q4_0": "quantized",  # softmax routing, normalised
    "qwen2moe_q8_0": "quantized",  # a shared expert behind its sigmoid gate
    "glm4moe_q8_0": "quantized",  # sigmoid routing with a selection bias, a shared expert, a dense first layer
    "granitemoe_q8_0": "quantized",  # experts with residual scales
}


@pytest.mark.parametrize("case", list(LAYER_OP_CASES))
def test_a_layer_op_gives_the_bits_of_its_modules(tiny_files: TinyFiles, case: str) -> None:
    """Every layer of these stages is one `DecoderLayer` call; with the calls taken away the
    modules run one by one, and every logit of a left-padded prefill and of the decode steps
    after it is the same bits."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer, LAYER_OP_CASES[case])
    assert all(layer.layer_op is not None for layer in stage.layers)
    prompts = torch.from_numpy(token_batch(spec, batch=2, length=11, seed=5))  # [2, 11]
    positions = arange_positions(2, 11)
    positions[1] = torch.cat((torch.full((4,), -1), torch.arange(7)))  # the second prompt: 7 tokens, left-padded

    def run() -> list[torch.Tensor]:
        state = stage.new_cache(batch=2, max_len=16)
        logits = [torch.from_numpy(step(stage, prompts, positions, state))]
        for i in range(4):
            ids = logits[-1][:, -1:].argmax(-1)  # [2, 1]
            logits.append(torch.from_numpy(step(stage, ids, positions[:, -1:] + 1 + i, state)))
        return logits

    fused = run()
    for layer in stage.layers:
        layer.layer_op = None
    apart = run()
    for a, b in zip(fused, apart, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_a_layer_op_names_a_missing_or_unknown_part() -> None:
    op = fused_ops.decoder_layer(2, 1, 8, 8, 0.3, 0.0, 1.0)
    w, x = torch.zeros(32, 16), torch.zeros(1, 1, 16)
    with pytest.raises(RuntimeError, match="weight kind must be blocks, packed, float, invariant or onednn, got fp8"):
        op.add_projection("qkv", "fp8", w, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="no projection named gate"):
        op.add_projection("gate", "float", w, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="set_moe before the projection router"):
        op.add_projection("router", "float", w, 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="a norm or an attention projection was never set"):
        op.forward(x, x, x, x, x, x, x)
    for name in ("attn_norm", "ffn_norm"):
        op.set_norm(name, torch.ones(16), 1e-6)
    op.add_projection("qkv", "float", w, 0, 0, 0, None)
    op.add_projection("out", "float", torch.zeros(16, 16), 0, 0, 0, None)
    with pytest.raises(RuntimeError, match="the feed-forward's projections or experts were never set"):
        op.forward(x, x, x, x, x, x, x)


@pytest.mark.parametrize(
    "case", ["olmoe_q5_0", "deepseek3_q8_0", "gpt_oss_q8_0", "llama4_q4_0", "phi3_q8_0", "qwen3moe"]
)
def test_layers_with_a_part_the_layer_op_lacks_keep_their_modules(tiny_files: TinyFiles, case: str) -> None:
    """Per-projection q/k norms (olmoe), latent attention (deepseek), softmax over the chosen
    experts with biases and a clamped SwiGLU (gpt-oss), NoPE and L2 q/k norms (llama4) and float
    experts keep every layer's modules; phi3's layers, all plain, are one call each."""
    spec = ALL_CASES[case]
    weights = "dequantized" if case == "qwen3moe" else "quantized"
    layers = whole(tiny_files.path(case), spec.n_layer, weights).layers
    with_op = [layer.layer_op is not None for layer in layers]
    if case == "phi3_q8_0":
        assert all(with_op)
    elif case == "llama4_q4_0":  # the rope layers' attention has an L2 norm after rotation
        assert not any(with_op)
    else:
        assert not any(with_op), with_op


@pytest.mark.parametrize("case", ["llama_q4_0", "llama_q8_0", "qwen3_q5_0", "gemma3_q4_1", "phi3_q8_0", "granite_q8_0"])
def test_quantized_split_equals_whole(tiny_files: TinyFiles, case: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = full_logits(whole(path, spec.n_layer, "quantized"), ids)
    half = spec.n_layer // 2
    stages = [
        build(path, 0, half, spec.n_layer, "quantized"),
        build(path, half, spec.n_layer, spec.n_layer, "quantized"),
    ]
    np.testing.assert_allclose(chained_logits(stages, ids), expected, rtol=0, atol=1e-5)
    exact = full_logits(whole(path, spec.n_layer), ids)
    assert (expected.argmax(-1) == exact.argmax(-1)).mean() >= 0.9


def test_nonfinite_block_scale_names_the_tensor(tmp_path: Path) -> None:
    spec = with_changes(FAMILY_CASES["llama"], qtype=QType.Q4_0)
    tensors = encoded_tensors(spec)
    bad = tensors["blk.0.ffn_down.weight"]
    assert isinstance(bad, RawTensor)
    data = bad.data.copy()
    data.reshape(-1, 18)[3, 0:2] = np.array([np.inf], dtype=np.float16).view(np.uint8)  # block 3's d
    tensors["blk.0.ffn_down.weight"] = RawTensor(data, bad.qtype)
    path = write_gguf(tmp_path / "bad_scale.gguf", spec, tensors)
    with pytest.raises(ModelFileError, match=r"'blk\.0\.ffn_down\.weight': block 3 has a non-finite scale"):
        whole(path, spec.n_layer, "quantized")


def test_type_without_kernel_is_dequantized_and_reported(tmp_path: Path) -> None:
    spec = with_changes(FAMILY_CASES["llama"], qtype=QType.IQ4_NL)
    path = write_gguf(tmp_path / "iq4_nl.gguf", spec, encoded_tensors(spec))
    stage = whole(path, spec.n_layer, "quantized")
    report = stage.weights_report
    assert report.dequantized["IQ4_NL"] > 0 and "IQ4_NL" not in report.kept
    assert "no kernel, dequantized" in report.describe()
    # The dequantized weights are multiplied by the batch-invariant float kernel, the exact path's by
    # torch's GEMM: the same products up to float rounding.
    assert any(isinstance(m, InvariantLinear) for m in stage.modules())
    ids = token_batch(spec)
    np.testing.assert_allclose(full_logits(stage, ids), full_logits(whole(path, spec.n_layer), ids), rtol=0, atol=1e-5)


@pytest.mark.parametrize("v_type", [QType.Q8_0, QType.IQ4_NL], ids=["v_q8_0", "v_iq4_nl_no_kernel"])
def test_fused_parts_of_mixed_types(tmp_path: Path, v_type: QType) -> None:
    """q and k in Q4_0 with v in another type (as Q4_K_M files mix Q4_K and Q6_K): each part
    keeps its own layer, a kernel where there is one, and the stage follows the exact path."""
    spec = with_changes(FAMILY_CASES["llama"], qtype=QType.Q4_0)
    tensors = encoded_tensors(spec)
    floats = tiny_tensors(spec)
    for il in range(spec.n_layer):
        name = f"blk.{il}.attn_v.weight"
        tensors[name] = encode(floats[name], v_type)
    path = write_gguf(tmp_path / f"mixed_{v_type.name}.gguf", spec, tensors)
    stage = whole(path, spec.n_layer, "quantized")
    assert isinstance(stage.layers[0].attn.qkv, ConcatLinear)
    # The parts, blocks or a dequantized float part, are one layer call: the same bits as the modules.
    assert all(layer.layer_op is not None for layer in stage.layers)
    report = stage.weights_report
    if v_type == QType.IQ4_NL:
        assert report.dequantized["IQ4_NL"] == spec.n_layer
    else:
        assert report.kept["Q8_0"] == spec.n_layer
    ids = token_batch(spec)
    exact = full_logits(whole(path, spec.n_layer), ids).reshape(-1, spec.n_vocab)
    quant = full_logits(stage, ids).reshape(-1, spec.n_vocab)
    kl, top1 = kl_and_top1(exact, quant)
    assert kl < 1e-3 and top1 >= 0.9, f"KL {kl:.3g}, top-1 {top1:.0%}"
    for layer in stage.layers:
        layer.layer_op = None
    np.testing.assert_array_equal(full_logits(stage, ids).reshape(-1, spec.n_vocab), quant)
