"""Mixture-of-Experts families: qwen3moe, qwen2moe (gated shared expert), llama with experts
(Mixtral's layout), olmoe (q/k norms over whole projections), glm4moe, deepseek2, gpt-oss,
granitemoe (GraniteMoe and GraniteMoeShared: scales, shared expert) and llama4 (experts every
other layer weighting their input, NoPE layers with temperature tuning, L2 q/k norm, rope_freqs).

- The exact path equals transformers' own classes (Qwen3Moe, Qwen2Moe, Mixtral, Olmoe, Glm4Moe,
  DeepseekV2/V3, GptOss, GraniteMoe, GraniteMoeShared, Llama4) on tiny files, as one stage,
  chained stages, and token-by-token decode through three or four stages.
- The quantized path keeps the 3-D expert tensors in their blocks: a split equals the whole
  quantized model; with every product on the kernels' dequantizing GEMM it equals the exact
  path (so the per-expert slices are the right blocks); with 8-bit activations its
  distributions stay close to the exact path's. A decode step multiplies only the experts
  the router chose, and a prefill chunk runs one product per active expert.
- The allocation cost model counts every expert's stored bytes in its layer (dequantized
  floats where experts are not kept in blocks), the plan table shows them per rank, and a
  stage describes the experts it holds.
- Through `launch/infer.py` on 2 ranks, greedy generation equals full recompute.
- A file whose expert tensors disagree with its metadata fails with one line naming them.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from ggufgen import encoded_tensors, with_changes, write_gguf
from hf_reference import hf_logits, reference_model
from pipeline_driver import run_command, torchrun_command
from pipeline_models import N_VOCAB, greedy_recompute, write_pipeline_model
from stage_runner import arange_positions, build, chained_logits, full_logits, kl_and_top1, whole
from tiny_cases import ALL_CASES, MOE_CASES, MOE_QUANT_CASES, TinyFiles, token_batch
from transformers.models.llama4.modeling_llama4 import Llama4TextWeightlessRMSNorm

import ppinfer
from ppinfer.errors import ModelFileError
from ppinfer.families import read_hparams, registry
from ppinfer.gguf import GGUFFile
from ppinfer.kernels.cpu import BlockLinear, InvariantLinear
from ppinfer.kernels.experts import BlockExperts
from ppinfer.model import PipelineStage
from ppinfer.model.moe import FloatExperts, MoeFeedForward
from ppinfer.plan.allocation import allocate, plan_table
from ppinfer.plan.costs import layer_costs

TOLERANCE = 1e-4
"""Max |Δlogit| against transformers in fp32 (measured: ~1e-5)."""

QUANT_KL = 0.02
"""Mean KL of the quantized path (8-bit activations) from the exact path. Measured 0.0003 to
0.012: higher than dense models' 0.0005 because a token near a routing boundary can pick
another expert (single positions reach 0.1; the median stays near 0.001)."""


def _gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


@pytest.mark.parametrize("case", [*MOE_CASES, *MOE_QUANT_CASES])
def test_moe_family_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)
    stage = whole(path, spec.n_layer)
    assert [isinstance(layer.mlp, MoeFeedForward) for layer in stage.layers] == [
        spec.is_moe_layer(il) for il in range(spec.n_layer)
    ]
    gap = _gap(full_logits(stage, ids), expected)
    assert gap <= TOLERANCE, f"{case}: max |Δlogit| = {gap:.3g}"


def _decoded_through_stages(path: Path, n_layer: int, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V]: a 7-token prefill, then one token per step, through one stage per layer,
    each with its own KV cache."""
    stages = [build(path, i, i + 1, n_layer) for i in range(n_layer)]
    states = [s.new_cache(batch=2, max_len=ids.shape[1]) for s in stages]
    tokens, prompt = torch.from_numpy(ids), 7
    got = []
    with torch.no_grad():
        for a, b in [(0, prompt)] + [(t, t + 1) for t in range(prompt, ids.shape[1])]:
            hidden = stages[0].embed(tokens[:, a:b])
            for stage, state in zip(stages, states):
                hidden = stage.forward(hidden, arange_positions(2, b - a, offset=a), state)
            got.append(stages[-1].lm_head(hidden).numpy())
    return np.concatenate(got, axis=1)


