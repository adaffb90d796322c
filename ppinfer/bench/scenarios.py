"""The scenarios: named groups of target ratios, and the suites that group them.

A ratio names the runs it compares (a `Term` is one metric of one run, optionally scaled), so
a scenario is just a group of ratios and the planner derives exactly the runs those ratios
need, each once even when several scenarios share it. Scenarios come in suites: `pipeline`
(the pipeline's own targets, on the default model), `quant` (quantized weights
against llama.cpp on the same files, with the synthetic 1.1B-shaped model), `moe` (the
synthetic Qwen3-MoE-shaped model against llama.cpp) and `slow` (the synthetic 7B-shaped
model); `all` is every suite but `moe` and `slow` (their files are 2.9 and 3.8 GB). Everything here is plain data:
the planner and the ratios can be checked without starting a process.
"""

from __future__ import annotations

import dataclasses

from ppinfer.bench.metrics import (
    BUBBLE,
    DECODE,
    DECODE_IDLE,
    PEAK_ABOVE_BASELINE,
    PREFILL,
    TOKEN_LATENCY,
    TOTAL_ABOVE_BASELINE,
    TOTAL_PER_FILE_BYTE,
    Ratio,
    Term,
)
from ppinfer.bench.runs import (
    DEFAULT_MODEL,
    FULL,
    MODEL_1B,
    MODEL_7B,
    MODEL_MOE,
    LlamaCppRun,
    PeerRun,
    PipelineRun,
    Sizes,
)


def _pp(sizes: Sizes, stages: int, threads: int, lanes: int, lane_size: int,
        model: str = DEFAULT_MODEL) -> PipelineRun:
    return PipelineRun(stages=stages, threads=threads, lanes=lanes, lane_size=lane_size,
                       max_new_tokens=sizes.max_new_tokens, model=model)


def _dequantized(run: PipelineRun) -> PipelineRun:
    return dataclasses.replace(run, weights="dequantized")


# Targets for quantized weights against llama.cpp.
MEMORY_PER_FILE_TARGET = 1.5
"""Sum over ranks of peak RSS above the idle baseline, at most this many times the file size
(for the 7B: 5.6 GB, inside a 6 GB budget)."""
VS_LLAMACPP_SINGLE_TARGET = 1.0
"""One sequence on 1 stage x 2 threads: at least this share of llama.cpp's decode tok/s."""
VS_LLAMACPP_BATCH_TARGET = 1.0
"""Two lanes on 2 stages x 1 thread against llama.cpp's batched decoding of the same sequences."""
VS_LLAMACPP_BATCH_AIM = 1.5
"""The aim for 32 sequences of the default model (an overhead-bound 135M model)."""
VS_LLAMACPP_PREFILL_TARGET = 1.0
"""A long prompt's prefill on the 1.1B, 1 stage x 2 threads or 2 stages x 1 thread, against llama.cpp's."""
EFFICIENCY_TARGET = 0.90
"""2 stages x 1 thread with 2 lanes against twice 1 stage x 1 thread with 1 lane (the 1.1B)."""


