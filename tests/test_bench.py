"""The benchmark harness: the planner (which runs each scenario needs), the ratios computed from
hand-made metrics with hand-computed expected values, the tables, and a --quick smoke run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from ppinfer.bench.peer import left_padded
from ppinfer.bench.prompts import SHORT_PROMPTS, long_prompt, short_prompts
from ppinfer.bench.report import evaluate, markdown_report, markdown_table, run_row, text_table
from ppinfer.bench.scenarios import FULL, QUICK, PeerRun, PipelineRun, Sizes, plan
from ppinfer.bench.sweep import hydra_value, pipeline_command
from ppinfer.generation.tokenizer import load_tokenizer

MB = 2**20
ROOT = Path(__file__).resolve().parents[1]


def pp(stages: int, threads: int, lanes: int, lane_size: int, new: int = 64, **kw: Any) -> PipelineRun:
    return PipelineRun(stages=stages, threads=threads, lanes=lanes, lane_size=lane_size, max_new_tokens=new, **kw)


# The full-size points, written out by hand from the wording.
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


def fake(decode: float = 10.0, prefill: float = 100.0, above_mb: tuple[float, ...] = (100.0,),
         bubbles: tuple[float, ...] | None = None, decode_idle: tuple[float, ...] | None = None) -> dict[str, Any]:
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
        "wall_s": 3.0, "theoretical_bubble_fraction": 0.1, "per_stage": stages,
    }


# --- planner -------------------------------------------------------------------------------


@pytest.mark.parametrize(("scenario", "expected"), [
    ("efficiency", {ONE_STAGE_16, TWO_STAGE_2x16}),
    ("threads", {TWO_STAGE_2x16, TWO_THREADS_32}),
    ("peer", {TWO_STAGE_2x16, PEER_32, SINGLE_TWO_THREADS, PEER_1}),
    ("latency", {SINGLE_TWO_STAGE, SINGLE_ONE_STAGE}),
    ("prefill", {PREFILL_1, PREFILL_2}),
    ("memory", {MEMORY_1, MEMORY_4}),
])
def test_each_scenario_plans_exactly_the_runs_its_ratios_need(scenario: str, expected: set[Any]) -> None:
    chosen = plan([scenario], FULL)
    assert set(chosen.runs) == expected
    assert len(chosen.runs) == len(expected)


def test_all_runs_each_shared_point_once_and_the_peer_last() -> None:
    chosen = plan(["all"], FULL)
    assert len(chosen.runs) == 12  # 10 ppinfer points + 2 transformers batches
    assert chosen.runs.count(TWO_STAGE_2x16) == 1  # shared by efficiency, threads and peer
    assert [type(r) for r in chosen.runs[-2:]] == [PeerRun, PeerRun]
    assert [r.key for r in chosen.ratios] == [
        "pipeline_efficiency", "decode_idle", "stages_vs_threads", "vs_transformers_batch",
        "vs_transformers_single", "single_sequence_latency", "chunked_prefill", "memory_per_rank",
    ]
    assert plan(["latency", "all", "latency"], FULL) == chosen


def test_memory_points_hold_the_same_sequences_with_a_lane_per_stage() -> None:
    assert MEMORY_1.sequences == MEMORY_4.sequences == 4
    assert MEMORY_4.lanes >= MEMORY_4.stages


def test_quick_shrinks_the_workload_but_keeps_the_shape() -> None:
    quick = plan(["efficiency", "threads"], QUICK)
    assert set(quick.runs) == {pp(1, 1, 1, 2, 4), pp(2, 1, 2, 2, 4), pp(1, 2, 1, 4, 4)}


def test_bad_scenario_and_size_are_named() -> None:
    with pytest.raises(ValueError, match="'speed'"):
        plan(["speed"], FULL)
    with pytest.raises(ValueError, match="lane_size=0"):
        Sizes(lane_size=0)


def test_slugs_are_unique_so_points_never_share_a_directory() -> None:
    runs = plan(["all"], FULL).runs + plan(["all"], QUICK).runs
    assert len({r.slug for r in runs}) == len(set(runs))


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
    }


def test_ratios_match_hand_computed_values() -> None:
    results = _all_results()
    got = {r.key: evaluate(r, results) for r in plan(["all"], FULL).ratios}
    expected = {
        "pipeline_efficiency": (93 / (2 * 50), True),  # 0.93
        "decode_idle": (0.12, False),  # no decode_idle_fraction: whole-run bubble, max over stages
        "stages_vs_threads": (93 / 62, True),  # 1.5
        "vs_transformers_batch": (93 / 40, True),  # 2.325
        "vs_transformers_single": (15 / 6, True),  # 2.5
        "single_sequence_latency": ((1 / 16) / (1 / 20), False),  # 1.25 > 1.15
        "chunked_prefill": (340 / 200, True),  # 1.7
        "memory_per_rank": (150 / 400, False),  # 0.375 > 0.35
    }
    for key, (value, passed) in expected.items():
        assert got[key].value == pytest.approx(value), key
        assert got[key].passed is passed, key
    assert "fallback" in got["decode_idle"].detail
    assert "2 x 50 tok/s" in got["pipeline_efficiency"].detail


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
    assert row == ["ppinfer", "2", "1", "2", "16", "32 short", "64", "56.8", "12.3", "0.250", "0.250", "0.100",
                   "550/700", "300/450"]


def test_failed_run_row_keeps_the_configuration_and_says_why() -> None:
    row = run_row(PEER_1, None, "exit code 2; see run.log:\n    Traceback")
    assert row[:7] == ["transformers", "1", "2", "1", "1", "1 short", "64"]
    assert row[7] == "failed: exit code 2; see run.log:"


def test_tables_align_and_escape() -> None:
    assert text_table(("a", "bb"), [["xyz", "1"]]).splitlines() == ["a    bb", "---  --", "xyz  1"]
    assert markdown_table(("k", "v"), [["a|b", "1"]]) == "| k | v |\n|---|---|\n| a\\|b | 1 |"


def test_markdown_report_has_machine_targets_and_runs() -> None:
    results = _all_results()
    chosen = plan(["efficiency"], FULL)
    ratios = [evaluate(r, results) for r in chosen.ratios]
    page = markdown_report({"date": "D", "command": "python -m ppinfer.bench --x", "CPU": "Z80"}, ratios,
                           [(r, results[r], None) for r in chosen.runs])
    assert "Generated by `python -m ppinfer.bench --x` on D." in page
    assert "| CPU | Z80 |" in page
    assert "| pipeline_efficiency: " in page and "| 0.930 | >= 0.9 | pass |" in page
    assert page.count("| ppinfer |") == 2


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
    assert not any(c.startswith("pipeline.prefill_chunk") for c in default_chunk)


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
