"""The benchmark harness: the planner (which runs each scenario needs), the ratios computed from
hand-made metrics with hand-computed expected values, the tables, the synthetic model builder
(on a tiny shape), the llama.cpp peer's batch layout, and smoke runs."""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from pipeline_models import PIPELINE_SPECS, write_pipeline_model
from stage_runner import full_logits, whole
from tiny_cases import ALL_CASES, TinyFiles

from ppinfer.bench import family_logits, synthetic
from ppinfer.bench.kv_greedy import Answers, compare, cut_at_end, first_difference
from ppinfer.bench.kv_greedy import run_llamacpp as kv_greedy_llamacpp
from ppinfer.bench.kv_memory import Timing, decode_rate, kv_bytes_float32, prompts
from ppinfer.bench.llamacpp import Entry, context_size, prefill_entries, step_entries
from ppinfer.bench.peer import left_padded
from ppinfer.bench.planner import plan
from ppinfer.bench.prompts import SHORT_PROMPTS, long_prompt, short_prompts
from ppinfer.bench.report import evaluate, markdown_report, markdown_table, median_of_rounds, run_row, text_table
from ppinfer.bench.runs import FULL, MODEL_1B, MODEL_7B, MODEL_MOE, QUICK, LlamaCppRun, PeerRun, PipelineRun, Sizes
from ppinfer.bench.scenarios import SCENARIOS, SUITES
from ppinfer.bench.serving import _in_order
from ppinfer.bench.sweep import PromptBook, RunResult, SweepSettings, hydra_value, pipeline_command, run_llamacpp
from ppinfer.families.hparams import read_hparams
from ppinfer.gguf.reader import GGUFFile
from ppinfer.text.tokenizer import load_tokenizer

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def pp(stages: int, threads: int, lanes: int, lane_size: int, new: int = 64, **kw: Any) -> PipelineRun:
    return PipelineRun(stages=stages, threads=threads, lanes=lanes, lane_size=lane_size, max_new_tokens=new, **kw)


def lc(sequences: int, model: str = "default", new: int = 64) -> LlamaCppRun:
    return LlamaCppRun(threads=2, sequences=sequences, max_new_tokens=new, model=model)


# The full-size points, written out by hand from the issue's wording.
ONE_STAGE_16 = pp(1, 1, 1, 16)
TWO_STAGE_2x16 = pp(2, 1, 2, 16)
TWO_THREADS_32 = pp(1, 2, 1, 32)
SINGLE_TWO_STAGE = pp(2, 1, 1, 1)
SINGLE_ONE_STAGE = pp(1, 1, 1, 1)
SINGLE_TWO_THREADS = pp(1, 2, 1, 1)  # one sequence cannot be pipelined: all cores to one process
PEER_32 = PeerRun(threads=2, sequences=32, max_new_tokens=64)
PEER_1 = PeerRun(threads=2, sequences=1, max_new_tokens=64)
PREFILL_1 = pp(1, 1, 1, 1, 4, prompts="long", prefill_chunk=64, layers="uniform")
PREFILL_2 = pp(2, 1, 1, 1, 4, prompts="long", prefill_chunk=64, layers="uniform")
MEMORY_1 = pp(1, 1, 1, 4, 8)
MEMORY_4 = pp(4, 1, 4, 1, 8)
# Issue 11's points: the 1.1B on 2 stages with a lane per stage for memory, 2 lanes of 8 for
# throughput, one sequence on 1 stage x 2 threads; llama.cpp with 2 threads on the same files.
MEMORY_1B = pp(2, 1, 2, 1, 8, model=MODEL_1B)
MEMORY_1B_DEQ = pp(2, 1, 2, 1, 8, model=MODEL_1B, weights="dequantized")
SINGLE_1B = pp(1, 2, 1, 1, model=MODEL_1B)
SINGLE_DEQ = pp(1, 2, 1, 1, weights="dequantized")
BATCH_1B = pp(2, 1, 2, 8, model=MODEL_1B)
ONE_STAGE_1B = pp(1, 1, 1, 8, model=MODEL_1B)
BATCH_DEQ = pp(2, 1, 2, 16, weights="dequantized")
MEMORY_7B = pp(4, 1, 4, 1, 8, model=MODEL_7B)
# Issue 20's points on the Qwen3-MoE-shaped model: the same layouts as the 1.1B's.
SINGLE_MOE = pp(1, 2, 1, 1, model=MODEL_MOE)
BATCH_MOE = pp(2, 1, 2, 8, model=MODEL_MOE)
MEMORY_MOE = pp(2, 1, 2, 1, 8, model=MODEL_MOE)
# Issue 19's prefill points: one 512-token prompt on the 1.1B, in one chunk on 1 stage x 2
# threads, in the runtime's chunks on 2 stages x 1 thread, against llama.cpp's prefill.
PREFILL_1B_1x2 = pp(1, 2, 1, 1, 4, prompts="long", prefill_chunk=512, model=MODEL_1B)
PREFILL_1B_2x1 = pp(2, 1, 1, 1, 4, prompts="long", model=MODEL_1B)
LC_1 = lc(1)
LC_32 = lc(32)
LC_1B_PREFILL = LlamaCppRun(threads=2, sequences=1, max_new_tokens=4, prompts="long", model=MODEL_1B)
LC_1B_1 = lc(1, MODEL_1B)
LC_1B_16 = lc(16, MODEL_1B)
LC_MOE_1 = lc(1, MODEL_MOE)
LC_MOE_16 = lc(16, MODEL_MOE)