@pytest.mark.parametrize("case", list(MOE_CASES))
def test_moe_stages_decode_token_by_token_like_transformers(tiny_files: TinyFiles, case: str) -> None:
    """A 7-token prefill, then one token per step, through stages [0,1) [1,2) ... (one per
    layer: 3 or 4 stages) against transformers on the whole sequence."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec, seed=3)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)
    gap = _gap(_decoded_through_stages(path, spec.n_layer, ids), expected)
    assert gap <= TOLERANCE, f"{case}: max |Δlogit| = {gap:.3g}"


@pytest.mark.parametrize("what", ["temperature", "chunks"])
def test_llama4_nope_temperature_and_chunks_match_transformers(
    tiny_files: TinyFiles, monkeypatch: pytest.MonkeyPatch, what: str
) -> None:
    """llama4's temperature tuning on its NoPE layer (3) and the chunked attention of its other
    layers change nothing below 8192 tokens, so both sides take a floor scale of 4 (queries of
    layer 3 scaled by 1 + 0.1 ln(floor((pos + 1) / 4) + 1)), or chunks of 8 positions, here
    (llama.cpp's 8192 is the family's data). Checked on the whole sequence and with a prefill
    then one token per step through 4 stages (each step's own positions); with llama.cpp's
    8192 the logits are well past the tolerance."""
    case = "llama4"
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec, seed=5)  # [2, 20]
    reference = reference_model(path, spec)
    nope = registry.LLAMA4.nope
    assert nope is not None and nope.temperature is not None
    if what == "temperature":
        for layer in reference.model.layers:
            layer.self_attn.floor_scale = 4
        changed = replace(nope, temperature=replace(nope.temperature, floor_scale=4))
    else:
        reference.config.attention_chunk_size = 8
        changed = replace(nope, chunk=8)
    expected = hf_logits(reference, ids)
    assert _gap(full_logits(whole(path, spec.n_layer), ids), expected) > 100 * TOLERANCE, f"{what} must matter here"
    monkeypatch.setitem(registry.FAMILIES, case, replace(registry.LLAMA4, nope=changed))
    assert _gap(full_logits(whole(path, spec.n_layer), ids), expected) <= TOLERANCE
    assert _gap(_decoded_through_stages(path, spec.n_layer, ids), expected) <= TOLERANCE


def test_llama4_128_experts_have_no_qk_norm(tiny_files: TinyFiles) -> None:
    """Llama 4 Maverick's 128 experts: no layer normalises q and k after rope (llama.cpp's rule;
    transformers' use_qk_norm false, which the matches above hold ppinfer to). The same file
    through transformers with Scout's L2 norm in its rope layers is far away, so those matches
    tell the two rules apart."""
    case = "llama4_128e"
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    assert [layer.attn.post_rope_norm is None for layer in stage.layers] == [True] * 4
    assert [layer.attn.rope is None for layer in stage.layers] == [False, False, False, True]
    assert [layer.mlp.params.n_expert if isinstance(layer.mlp, MoeFeedForward) else 0 for layer in stage.layers] == [
        0, 128, 0, 128
    ]
    reference = reference_model(path, spec)
    for layer in reference.model.layers:
        if layer.self_attn.use_rope:
            layer.self_attn.qk_norm = Llama4TextWeightlessRMSNorm(reference.config.rms_norm_eps)
    ids = token_batch(spec)  # [2, 20]
    assert _gap(full_logits(stage, ids), hf_logits(reference, ids)) > 1000 * TOLERANCE


def test_llama4_layers(tiny_files: TinyFiles) -> None:
    """Experts in layers 1 and 3 only, layer 3 without rope (and without the L2 q/k norm and the
    chunks, which only rope layers have), every layer roped and none chunked in a file whose
    sliding_window is 0."""
    stage = whole(tiny_files.path("llama4"), 4)
    assert [isinstance(layer.mlp, MoeFeedForward) for layer in stage.layers] == [False, True, False, True]
    assert [layer.attn.rope is None for layer in stage.layers] == [False, False, False, True]
    assert [layer.attn.post_rope_norm is not None for layer in stage.layers] == [True, True, True, False]
    assert [layer.attn.chunk for layer in stage.layers] == [8192, 8192, 8192, 0]
    assert all(layer.mlp.weight_input for layer in stage.layers if isinstance(layer.mlp, MoeFeedForward))
    roped = whole(tiny_files.path("llama4_q4_0"), 4)
    assert all(layer.attn.rope is not None and layer.attn.temperature is None for layer in roped.layers)
    assert all(layer.attn.chunk == 0 for layer in roped.layers)


@pytest.mark.parametrize("weights", ["dequantized", "quantized"])
@pytest.mark.parametrize("case", list(MOE_QUANT_CASES))
def test_moe_split_equals_whole(tiny_files: TinyFiles, case: str, weights: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec, seed=1)
    expected = full_logits(whole(path, spec.n_layer, weights), ids)
    for cut in range(1, spec.n_layer):
        stages = [build(path, 0, cut, spec.n_layer, weights), build(path, cut, spec.n_layer, spec.n_layer, weights)]
        assert _gap(chained_logits(stages, ids), expected) <= 1e-5, f"{case} cut at {cut}"


@pytest.mark.parametrize("case", list(MOE_QUANT_CASES))
def test_quantized_experts_stay_in_blocks(tiny_files: TinyFiles, case: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    quant, exact = whole(path, spec.n_layer, "quantized"), whole(path, spec.n_layer)
    moe = [layer.mlp for il, layer in enumerate(quant.layers) if spec.is_moe_layer(il)]
    for mlp in moe:
        assert isinstance(mlp.gate_up, BlockExperts) and isinstance(mlp.down, BlockExperts)
        assert mlp.gate_up.qtype == spec.qtype
    moe_layers = [il for il in range(spec.n_layer) if spec.is_moe_layer(il)]
    assert all(isinstance(exact.layers[il].mlp.down, FloatExperts) for il in moe_layers)
    assert quant.weights_report.kept[spec.qtype.name] >= 2 * spec.n_layer
    expert_bytes = sum(mlp.gate_up.nbytes + mlp.down.nbytes for mlp in moe)
    file_bytes = sum(
        info.n_bytes for name, info in GGUFFile(path).tensors.items()
        if name.endswith("_exps.weight") and int(name.split(".")[1]) < spec.n_layer  # not the skipped nextn block
    )
    assert expert_bytes == file_bytes, "the stage holds exactly the file's expert blocks"
    assert quant.weight_bytes < exact.weight_bytes / 2.5  # Q8_0 alone: 3.8x


@pytest.mark.parametrize("case", list(MOE_QUANT_CASES))
def test_quantized_experts_with_float_products_equal_exact(tiny_files: TinyFiles, case: str, ops) -> None:
    """Every product of the quantized stage made in float from the blocks it is given (each
    expert's own slice for the experts; dequantized by the kernels, which test_kernels holds
    to gguf-py): the quantized path then computes exactly what the exact path computes, so
    each expert's slice is the right one."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)
    stage = whole(path, spec.n_layer, "quantized")
    assert any(isinstance(m, BlockExperts) for m in stage.modules())

    def product(x, w, type_id, k, bias):
        y = x @ ops.dequantize(w, type_id, k).T  # [n, in] @ [in, out]
        return y if bias is None else y + bias

    def experts_product(x, w, type_id, k, counts):
        """x [M, in] grouped by expert, w [n_expert, out, row_bytes] -> [M, out]."""
        parts = x.split(counts.tolist())
        return torch.cat([product(part, w[e], type_id, k, None) for e, part in enumerate(parts)])

    for layer in stage.layers:  # the products are swapped in the modules, which a layer op would not call
        layer.layer_op = None
    for module in stage.modules():
        if isinstance(module, BlockExperts):
            module._matmul = experts_product
            module._packed_matmul = lambda x, w, type_id, k, n, counts: experts_product(
                x, torch.stack([ops.unpack_rows(we, type_id, k, n) for we in w]), type_id, k, counts
            )
        elif isinstance(module, InvariantLinear):  # float weights: torch's product, as on the exact path
            module._matmul = torch.nn.functional.linear
        elif isinstance(module, BlockLinear):
            module._matmul = product
            module._packed_matmul = lambda x, w, type_id, k, n, bias: product(
                x, ops.unpack_rows(w, type_id, k, n), type_id, k, bias
            )
    assert _gap(full_logits(stage, ids), full_logits(whole(path, spec.n_layer), ids)) <= 1e-5


@pytest.mark.parametrize("case", list(MOE_QUANT_CASES))
def test_quantized_moe_close_to_exact(tiny_files: TinyFiles, case: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)
    exact = full_logits(whole(path, spec.n_layer), ids)
    quant = full_logits(whole(path, spec.n_layer, "quantized"), ids)
    kl, top1 = kl_and_top1(exact, quant)
    assert kl <= QUANT_KL and top1 >= 0.9, f"{case}: KL {kl:.4f}, top-1 {top1:.0%}"


Calls = dict[tuple[int, str], list[tuple[int, int]]]
"""(layer, "gate_up" | "down" | "chosen") -> sorted (expert, rows) pairs."""


def _record_expert_calls(stage: PipelineStage, monkeypatch: pytest.MonkeyPatch) -> Calls:
    """Records, per layer, every expert product (expert, rows multiplied) and the router's
    choices (expert, tokens routed to it)."""
    calls: Calls = {}
    for i, layer in enumerate(stage.layers):
        moe = layer.mlp
        for role in ("gate_up", "down"):
            module = getattr(moe, role)

            def product(x: torch.Tensor, counts: torch.Tensor, key=(i, role), original=module.forward) -> torch.Tensor:
                assert x.shape[0] == int(counts.sum())
                calls.setdefault(key, []).extend((e, n) for e, n in enumerate(counts.tolist()) if n)
                return original(x, counts)

            monkeypatch.setattr(module, "forward", product)

        def route(x: torch.Tensor, key=(i, "chosen"), original=moe.route) -> tuple[torch.Tensor, torch.Tensor]:
            weights, chosen = original(x)
            calls.setdefault(key, []).extend(Counter(chosen.flatten().tolist()).items())
            return weights, chosen

        monkeypatch.setattr(moe, "route", route)
    return calls


@pytest.mark.parametrize("case", ["qwen3moe_q4_0", "olmoe_q5_0"])
def test_only_chosen_experts_are_multiplied(
    tiny_files: TinyFiles, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A prefill chunk and a decode step of 2 rows: per layer, each expert the router chose
    runs exactly one gate|up and one down product over exactly the rows routed to it; no
    other expert is touched."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer, "quantized")
    for layer in stage.layers:  # calls are recorded at the modules; a layer op makes the same ones in C++
        layer.layer_op = None
    state = stage.new_cache(batch=2, max_len=9)
    tokens = torch.from_numpy(token_batch(spec, length=9))
    for a, b in ((0, 8), (8, 9)):
        calls = _record_expert_calls(stage, monkeypatch)
        with torch.no_grad():
            stage.forward(stage.embed(tokens[:, a:b]), arange_positions(2, b - a, offset=a), state)
        monkeypatch.undo()
        for i in range(spec.n_layer):
            chosen = sorted(calls[i, "chosen"])
            assert sum(n for _, n in chosen) == 2 * (b - a) * spec.n_expert_used
            for role in ("gate_up", "down"):
                assert sorted(calls[i, role]) == chosen, f"layer {i} {role}: ran {calls[i, role]}, chose {chosen}"
            if b - a == 1:  # a decode step touches at most 2 rows x k experts of n
                assert len(chosen) <= 2 * spec.n_expert_used < spec.n_expert


@pytest.mark.parametrize("experts_in_blocks", [True, False], ids=["cpu", "experts_dequantized"])
def test_layer_costs_count_every_expert(tiny_files: TinyFiles, experts_in_blocks: bool) -> None:
    """Per layer: router, norms, attention and all experts, by hand from the tensor shapes."""
    case = "qwen3moe_q4_0"
    spec, path = ALL_CASES[case], tiny_files.path(case)
    q4 = {spec.qtype}
    costs = layer_costs(str(path), 4, 0, stored_types=q4, stored_expert_types=q4 if experts_in_blocks else set())
    e, f, n, d = spec.n_embd, spec.expert_width, spec.n_expert, spec.head_dim
    q4_bytes = 18 / 32  # Q4_0: 18 bytes per 32 values
    attention = (spec.q_width * e * 2 + spec.kv_width * e * 2) * q4_bytes  # q, o, k, v
    small = (2 * e + 2 * d + n * e) * 4  # norms, q/k norms, F32 router
    experts = 3 * n * f * e * (q4_bytes if experts_in_blocks else 4)
    assert costs.layer_expert_bytes == [experts] * spec.n_layer
    assert costs.layer_weight_bytes == [attention + small + experts] * spec.n_layer
    # One token reads used / count of the experts; 3 tokens the share at least one of them picks.
    share = spec.n_expert_used / n
    assert costs.layer_read_bytes == [attention + small + round(experts * share)] * spec.n_layer
    lane = layer_costs(str(path), 4, 0, step_tokens=3, stored_types=q4,
                       stored_expert_types=q4 if experts_in_blocks else set())
    assert lane.layer_read_bytes == [attention + small + round(experts * (1 - (1 - share) ** 3))] * spec.n_layer
    table = plan_table(allocate("balanced", 2, costs), costs)
    assert table.splitlines()[0].split()[-5:] == ["experts", "MiB", "read/step", "MiB", "holds"]
    read_mib = [float(row.split()[-2]) for row in table.splitlines()[1:]]  # per rank
    assert sum(read_mib) == pytest.approx(sum(costs.layer_read_bytes) / 2**20, abs=0.01)


def test_stages_describe_their_experts(tiny_files: TinyFiles) -> None:
    path = tiny_files.path("qwen2moe_q8_0")
    first, last = build(path, 0, 2, 3, "quantized"), build(path, 2, 3, 3, "quantized")
    per_layer = 3 * 6 * 32 * 64 * 34 // 32  # gate, up, down of 6 experts [32, 64] in Q8_0
    assert first.describe_experts() == f"2 layers x 6 experts (2 used), {2 * per_layer / 2**20:.1f} MiB"
    assert last.describe_experts().startswith("1 layers x 6 experts (2 used)")
    assert whole(tiny_files.path("llama"), 2).describe_experts() == "-"


@pytest.mark.slow
def test_two_rank_generation_equals_recompute(tmp_path: Path) -> None:
    """qwen2moe (shared expert) on 2 ranks with 2 lanes: every greedy token equals the full
    recompute's; the logged tables show the experts per rank."""
    spec = with_changes(MOE_CASES["qwen2moe"], n_layer=4, n_vocab=N_VOCAB)
    path = write_pipeline_model(tmp_path / "qwen2moe.gguf", spec)
    prompts = ["the cat sat", "hello", "in the end there was"]
    ids = [ppinfer.load_tokenizer(path).encode(p) for p in prompts]
    expected = greedy_recompute(path, spec.n_layer, ids, 6)
    out = tmp_path / "out"
    quoted = ",".join(f'"{p}"' for p in prompts)
    done = run_command(torchrun_command(
        "--standalone", "--nproc_per_node=2", "launch/infer.py", f"model.path={path}", f"prompts=[{quoted}]",
        "generation.max_new_tokens=6", "generation.ignore_eos=true", "pipeline.microbatches=2",
        "runtime.weights=dequantized", "runtime.threads=1", f"output.dir={out}",
    ), 180)
    assert done.returncode == 0, done.tail()
    got = [r["token_ids"] for r in map(json.loads, (out / "results.jsonl").read_text().splitlines())]
    assert got == expected
    assert "experts MiB" in done.output and "experts: 2 layers x 6 experts (2 used)" in done.output


def _bad_file(tmp_path: Path, case: str, **changes: object) -> Path:
    """The case's tensors with the metadata of `changes` (tensors and header disagree)."""
    spec = ALL_CASES[case]
    return write_gguf(tmp_path / "bad.gguf", with_changes(spec, **changes), encoded_tensors(spec))


@pytest.mark.parametrize(
    ("case", "changes", "message"),
    [
        (
            "qwen3moe", {"n_expert": 6},
            r"tensor 'blk\.0\.ffn_gate_exps\.weight' holds 8 experts .* but qwen3moe\.expert_count=6",
        ),
        (
            "qwen3moe", {"n_ff_exp": 48},
            r"tensor 'blk\.0\.ffn_gate_exps\.weight' has shape \[8, 32, 64\], expected \[8, 48, 64\]",
        ),
        (
            "qwen2moe", {"n_expert_used": 7},
            r"qwen2moe\.expert_used_count=7 must be between 1 and qwen2moe\.expert_count=6",
        ),
        ("olmoe", {"n_expert": 0}, r"required metadata key 'olmoe\.expert_count' is missing"),
        ("llama4", {"moe_step": 0}, r"required metadata key 'llama4\.interleave_moe_layer_step' is missing"),
    ],
    ids=["count", "width", "used_over_count", "no_count", "no_interleave_step"],
)
def test_expert_tensors_disagreeing_with_metadata(
    tiny_files: TinyFiles, tmp_path: Path, case: str, changes: dict[str, object], message: str
) -> None:
    """Found from the header and tensor index (what every rank reads before a process group
    exists), as building a stage finds it."""
    path = _bad_file(tmp_path, case, **changes)
    with pytest.raises(ModelFileError, match=message) as err:
        read_hparams(GGUFFile(path))
    assert "\n" not in str(err.value)
    with pytest.raises(ModelFileError, match=message):
        whole(path, ALL_CASES[case].n_layer)


def test_layer_costs_of_latent_attention_and_skipped_blocks(tiny_files: TinyFiles) -> None:
    """deepseek2 caches each query head's decompressed key (48) and value (32), whatever the
    file's latent-head key_length says; glm4moe's next-token prediction block costs nothing."""
    spec = ALL_CASES["deepseek3"]
    costs = layer_costs(str(tiny_files.path("deepseek3")), 4, 10)
    assert costs.layer_kv_bytes == [10 * spec.n_head * (48 + 32) * 4] * spec.n_layer
    glm = ALL_CASES["glm4moe"]
    costs = layer_costs(str(tiny_files.path("glm4moe")), 4, 10)
    assert len(costs.layer_weight_bytes) == glm.n_layer == glm.n_layer + glm.n_nextn - 1