def pipeline_scenarios(sizes: Sizes) -> dict[str, tuple[Ratio, ...]]:
    """The pipeline's own scenarios (the `pipeline` suite, on the default model)."""
    n = sizes.lane_size
    one_stage = _pp(sizes, 1, 1, 1, n)
    two_stage = _pp(sizes, 2, 1, 2, n)
    two_threads = _pp(sizes, 1, 2, 1, 2 * n)
    single_two_stage = _pp(sizes, 2, 1, 1, 1)
    single_one_stage = _pp(sizes, 1, 1, 1, 1)
    # One sequence cannot be pipelined: on one machine its best layout gives every core to
    # one process's intra-op threads.
    single_all_threads = _pp(sizes, 1, 2, 1, 1)
    peer_batch = PeerRun(threads=sizes.peer_threads, sequences=2 * n, max_new_tokens=sizes.max_new_tokens)
    peer_single = PeerRun(threads=sizes.peer_threads, sequences=1, max_new_tokens=sizes.max_new_tokens)
    # Prefill has no output-head work to balance (only the last position goes through it),
    # so equal layer counts are its balanced split.
    prefill = [
        PipelineRun(stages=s, threads=1, lanes=1, lane_size=1, max_new_tokens=sizes.prefill_new_tokens,
                    prompts="long", prefill_chunk=sizes.prefill_chunk, layers="uniform")
        for s in (1, 2)
    ]
    # The same 4 sequences: one lane on 1 stage, one lane per stage (a full ring) on 4.
    memory = [
        PipelineRun(stages=s, threads=1, lanes=s, lane_size=4 // s, max_new_tokens=sizes.memory_new_tokens)
        for s in (1, 4)
    ]
    hf = f"transformers generate (fp32, {sizes.peer_threads} threads)"
    chunked = f"{sizes.long_prompt_tokens}-token prompt in chunks of {sizes.prefill_chunk}"
    return {
        "efficiency": (
            Ratio(key="pipeline_efficiency",
                  title=f"2 stages x 1 thread, 2 lanes of {n} vs twice 1 stage x 1 thread, 1 lane of {n} (decode)",
                  numerator=Term(two_stage, DECODE), denominator=Term(one_stage, DECODE, 2.0),
                  target=0.90, higher_is_better=True),
            Ratio(key="decode_idle",
                  title="with 2 lanes on 2 stages, each stage's idle share of the decode phase after the fill",
                  numerator=Term(two_stage, DECODE_IDLE), denominator=None,
                  target=0.05, higher_is_better=False, fallback=Term(two_stage, BUBBLE)),
        ),
        "threads": (
            Ratio(key="stages_vs_threads",
                  title=f"2 stages x 1 thread vs 1 process x 2 threads on the same {2 * n} sequences (decode)",
                  numerator=Term(two_stage, DECODE), denominator=Term(two_threads, DECODE),
                  target=1.2, higher_is_better=True),
        ),
        "peer": (
            Ratio(key="vs_transformers_batch",
                  title=f"2 stages x 1 thread vs {hf} on {2 * n} sequences (decode)",
                  numerator=Term(two_stage, DECODE), denominator=Term(peer_batch, DECODE),
                  target=1.5, higher_is_better=True),
            Ratio(key="vs_transformers_single",
                  title=f"1 stage x 2 threads vs {hf} on one sequence (decode)",
                  numerator=Term(single_all_threads, DECODE), denominator=Term(peer_single, DECODE),
                  target=2.0, higher_is_better=True),
        ),
        "latency": (
            Ratio(key="single_sequence_latency",
                  title="one sequence: per-token latency on 2 stages vs on 1 stage (1 thread each)",
                  numerator=Term(single_two_stage, TOKEN_LATENCY),
                  denominator=Term(single_one_stage, TOKEN_LATENCY),
                  target=1.15, higher_is_better=False),
        ),
        "prefill": (
            Ratio(key="chunked_prefill",
                  title=f"{chunked}: 2 stages vs 1 stage x 1 thread (prefill)",
                  numerator=Term(prefill[1], PREFILL), denominator=Term(prefill[0], PREFILL),
                  target=1.6, higher_is_better=True),
        ),
        "memory": (
            Ratio(key="memory_per_rank",
                  title="largest rank's peak RSS above an idle torch process: 4 stages vs 1 stage",
                  numerator=Term(memory[1], PEAK_ABOVE_BASELINE),
                  denominator=Term(memory[0], PEAK_ABOVE_BASELINE),
                  target=0.35, higher_is_better=False),
        ),
    }


def quant_scenarios(sizes: Sizes) -> dict[str, tuple[Ratio, ...]]:
    """The `quant` and `slow` suites: ppinfer with its default
    (quantized) weights against llama.cpp on the same file and cores, and memory against the
    file size; dequantized runs are shown beside them where they are cheap."""
    n, q, new = sizes.lane_size, sizes.quant_lane_size, sizes.max_new_tokens

    def llamacpp(model: str, sequences: int) -> LlamaCppRun:
        return LlamaCppRun(threads=sizes.peer_threads, sequences=sequences, max_new_tokens=new, model=model)

    def ring(model: str, stages: int) -> PipelineRun:
        """One sequence per stage, one lane each: the weights dominate the memory."""
        return PipelineRun(stages=stages, threads=1, lanes=stages, lane_size=1,
                           max_new_tokens=sizes.memory_new_tokens, model=model)

    single = {m: _pp(sizes, 1, 2, 1, 1, model=m) for m in (DEFAULT_MODEL, MODEL_1B, MODEL_MOE)}
    batch = _pp(sizes, 2, 1, 2, n)  # the default model's 2 lanes of `lane_size`
    batch_1b = _pp(sizes, 2, 1, 2, q, model=MODEL_1B)
    one_stage_1b = _pp(sizes, 1, 1, 1, q, model=MODEL_1B)
    batch_moe = _pp(sizes, 2, 1, 2, q, model=MODEL_MOE)
    memory_1b, memory_7b, memory_moe = ring(MODEL_1B, 2), ring(MODEL_7B, 4), ring(MODEL_MOE, 2)
    # One long prompt, then a few tokens: on one stage in one chunk (the 8-bit GEMM of every
    # layer), on two in the runtime's chunks, which follow each other through the stages.
    prefill_1b = {
        (stages, threads): PipelineRun(stages=stages, threads=threads, lanes=1, lane_size=1,
                                       max_new_tokens=sizes.prefill_new_tokens, prompts="long",
                                       prefill_chunk=chunk, model=MODEL_1B)
        for stages, threads, chunk in ((1, 2, sizes.long_prompt_tokens), (2, 1, None))
    }
    prefill_peer = LlamaCppRun(threads=sizes.peer_threads, sequences=1, max_new_tokens=sizes.prefill_new_tokens,
                               prompts="long", model=MODEL_1B)
    lc = f"llama.cpp ({sizes.peer_threads} threads)"
    lc_batch = f"{lc}, one batch"

    def vs_llamacpp(key: str, title: str, run: PipelineRun, peer: LlamaCppRun, target: float | None) -> Ratio:
        return Ratio(key=key, title=title, numerator=Term(run, DECODE), denominator=Term(peer, DECODE),
                     target=target, higher_is_better=True)

    def per_file(key: str, title: str, run: PipelineRun, target: float | None) -> Ratio:
        return Ratio(key=key, title=title, numerator=Term(run, TOTAL_PER_FILE_BYTE), denominator=None,
                     target=target, higher_is_better=False)

    return {
        "quant-memory": (
            per_file("memory_per_file", "1.1B on 2 stages: sum of the ranks' peak RSS above an idle torch process "
                     "/ file size", memory_1b, MEMORY_PER_FILE_TARGET),
            per_file("memory_per_file_dequantized", "the same with runtime.weights=dequantized (fp32 weights)",
                     _dequantized(memory_1b), None),
            Ratio(key="memory_vs_llamacpp",
                  title=f"1.1B: the sum over 2 ranks of peak RSS above an idle torch process vs {lc}'s peak RSS "
                        "above a bare Python process (one sequence)",
                  numerator=Term(memory_1b, TOTAL_ABOVE_BASELINE),
                  denominator=Term(llamacpp(MODEL_1B, 1), TOTAL_ABOVE_BASELINE),
                  target=None, higher_is_better=False),
        ),
        "quant-single": (
            vs_llamacpp("vs_llamacpp_single", f"one sequence, default model: 1 stage x 2 threads vs {lc} (decode)",
                        single[DEFAULT_MODEL], llamacpp(DEFAULT_MODEL, 1), VS_LLAMACPP_SINGLE_TARGET),
            vs_llamacpp("vs_llamacpp_single_1b", f"one sequence, 1.1B: 1 stage x 2 threads vs {lc} (decode)",
                        single[MODEL_1B], llamacpp(MODEL_1B, 1), VS_LLAMACPP_SINGLE_TARGET),
            vs_llamacpp("vs_llamacpp_single_dequantized",
                        f"one sequence, default model, runtime.weights=dequantized: 1 stage x 2 threads vs {lc} "
                        "(decode)",
                        _dequantized(single[DEFAULT_MODEL]), llamacpp(DEFAULT_MODEL, 1), None),
        ),
        "quant-batch": (
            vs_llamacpp("vs_llamacpp_batch_1b",
                        f"{2 * q} sequences, 1.1B: 2 stages x 1 thread, 2 lanes of {q} vs {lc_batch} (decode)",
                        batch_1b, llamacpp(MODEL_1B, 2 * q), VS_LLAMACPP_BATCH_TARGET),
            vs_llamacpp("vs_llamacpp_batch",
                        f"{2 * n} sequences, default model: 2 stages x 1 thread, 2 lanes of {n} vs {lc_batch} (decode)",
                        batch, llamacpp(DEFAULT_MODEL, 2 * n), VS_LLAMACPP_BATCH_AIM),
            vs_llamacpp("vs_llamacpp_batch_dequantized",
                        f"{2 * n} sequences, default model, runtime.weights=dequantized: 2 stages x 1 thread vs "
                        f"{lc_batch} (decode)", _dequantized(batch), llamacpp(DEFAULT_MODEL, 2 * n), None),
        ),
        "quant-prefill": tuple(
            Ratio(key=f"vs_llamacpp_prefill_1b_{stages}x{threads}",
                  title=f"{sizes.long_prompt_tokens}-token prompt, 1.1B: {stages} stage(s) x {threads} thread(s) vs "
                        f"{lc} (prefill)",
                  numerator=Term(run, PREFILL), denominator=Term(prefill_peer, PREFILL),
                  target=VS_LLAMACPP_PREFILL_TARGET, higher_is_better=True)
            for (stages, threads), run in prefill_1b.items()
        ),
        "quant-efficiency": (
            Ratio(key="pipeline_efficiency_1b",
                  title=f"1.1B: 2 stages x 1 thread, 2 lanes of {q} vs twice 1 stage x 1 thread, 1 lane of {q} "
                        "(decode)",
                  numerator=Term(batch_1b, DECODE), denominator=Term(one_stage_1b, DECODE, 2.0),
                  target=EFFICIENCY_TARGET, higher_is_better=True),
        ),
        "quant-7b": (
            per_file("memory_per_file_7b", "7B on 4 stages: sum of the ranks' peak RSS above an idle torch process "
                     "/ file size", memory_7b, MEMORY_PER_FILE_TARGET),
        ),
        "quant-moe": (
            vs_llamacpp("vs_llamacpp_single_moe", f"one sequence, MoE: 1 stage x 2 threads vs {lc} (decode)",
                        single[MODEL_MOE], llamacpp(MODEL_MOE, 1), VS_LLAMACPP_SINGLE_TARGET),
            vs_llamacpp("vs_llamacpp_batch_moe",
                        f"{2 * q} sequences, MoE: 2 stages x 1 thread, 2 lanes of {q} vs {lc_batch} (decode)",
                        batch_moe, llamacpp(MODEL_MOE, 2 * q), VS_LLAMACPP_BATCH_TARGET),
            per_file("memory_per_file_moe", "MoE on 2 stages: sum of the ranks' peak RSS above an idle torch process "
                     "/ file size", memory_moe, MEMORY_PER_FILE_TARGET),
        ),
    }


def scenario_ratios(sizes: Sizes) -> dict[str, tuple[Ratio, ...]]:
    """Every scenario's ratios for these sizes, in suite order."""
    return {**pipeline_scenarios(sizes), **quant_scenarios(sizes)}


SCENARIOS: tuple[str, ...] = tuple(scenario_ratios(FULL))
"""Scenario names in the order the planner runs them."""

SUITES: dict[str, tuple[str, ...]] = {
    "pipeline": tuple(pipeline_scenarios(FULL)),
    "quant": ("quant-memory", "quant-single", "quant-batch", "quant-prefill", "quant-efficiency"),
    "moe": ("quant-moe",),
    "slow": ("quant-7b",),
}
"""Named groups of scenarios; `all` is every suite but `moe` (a 2.9 GB model) and `slow` (a
3.8 GB model on 4 ranks)."""

ALL = tuple(s for s in SCENARIOS if s not in SUITES["moe"] + SUITES["slow"])