def fake(decode: float = 10.0, prefill: float = 100.0, above_mb: tuple[float, ...] = (100.0,),
         bubbles: tuple[float, ...] | None = None, decode_idle: tuple[float, ...] | None = None,
         file_mb: float = 600.0) -> dict[str, Any]:
    """A metrics.json with the fields the harness reads."""
    stages = []
    for i, above in enumerate(above_mb):
        stage: dict[str, Any] = {
            "stage": i, "peak_rss_bytes": int((above + 250) * MB), "peak_rss_above_baseline_bytes": int(above * MB),
            "bubble_fraction": bubbles[i] if bubbles else 0.0,
        }
        if decode_idle is not None:
            stage["decode_idle_fraction"] = decode_idle[i]
        stages.append(stage)
    return {
        "prefill_tokens_per_s": prefill, "decode_tokens_per_s": decode, "time_to_first_token_s": 0.25,
        "wall_s": 3.0, "theoretical_bubble_fraction": 0.1, "per_stage": stages, "model_file_bytes": int(file_mb * MB),
    }


# --- planner -------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "expected"), [
    ("efficiency", {ONE_STAGE_16, TWO_STAGE_2x16}),
    ("threads", {TWO_STAGE_2x16, TWO_THREADS_32}),
    ("peer", {TWO_STAGE_2x16, PEER_32, SINGLE_TWO_THREADS, PEER_1}),
    ("latency", {SINGLE_TWO_STAGE, SINGLE_ONE_STAGE}),
    ("prefill", {PREFILL_1, PREFILL_2}),
    ("memory", {MEMORY_1, MEMORY_4}),
    ("quant-memory", {MEMORY_1B, MEMORY_1B_DEQ, LC_1B_1}),
    ("quant-single", {SINGLE_TWO_THREADS, SINGLE_1B, SINGLE_DEQ, LC_1, LC_1B_1}),
    ("quant-batch", {BATCH_1B, LC_1B_16, TWO_STAGE_2x16, BATCH_DEQ, LC_32}),
    ("quant-efficiency", {BATCH_1B, ONE_STAGE_1B}),
    ("quant-7b", {MEMORY_7B}),
    ("quant-moe", {SINGLE_MOE, BATCH_MOE, MEMORY_MOE, LC_MOE_1, LC_MOE_16}),
])
def test_each_scenario_plans_exactly_the_runs_its_ratios_need(scenario: str, expected: set[Any]) -> None:
    chosen = plan([scenario], FULL)
    assert set(chosen.runs) == expected
    assert len(chosen.runs) == len(expected)


def test_all_runs_each_shared_point_once_and_the_peers_last() -> None:
    chosen = plan(["all"], FULL)
    # pipeline suite: 10 ppinfer points + 2 transformers batches; quant suite: 9 more ppinfer
    # points (2 of its 11 are shared with the pipeline suite) + 5 llama.cpp points.
    assert len(chosen.runs) == 26
    assert chosen.runs.count(TWO_STAGE_2x16) == 1  # shared by efficiency, threads, peer and quant-batch
    kinds = [type(r) for r in chosen.runs]
    assert kinds == [PipelineRun] * 19 + [PeerRun] * 2 + [LlamaCppRun] * 5
    assert [r.key for r in chosen.ratios] == [
        "pipeline_efficiency", "decode_idle", "stages_vs_threads", "vs_transformers_batch",
        "vs_transformers_single", "single_sequence_latency", "chunked_prefill", "memory_per_rank",
        "memory_per_file", "memory_per_file_dequantized", "memory_vs_llamacpp",
        "vs_llamacpp_single", "vs_llamacpp_single_1b", "vs_llamacpp_single_dequantized",
        "vs_llamacpp_batch_1b", "vs_llamacpp_batch", "vs_llamacpp_batch_dequantized",
        "vs_llamacpp_prefill_1b_1x2", "vs_llamacpp_prefill_1b_2x1", "pipeline_efficiency_1b",
    ]
    assert plan(["latency", "all", "latency"], FULL) == chosen
    assert MEMORY_7B not in chosen.runs  # the slow and moe suites only run when asked for
    assert not {SINGLE_MOE, BATCH_MOE, MEMORY_MOE} & set(chosen.runs)


def test_suites_expand_to_their_scenarios_and_cover_all_of_them() -> None:
    quant = ["quant-memory", "quant-single", "quant-batch", "quant-prefill", "quant-efficiency"]
    assert plan(["quant"], FULL) == plan(quant, FULL)
    assert plan(["pipeline", "quant"], FULL) == plan(["all"], FULL)
    assert plan(["slow"], FULL).runs == (MEMORY_7B,)
    assert plan(["moe"], FULL) == plan(["quant-moe"], FULL)
    assert sorted(s for suite in SUITES.values() for s in suite) == sorted(SCENARIOS)


def test_the_default_model_is_the_only_one_the_pipeline_suite_uses() -> None:
    assert {r.model for r in plan(["pipeline"], FULL).runs} == {"default"}
    assert {MODEL_1B, MODEL_7B, MODEL_MOE} <= set(synthetic.MODELS)


def test_memory_points_hold_the_same_sequences_with_a_lane_per_stage() -> None:
    assert MEMORY_1.sequences == MEMORY_4.sequences == 4
    assert MEMORY_4.lanes >= MEMORY_4.stages


def test_quick_shrinks_the_workload_but_keeps_the_shape() -> None:
    quick = plan(["efficiency", "threads"], QUICK)
    assert set(quick.runs) == {pp(1, 1, 1, 2, 4), pp(2, 1, 2, 2, 4), pp(1, 2, 1, 4, 4)}
    assert set(plan(["quant-batch"], QUICK).runs) == {
        pp(2, 1, 2, 2, 4, model=MODEL_1B), lc(4, MODEL_1B, 4), pp(2, 1, 2, 2, 4),
        pp(2, 1, 2, 2, 4, weights="dequantized"), lc(4, new=4),
    }


def test_bad_scenario_and_size_are_named() -> None:
    with pytest.raises(ValueError, match=r"'speed'.*a suite \(pipeline, quant, moe, slow\)"):
        plan(["speed"], FULL)
    with pytest.raises(ValueError, match="lane_size=0"):
        Sizes(lane_size=0)


def test_slugs_are_unique_so_points_never_share_a_directory() -> None:
    runs = plan(["all", "slow"], FULL).runs + plan(["all", "slow"], QUICK).runs
    assert len({r.slug for r in runs}) == len(set(runs))
    assert len({r.label for r in plan(["all", "slow"], FULL).runs}) == len(plan(["all", "slow"], FULL).runs)


# --- ratios on hand-made metrics -------------------------------------------------------------


def _all_results() -> dict[Any, dict[str, Any]]:
    return {
        ONE_STAGE_16: fake(decode=50.0),
        TWO_STAGE_2x16: fake(decode=93.0, above_mb=(300.0, 320.0), bubbles=(0.08, 0.12)),
        TWO_THREADS_32: fake(decode=62.0),
        PEER_32: fake(decode=40.0),
        PEER_1: fake(decode=6.0),
        SINGLE_TWO_STAGE: fake(decode=16.0),
        SINGLE_ONE_STAGE: fake(decode=20.0),
        SINGLE_TWO_THREADS: fake(decode=15.0),
        PREFILL_1: fake(prefill=200.0),
        PREFILL_2: fake(prefill=340.0),
        MEMORY_1: fake(above_mb=(400.0,)),
        MEMORY_4: fake(above_mb=(120.0, 100.0, 90.0, 150.0)),
        MEMORY_1B: fake(above_mb=(330.0, 360.0), file_mb=600.0),
        MEMORY_1B_DEQ: fake(above_mb=(2200.0, 2300.0), file_mb=600.0),
        SINGLE_1B: fake(decode=6.0),
        SINGLE_DEQ: fake(decode=12.0),
        BATCH_1B: fake(decode=45.0),
        ONE_STAGE_1B: fake(decode=25.0),
        BATCH_DEQ: fake(decode=80.0),
        MEMORY_7B: fake(above_mb=(1000.0, 1000.0, 1000.0, 1200.0), file_mb=3600.0),
        LC_1: fake(decode=30.0),
        LC_32: fake(decode=124.0),
        LC_1B_1: fake(decode=10.0, above_mb=(1150.0,)),
        LC_1B_16: fake(decode=50.0),
        PREFILL_1B_1x2: fake(prefill=150.0),
        PREFILL_1B_2x1: fake(prefill=110.0),
        LC_1B_PREFILL: fake(prefill=125.0),
    }


def test_ratios_match_hand_computed_values() -> None:
    results = _all_results()
    got = {r.key: evaluate(r, results) for r in plan(["all", "slow"], FULL).ratios}
    expected = {
        "pipeline_efficiency": (93 / (2 * 50), True),  # 0.93
        "decode_idle": (0.12, False),  # no decode_idle_fraction: whole-run bubble, max over stages
        "stages_vs_threads": (93 / 62, True),  # 1.5
        "vs_transformers_batch": (93 / 40, True),  # 2.325
        "vs_transformers_single": (15 / 6, True),  # 2.5
        "single_sequence_latency": ((1 / 16) / (1 / 20), False),  # 1.25 > 1.15
        "chunked_prefill": (340 / 200, True),  # 1.7
        "memory_per_rank": (150 / 400, False),  # 0.375 > 0.35
        "memory_per_file": ((330 + 360) / 600, True),  # 1.15 <= 1.5
        "memory_per_file_dequantized": ((2200 + 2300) / 600, None),  # 7.5, for information
        "memory_vs_llamacpp": ((330 + 360) / 1150, None),  # 0.6
        "vs_llamacpp_single": (15 / 30, False),  # 0.5 < 1
        "vs_llamacpp_single_1b": (6 / 10, False),
        "vs_llamacpp_single_dequantized": (12 / 30, None),
        "vs_llamacpp_batch_1b": (45 / 50, False),  # 0.9 < 1
        "vs_llamacpp_batch": (93 / 124, False),
        "vs_llamacpp_batch_dequantized": (80 / 124, None),
        "vs_llamacpp_prefill_1b_1x2": (150 / 125, True),  # 1.2 >= 1
        "vs_llamacpp_prefill_1b_2x1": (110 / 125, False),  # 0.88 < 1
        "pipeline_efficiency_1b": (45 / (2 * 25), True),  # 0.9
        "memory_per_file_7b": (4200 / 3600, True),  # 1.167
    }
    assert set(got) == set(expected)
    for key, (value, passed) in expected.items():
        assert got[key].value == pytest.approx(value), key
        assert got[key].passed is passed, key
    assert "fallback" in got["decode_idle"].detail
    assert "2 x 50 tok/s" in got["pipeline_efficiency"].detail
    assert got["memory_vs_llamacpp"].verdict == "info" and got["memory_vs_llamacpp"].target_text == "-"
    assert got["memory_per_file"].verdict == "pass"


def test_exit_code_ignores_skipped_points_and_informational_ratios() -> None:
    from ppinfer.bench.__main__ import exit_code

    results = _all_results()
    ratios = [evaluate(r, results) for r in plan(["quant-memory"], FULL).ratios]  # one target (1.15: pass), 2 info
    done = [RunResult(r, results[r], None, Path("log"), ()) for r in plan(["quant-memory"], FULL).runs]
    skipped = RunResult(LC_1, None, "llama-cpp-python not installed", Path("log"), (), skipped=True)
    failed = RunResult(LC_1, None, "exit code 1", Path("log"), ())
    assert exit_code([*done, skipped], ratios, check=True) == 0
    assert exit_code([*done, failed], ratios, check=True) == 1
    results[MEMORY_1B] = fake(above_mb=(500.0, 500.0), file_mb=600.0)  # 1.67 > 1.5
    missed = [evaluate(r, results) for r in plan(["quant-memory"], FULL).ratios]
    assert exit_code(done, missed, check=True) == 3
    assert exit_code(done, missed, check=False) == 0


def test_decode_idle_prefers_the_runtime_decode_figure() -> None:
    results = _all_results()
    results[TWO_STAGE_2x16] = fake(decode=93.0, above_mb=(1.0, 1.0), bubbles=(0.3, 0.4), decode_idle=(0.01, 0.03))
    (idle,) = [r for r in plan(["efficiency"], FULL).ratios if r.key == "decode_idle"]
    result = evaluate(idle, results)
    assert result.value == pytest.approx(0.03)
    assert result.passed is True
    assert "fallback" not in result.detail


def test_a_missing_run_gives_no_value_instead_of_a_wrong_one() -> None:
    results: dict[Any, Any] = _all_results()
    results[ONE_STAGE_16] = None  # the point failed
    (efficiency, _) = plan(["efficiency"], FULL).ratios
    result = evaluate(efficiency, results)
    assert result.value is None and result.passed is None and result.verdict == "n/a"
    assert "S=1 T=1 1x16" in result.detail


# --- tables -------------------------------------------------------------------------------------


def test_run_row_shows_per_rank_memory_and_the_largest_bubble() -> None:
    metrics = fake(decode=12.345, prefill=56.78, above_mb=(300.0, 450.0), bubbles=(0.05, 0.25))
    metrics.update(stages=2, threads_per_rank=1, microbatches=2, lane_size=16)
    row = run_row(TWO_STAGE_2x16, metrics, None)
    assert row == ["ppinfer", "default", "2", "1", "2", "16", "32 short", "64", "56.8", "12.3", "0.250", "0.250",
                   "0.100", "550/700", "300/450"]


def test_run_rows_name_the_model_the_weights_and_llamacpp() -> None:
    metrics = fake(decode=7.0, prefill=20.0, above_mb=(1150.0,))
    assert run_row(LC_1B_16, metrics, None)[:8] == ["llama.cpp", MODEL_1B, "1", "2", "1", "16", "16 short", "64"]
    assert run_row(MEMORY_1B_DEQ, None, "exit code 1")[:2] == ["ppinfer dequantized", MODEL_1B]


def test_failed_run_row_keeps_the_configuration_and_says_why() -> None:
    row = run_row(PEER_1, None, "exit code 2; see run.log:\n    Traceback")
    assert row[:8] == ["transformers", "default", "1", "2", "1", "1", "1 short", "64"]
    assert row[8] == "failed: exit code 2; see run.log:"
    assert run_row(LC_1, None, "llama-cpp-python not installed: pip ...", skipped=True)[8] == (
        "skipped: llama-cpp-python not installed: pip ...")


def test_tables_align_and_escape() -> None:
    assert text_table(("a", "bb"), [["xyz", "1"]]).splitlines() == ["a    bb", "---  --", "xyz  1"]
    assert markdown_table(("k", "v"), [["a|b", "1"]]) == "| k | v |\n|---|---|\n| a\\|b | 1 |"


def test_markdown_report_has_machine_targets_and_runs() -> None:
    results = _all_results()
    chosen = plan(["efficiency"], FULL)
    ratios = [evaluate(r, results) for r in chosen.ratios]
    outcomes = [RunResult(r, results[r], None, Path("run.log"), ()) for r in chosen.runs]
    page = markdown_report({"date": "D", "command": "python -m ppinfer.bench --x", "CPU": "Z80"}, ratios, [outcomes])
    assert "Generated by `python -m ppinfer.bench --x` on D." in page
    assert "| CPU | Z80 |" in page
    assert "| pipeline_efficiency: " in page and "| 0.930 | >= 0.9 | pass |" in page
    assert page.count("| ppinfer | default |") == 2 and "## Runs\n" in page
    assert "### Benchmarking against llama.cpp" in page and "~/.cache/ppinfer-bench/wheels" in page
    rounds = markdown_report({"date": "D", "command": "c"}, ratios, [outcomes, outcomes, outcomes])
    assert "## Runs, round 3 of 3" in rounds and rounds.count("| ppinfer | default |") == 6


def test_rounds_report_the_median_round_with_every_value() -> None:
    """Rounds whose ratios are 1.3, 0.9 and 1.1 report 1.1 (pass) with its own numbers; with
    one round missing a value the median is over the others (the lower middle of two)."""
    (efficiency, _) = plan(["efficiency"], FULL).ratios
    rounds = []
    for decode in (130.0, 90.0, 110.0):
        results = _all_results()
        results[TWO_STAGE_2x16] = fake(decode=decode, above_mb=(1.0, 1.0), bubbles=(0.1, 0.1))
        rounds.append(evaluate(efficiency, results))
    middle = median_of_rounds(rounds)
    assert middle.value == pytest.approx(1.1) and middle.passed is True
    assert middle.detail.startswith("median of 3 rounds (1.300, 0.900, 1.100); 110")
    failed = dataclasses.replace(rounds[0], value=None, detail="the point failed")
    assert median_of_rounds([failed, rounds[1], rounds[2]]).value == pytest.approx(0.9)
    none = median_of_rounds([failed])
    assert none.value is None and none.verdict == "n/a" and "the point failed" in none.detail


# --- pieces of the sweep ---------------------------------------------------------------------


def test_pipeline_command_is_greedy_ignores_eos_and_sets_the_layout(tmp_path: Path) -> None:
    command = pipeline_command(pp(2, 1, 2, 16, prefill_chunk=64), tmp_path / "m.gguf", tmp_path / "p.txt", tmp_path)
    assert command[:5] == [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    assert command[5] == str(ROOT / "launch" / "infer.py")
    for override in ("pipeline.microbatches=2", "pipeline.lane_size=16", "runtime.threads=1",
                     "generation.max_new_tokens=64", "generation.ignore_eos=true", "generation.temperature=0.0",
                     "pipeline.prefill_chunk=64", f"prompts_file={tmp_path / 'p.txt'}"):
        assert override in command
    default_chunk = pipeline_command(pp(1, 1, 1, 1), tmp_path, tmp_path, tmp_path)
    assert not any(c.startswith(("pipeline.prefill_chunk", "runtime.weights")) for c in default_chunk)
    assert "runtime.weights=dequantized" in pipeline_command(SINGLE_DEQ, tmp_path, tmp_path, tmp_path)


def test_hydra_values_with_odd_characters_are_quoted() -> None:
    assert hydra_value("/tmp/a-b/c_1.gguf") == "/tmp/a-b/c_1.gguf"
    assert hydra_value("/tmp/my dir/it's.gguf") == "'/tmp/my dir/it\\'s.gguf'"


def test_prompts_are_varied_single_lines_and_cycle() -> None:
    assert len(SHORT_PROMPTS) == len(set(SHORT_PROMPTS)) == 32
    assert not any("\n" in p for p in SHORT_PROMPTS)
    assert short_prompts(34)[32:] == [SHORT_PROMPTS[0], SHORT_PROMPTS[1]]


def test_left_padding_right_aligns_each_prompt() -> None:
    ids, mask = left_padded([[5, 6, 7], [8]], pad_id=0)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert mask.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert ids.dtype == mask.dtype == torch.long


@pytest.mark.slow
@pytest.mark.parametrize("n_tokens", [96, 512])
def test_long_prompt_has_exactly_the_asked_token_count(smollm2_path: Path, n_tokens: int) -> None:
    tokenizer = load_tokenizer(smollm2_path)
    text = long_prompt(tokenizer, n_tokens)
    assert "\n" not in text
    assert len(tokenizer.encode(text)) == n_tokens


@pytest.mark.slow
def test_quick_latency_scenario_end_to_end(smollm2_path: Path, tmp_path: Path) -> None:
    """Two real torchrun points (1 and 2 stages, one sequence, 4 tokens): the harness runs them,
    prints the table and writes results.json and the Markdown page."""
    md = tmp_path / "bench.md"
    done = subprocess.run(
        [sys.executable, "-m", "ppinfer.bench", "--quick", "--scenario", "latency", "--model", str(smollm2_path),
         "--workdir", str(tmp_path / "work"), "--markdown", str(md)],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "single_sequence_latency" in done.stdout
    results = json.loads((tmp_path / "work" / "results.json").read_text())
    assert [r["metrics"]["stages"] for r in results["runs"]] == [1, 2]
    (ratio,) = results["ratios"]
    assert ratio["value"] > 0 and ratio["verdict"] in ("pass", "FAIL")
    assert "## Targets" in md.read_text()


# --- synthetic benchmark models (a tiny shape of the same builder) -----------------------------

TINY = synthetic.SyntheticSpec(n_layer=2, n_embd=64, n_ff=96, n_head=4, n_head_kv=2, block_scale=0.0045)


@pytest.fixture(scope="module")
def tokenizer_source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny GGUF with a byte-level BPE tokenizer (262 tokens) to copy the tokenizer from."""
    return write_pipeline_model(tmp_path_factory.mktemp("tok") / "tok.gguf", PIPELINE_SPECS["llama"])


@pytest.fixture(scope="module")
def tiny_synthetic(tokenizer_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_synthetic(tmp_path_factory.mktemp("syn") / "tiny.gguf", TINY, tokenizer_source, "tiny")


def test_synthetic_model_is_llama_shaped_with_the_sources_tokenizer(tiny_synthetic: Path,
                                                                    tokenizer_source: Path) -> None:
    gf = GGUFFile(tiny_synthetic)
    hp = read_hparams(gf)
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.head_dim, hp.n_vocab) == ("llama", 2, 64, 16, 262)
    assert {(lp.n_head, lp.n_head_kv, lp.n_ff, lp.rope.n_rot) for lp in hp.layers} == {(4, 2, 96, 16)}
    assert gf.metadata["general.file_type"] == 2  # MOSTLY_Q4_0
    source = GGUFFile(tokenizer_source)
    for key in ("tokenizer.ggml.tokens", "tokenizer.ggml.merges", "tokenizer.ggml.eos_token_id"):
        assert gf.metadata[key] == source.metadata[key]
    assert "output.weight" not in gf.tensors  # tied head
    matrices = {n: i for n, i in gf.tensors.items() if len(i.shape) == 2}
    # token_embd + 7 matrices per layer, every one Q4_0; the norms stay F32.
    assert len(matrices) == 1 + 7 * 2
    assert {i.qtype for i in matrices.values()} == {gguf.GGMLQuantizationType.Q4_0}
    assert {i.qtype for n, i in gf.tensors.items() if n not in matrices} == {gguf.GGMLQuantizationType.F32}
    assert gf.tensors["blk.1.attn_k.weight"].shape == (32, 64)  # [kv heads x head dim, E]
    assert gf.tensors["blk.1.ffn_down.weight"].shape == (64, 96)  # [E, F]
    assert gf.tensors["token_embd.weight"].shape == (262, 64)  # [V, E]


def test_synthetic_weights_are_random_4_bit_levels_of_the_block_scale(tiny_synthetic: Path) -> None:
    gf = GGUFFile(tiny_synthetic)
    d = float(np.float16(0.0045))
    w = gf.load("blk.0.ffn_down.weight")  # [64, 96], dequantized by ppinfer: (q - 8) * d
    levels = np.round(w / d)
    np.testing.assert_allclose(w, levels * d, rtol=0, atol=1e-7)  # every weight is a level of d
    assert set(np.unique(levels).astype(int)) == set(range(-8, 8))  # all 16 levels, nothing else
    assert abs(float(levels.mean()) + 0.5) < 0.1  # uniform on -8..7
    assert np.all(gf.load("blk.1.ffn_norm.weight") == 1.0) and np.all(gf.load("output_norm.weight") == 1.0)


def test_ppinfer_runs_the_synthetic_model_on_its_quantized_weights(tiny_synthetic: Path) -> None:
    stage = whole(tiny_synthetic, TINY.n_layer, weights="quantized")
    logits = full_logits(stage, np.array([[5, 80, 200, 7]], dtype=np.int64))
    assert logits.shape == (1, 4, 262)
    assert np.isfinite(logits).all() and logits.std() > 0


TINY_MOE = synthetic.SyntheticSpec(n_layer=2, n_embd=64, n_ff=128, n_head=4, n_head_kv=2, key_length=32,
                                   arch="qwen3moe", n_expert=4, n_expert_used=2, n_ff_exp=64)


@pytest.fixture(scope="module")
def tiny_moe(tokenizer_source: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    return synthetic.write_synthetic(tmp_path_factory.mktemp("syn") / "moe.gguf", TINY_MOE, tokenizer_source, "moe")


def test_synthetic_moe_is_qwen3moe_shaped_with_q4_0_experts(tiny_moe: Path) -> None:
    gf = GGUFFile(tiny_moe)
    hp = read_hparams(gf)
    assert (hp.arch, hp.n_layer, hp.n_embd, hp.head_dim, hp.n_vocab) == ("qwen3moe", 2, 64, 32, 262)
    moe = {lp.moe for lp in hp.layers}.pop()
    assert moe is not None and (moe.n_expert, moe.n_expert_used, moe.n_ff_exp) == (4, 2, 64)
    q4_0, f32 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.F32
    assert gf.tensors["blk.1.attn_q.weight"].shape == (128, 64)  # [heads x 32, E]: wider than E
    assert gf.tensors["blk.1.attn_output.weight"].shape == (64, 128)
    assert gf.tensors["blk.0.ffn_gate_exps.weight"].shape == (4, 64, 64)  # [n_expert, F, E]
    assert gf.tensors["blk.0.ffn_down_exps.weight"].shape == (4, 64, 64)  # [n_expert, E, F]
    assert {gf.tensors[f"blk.{i}.ffn_{r}_exps.weight"].qtype for i in (0, 1) for r in ("gate", "up", "down")} == {q4_0}
    assert gf.tensors["blk.1.attn_k_norm.weight"].shape == (32,)
    assert "blk.0.ffn_gate.weight" not in gf.tensors and "output.weight" not in gf.tensors
    router = gf.load("blk.1.ffn_gate_inp.weight")  # [n_expert, E]: unit-spread logits on unit-RMS input
    assert gf.tensors["blk.1.ffn_gate_inp.weight"].qtype == f32 and router.shape == (4, 64)
    assert 0.7 < float(router.std()) * 64**0.5 < 1.3
    d = float(np.float16(0.0045))
    w = gf.load("blk.1.ffn_up_exps.weight")  # [4, 64, 64] dequantized: (q - 8) * d
    np.testing.assert_allclose(w, np.round(w / d) * d, rtol=0, atol=1e-7)
    assert set(np.unique(np.round(w / d)).astype(int)) == set(range(-8, 8))


def test_synthetic_moe_runs_in_ppinfer_and_llamacpp_alike(tiny_moe: Path) -> None:
    """Both load the file; ppinfer's quantized path stays near llama.cpp's logits."""
    tokens = [5, 80, 200, 7, 130, 33]
    stage = whole(tiny_moe, TINY_MOE.n_layer, weights="quantized")
    ours = full_logits(stage, np.array([tokens], dtype=np.int64))[0]  # [T, V]
    assert ours.shape == (6, 262) and np.isfinite(ours).all() and ours.std() > 0
    pytest.importorskip("llama_cpp")
    # In a child process without AMX buffers, as every llama.cpp point of the bench runs: AMX
    # tile instructions fault on some VMs, which would take the test process down with them.
    scored, why = family_logits.llamacpp_logits(tiny_moe, np.array([tokens]), threads=1)
    assert scored is not None, why
    theirs = scored[0]  # [T, V]
    # Both quantize activations to 8 bits for the products, so the logits differ by rounding only.
    assert np.abs(ours - theirs).max() < 0.05 * np.abs(theirs).max()
    assert (ours.argmax(-1) == theirs.argmax(-1)).all()


def test_synthetic_cache_builds_once_and_leaves_no_partial_file(tokenizer_source: Path, tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(synthetic.MODELS, "tiny", TINY)
    first = synthetic.ensure_synthetic("tiny", tokenizer_source, cache_dir=tmp_path)
    stamp = first.stat().st_mtime_ns
    again = synthetic.ensure_synthetic("tiny", tokenizer_source, cache_dir=tmp_path)
    assert again == first and again.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [first.name]


def test_full_size_synthetic_shapes_match_the_issue() -> None:
    def params(spec: synthetic.SyntheticSpec) -> int:
        return sum(int(np.prod(shape)) for _, shape in synthetic.matrix_shapes(spec, 49152))

    one_b, seven_b, moe = (synthetic.MODELS[m] for m in (MODEL_1B, MODEL_7B, MODEL_MOE))
    # 18 bytes per 32 weights: about 604 MB and 3.8 GB with the tokenizer and norms.
    assert 600e6 < params(one_b) * 18 / 32 < 604e6
    assert 3.7e9 < params(seven_b) * 18 / 32 < 3.8e9
    assert (one_b.n_head, one_b.n_head_kv, one_b.kv_width) == (32, 4, 256)
    # 16 layers, hidden 2048, 64 experts of width 768, 8 used: 2.9 GB, 2.7 GB of it experts.
    assert (moe.n_layer, moe.n_embd, moe.n_expert, moe.n_ff_exp, moe.n_expert_used) == (16, 2048, 64, 768, 8)
    assert 2.9e9 < params(moe) * 18 / 32 < 2.96e9
    experts = sum(int(np.prod(s)) for n, s in synthetic.matrix_shapes(moe, 49152) if "_exps" in n)
    assert experts == 16 * 3 * 64 * 768 * 2048
    assert synthetic.cached_path(MODEL_MOE).name == "synthetic-qwen3moe-moe-q4_0.v1.gguf"


# --- the llama.cpp peer ------------------------------------------------------------------------


def test_llamacpp_prefill_batch_tags_every_prompt_and_asks_for_its_last_logits() -> None:
    entries, last = prefill_entries([[11, 12, 13], [21]])
    assert entries == [Entry(11, 0, 0, False), Entry(12, 1, 0, False), Entry(13, 2, 0, True), Entry(21, 0, 1, True)]
    assert last == [2, 3]


def test_llamacpp_decode_step_feeds_each_pick_at_its_next_position() -> None:
    # Prompts of 3 and 1 tokens: the first pick sits at positions 3 and 1, the second at 4 and 2.
    assert step_entries([7, 8], [3, 1], step=1) == [Entry(7, 3, 0, True), Entry(8, 1, 1, True)]
    assert step_entries([9, 10], [3, 1], step=2) == [Entry(9, 4, 0, True), Entry(10, 2, 1, True)]
    assert context_size([3, 1], 64) == 256 and context_size([200, 100], 64) == 512  # 428 rounded up


def test_llamacpp_points_are_skipped_without_llama_cpp_python(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("ppinfer.bench.sweep.llamacpp_installed", lambda: False)
    settings = SweepSettings(models={"default": tmp_path / "m.gguf"}, workdir=tmp_path, sizes=QUICK, timeout_s=5)
    result = run_llamacpp(LC_1, settings, PromptBook(settings.models, QUICK))
    assert result.skipped and result.metrics is None
    assert "llama-cpp-python not installed" in (result.error or "")
    assert not (tmp_path / LC_1.slug).exists()


def test_llamacpp_peer_runs_the_synthetic_model(tiny_synthetic: Path, tmp_path: Path) -> None:
    """The real child process on the tiny synthetic file: 3 sequences x 3 tokens, AMX kept out."""
    pytest.importorskip("llama_cpp")
    settings = SweepSettings(models={"default": tiny_synthetic}, workdir=tmp_path, sizes=QUICK, timeout_s=120)
    run = LlamaCppRun(threads=1, sequences=3, max_new_tokens=3)
    result = run_llamacpp(run, settings, PromptBook(settings.models, QUICK))
    assert result.metrics is not None, result.error
    m = result.metrics
    assert (m["runner"], m["sequences"], m["generated_tokens"], m["threads_per_rank"]) == ("llama.cpp", 3, 9, 1)
    assert m["decode_tokens_per_s"] > 0 and m["prefill_tokens_per_s"] > 0
    assert m["llama_cpp_version"].startswith("llama-cpp-python ")
    assert "AMX" not in m["llama_cpp_extra_buffer_types"]
    assert m["model_file_bytes"] == tiny_synthetic.stat().st_size
    assert 0 < m["per_stage"][0]["peak_rss_above_baseline_bytes"] < m["per_stage"][0]["peak_rss_bytes"]
    assert result.command[1] == "-I"  # a bare interpreter: its baseline holds no torch or ppinfer


def _greedy_with_margins(stage: Any, prompt: list[int], new: int) -> tuple[list[int], list[float]]:
    """ppinfer's greedy continuation by full recompute, and each step's top-1 minus top-2 logit."""
    seq, margins = list(prompt), []
    for _ in range(new):
        logits = full_logits(stage, np.array([seq], dtype=np.int64))[0, -1]  # [V]
        second, first = np.sort(logits)[-2:]
        margins.append(float(first - second))
        seq.append(int(logits.argmax()))
    return seq[len(prompt):], margins


@pytest.mark.slow
def test_llamacpp_batched_greedy_matches_ppinfer_on_the_real_model(smollm2_path: Path) -> None:
    """Prompts of different lengths decoded together by the peer continue as each does alone,
    and as ppinfer's greedy full recompute up to the first near-tie (llama.cpp quantizes
    activations, so a top-2 gap under half a logit may go either way): the batch's positions
    and sequence ids are right."""
    pytest.importorskip("llama_cpp")
    from ppinfer.bench.llamacpp import Session, generate

    tokenizer = load_tokenizer(smollm2_path)
    prompts = [tokenizer.encode(t) for t in short_prompts(4)]
    new = 6

    def llamacpp_greedy(batch: list[list[int]]) -> list[list[int]]:
        lengths = [len(p) for p in batch]
        session = Session(smollm2_path, threads=2, n_seq=len(batch), n_ctx=context_size(lengths, new),
                          n_batch=sum(lengths), drop_buffers=("AMX",))
        try:
            return generate(session, batch, new).tokens
        finally:
            session.close()

    together = llamacpp_greedy(prompts)
    assert together == [llamacpp_greedy([p])[0] for p in prompts]
    stage = whole(smollm2_path, 30)
    compared = 0
    for got, prompt in zip(together, prompts):
        expected, margins = _greedy_with_margins(stage, prompt, new)
        clear = next((i for i, m in enumerate(margins) if m < 0.5), new)
        assert got[:clear] == expected[:clear]
        compared += clear
    assert compared >= new  # at least a sequence's worth of tokens was decisive


@pytest.mark.parametrize("reference_first", [False, True])
def test_serving_pairs_alternate_which_side_runs_first(reference_first: bool) -> None:
    """The serving bench's pairs run the reference first every other pair (on the development
    VM the first run of a pair tends to be the faster), and still return (ours, reference)."""
    calls: list[str] = []

    def side(name: str, value: float):
        return lambda: calls.append(name) or value

    assert _in_order(side("ours", 1.0), side("reference", 2.0), reference_first) == (1.0, 2.0)
    assert calls == (["reference", "ours"] if reference_first else ["ours", "reference"])


def test_kv_memory_decode_rate_counts_the_window_where_every_request_decodes() -> None:
    """Two requests of 11 tokens (10 after the first), first tokens at 0 s and 2 s, ends at
    10 s and 12 s: both decode from 2 s to 10 s, 8 tokens each at 1 token/s: 2 tokens/s. No
    common window: 0."""
    assert decode_rate([Timing(0.0, 10.0, 11), Timing(2.0, 12.0, 11)]) == pytest.approx(2.0)
    assert decode_rate([Timing(0.0, 1.0, 11), Timing(2.0, 3.0, 11)]) == 0.0


def test_kv_memory_prompts_and_float32_kv_bytes(tiny_files: TinyFiles) -> None:
    """Prompts are distinct from their first block on; float32 K/V bytes a token = 2 (k, v) x
    layers x KV heads x head size x 4 bytes."""
    batch = prompts(8, 40)
    assert len(batch) == 8 and all(len(p) == 40 for p in batch)
    assert len({tuple(p[:16]) for p in batch}) == 8
    spec = ALL_CASES["llama"]
    assert kv_bytes_float32(tiny_files.path("llama")) == 2 * spec.n_layer * spec.n_head_kv * spec.head_dim * 4


def test_kv_greedy_counts_changed_answers_from_their_first_differing_token() -> None:
    """Equal answers do not count; a changed one counts from its first differing token, an answer
    that stops early from the shorter one's end; answers are cut after their first end token."""
    assert first_difference([5, 6, 7], [5, 6, 7]) is None
    assert first_difference([5, 6, 7], [5, 9, 7]) == 1
    assert first_difference([5, 6], [5, 6, 2, 8]) == 2
    change = compare(Answers("a", [[1, 2], [3, 4], [5]]), Answers("b", [[1, 2], [3, 9], [6]]))
    assert (change.changed, change.prompts, change.median_first) == ([(1, 1), (2, 0)], 3, 0.5)
    assert cut_at_end([4, 2, 7, 2], {2}) == [4, 2]
    assert cut_at_end([4, 7], {2}) == [4, 7]


def test_kv_greedy_llamacpp_point_sets_the_cache_types(tiny_synthetic: Path, tmp_path: Path) -> None:
    """The llama.cpp child with F32 and with F16 keys and values (flash attention off) returns
    each prompt's greedy tokens; a context field llama.cpp does not have fails the point."""
    pytest.importorskip("llama_cpp")
    args = argparse.Namespace(threads=1, new_tokens=3)
    prompts = [[1, 40, 41, 42], [1, 50]]
    for kv in ("f32", "f16"):
        answers = kv_greedy_llamacpp(tiny_synthetic, kv, False, prompts, set(), args, tmp_path)
        assert [len(t) for t in answers.tokens] == [3, 3]
        spec = json.loads((tmp_path / f"llamacpp-{kv}-fa0.json").read_text())
        assert spec["context"] == {"type_k": int(kv == "f16"), "type_v": int(kv == "f16"), "flash_attn_type": 0}
    spec_file = tmp_path / "bad.json"
    spec_file.write_text(json.dumps({"model": str(tiny_synthetic), "threads": 1, "new_tokens": 1, "prompts": [[1]],
                                     "out": str(tmp_path / "bad-out.json"), "context": {"no_such_field": 1}}))
    done = subprocess.run([sys.executable, "-I", str(ROOT / "ppinfer/bench/llamacpp.py"), str(spec_file)],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0 and "no field 'no_such_field'" in done.stderr
