"""`python -m ppinfer.bench`: run the benchmark scenarios and report the target ratios.

    python -m ppinfer.bench                         # every scenario but the MoE and 7B ones, full size
    python -m ppinfer.bench --scenario peer         # one scenario (repeat the flag for more)
    python -m ppinfer.bench --suite quant           # quantized weights vs llama.cpp on the same files
    python -m ppinfer.bench --suite moe             # the Qwen3-MoE-shaped model vs llama.cpp (2.9 GB file)
    python -m ppinfer.bench --scenario quant-7b     # the 7B-shaped model on 4 ranks (slow)
    python -m ppinfer.bench --quick                 # tiny smoke run of every scenario
    python -m ppinfer.bench --rounds 3              # every point three times over; each ratio's median
    python -m ppinfer.bench --markdown /tmp/bench.md     # the report page, to copy from into docs/benchmarks.md
    python -m ppinfer.bench --dry-run               # the plan and commands, nothing run

Exit status: 0 when every point ran (llama.cpp points are skipped, not failed, without
llama-cpp-python), 1 when one failed, 3 under `--check` when a target is missed or cannot be
computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

from ppinfer.bench.metrics import Ratio
from ppinfer.bench.planner import Plan, plan
from ppinfer.bench.report import (
    RUN_HEADERS,
    RatioResult,
    evaluate,
    llamacpp_build,
    machine_info,
    markdown_report,
    median_of_rounds,
    model_files,
    run_row,
    text_ratios,
    text_table,
)
from ppinfer.bench.runs import DEFAULT_MODEL, FULL, QUICK, PipelineRun, Sizes
from ppinfer.bench.scenarios import SCENARIOS, SUITES
from ppinfer.bench.sweep import PromptBook, RunResult, SweepSettings, pipeline_command, repo_root, sweep
from ppinfer.bench.synthetic import cached_path, ensure_synthetic
from ppinfer.hub import ensure_model

SIZE_FLAGS = ("max_new_tokens", "lane_size", "long_prompt_tokens", "prefill_chunk", "peer_threads", "quant_lane_size")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppinfer.bench",
        description="Sweep stages x lanes x sequences per lane on the default model and synthetic llama- and "
                    "Qwen3-MoE-shaped Q4_0 models, time transformers and llama.cpp on the same files, and report the "
                    "ratios the pipeline targets.",
    )
    parser.add_argument("--scenario", action="append", choices=(*SCENARIOS, "all"), metavar="NAME",
                        help=f"one of {', '.join(SCENARIOS)}, all (default: all but the slow suite; repeat for "
                             "several)")
    parser.add_argument("--suite", action="append", choices=tuple(SUITES), metavar="NAME",
                        help="; ".join(f"{k}: {', '.join(v)}" for k, v in SUITES.items()) + " (repeat for several)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the harness")
    parser.add_argument("--max-new-tokens", type=int, help=f"tokens per sequence (default {FULL.max_new_tokens})")
    parser.add_argument("--lane-size", type=int, help=f"sequences per lane (default {FULL.lane_size})")
    parser.add_argument("--long-prompt-tokens", type=int,
                        help=f"prefill scenario prompt length (default {FULL.long_prompt_tokens})")
    parser.add_argument("--prefill-chunk", type=int, help=f"prefill scenario chunk (default {FULL.prefill_chunk})")
    parser.add_argument("--peer-threads", type=int,
                        help=f"transformers and llama.cpp threads (default {FULL.peer_threads})")
    parser.add_argument("--quant-lane-size", type=int,
                        help=f"sequences per lane in the 1.1B batch point (default {FULL.quant_lane_size})")
    parser.add_argument("--llamacpp-amx", action="store_true",
                        help="let llama.cpp put weights in AMX buffers (off by default: AMX faults on some VMs)")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model, fetched if needed)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench"),
                        help="where each point's prompts, log and metrics go (default outputs/bench)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report as Markdown")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per point (default 1800)")
    parser.add_argument("--rounds", type=int, default=1,
                        help="run every point this many times, round after round (so ppinfer and its peers "
                             "alternate), and report each ratio's median round (default 1)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    parser.add_argument("--check", action="store_true", help="exit 3 when a target is missed")
    return parser


def _describe(chosen: Plan, settings: SweepSettings) -> str:
    lines = [f"scenarios: {', '.join(chosen.scenarios)}", "models:"]
    lines.extend(f"  {name}: {path}" for name, path in settings.models.items())
    lines.append("runs:")
    for run in chosen.runs:
        lines.append(f"  {run.label}")
        if isinstance(run, PipelineRun):
            out = settings.workdir / run.slug
            model = settings.models[run.model]
            lines.append("    " + shlex.join(pipeline_command(run, model, out / "prompts.txt", out)))
    lines.append("ratios:")
    lines.extend(f"  {r.key}: {r.title} ({_target(r)})" for r in chosen.ratios)
    return "\n".join(lines)


def _target(ratio: Ratio) -> str:
    if ratio.target is None:
        return "for information"
    return f"{'>=' if ratio.higher_is_better else '<='} {ratio.target:g}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    base = QUICK if args.quick else FULL
    overrides = {k: getattr(args, k) for k in SIZE_FLAGS if getattr(args, k) is not None}
    try:
        sizes = dataclasses.replace(base, **overrides)
    except ValueError as exc:
        parser.error(f"--{str(exc).replace('_', '-')}")
    chosen = plan([*(args.scenario or []), *(args.suite or [])] or ["all"], sizes)
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    if args.rounds < 1:
        parser.error(f"--rounds {args.rounds}: must be at least 1")
    models = _models(chosen, args.model, build=not args.dry_run)
    settings = SweepSettings(models=models, workdir=args.workdir.resolve(), sizes=sizes, timeout_s=args.timeout,
                             llamacpp_drop_buffers=() if args.llamacpp_amx else ("AMX",))
    if args.dry_run:
        print(_describe(chosen, settings))
        return 0
    # Build the long prompt before any point runs, so a tokenizer problem fails in seconds.
    book = PromptBook(models, sizes)
    for run in chosen.runs:
        book.texts(run)
    command = shlex.join(["python", "-m", "ppinfer.bench", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info(repo_root(), command)  # dated when the run starts
    machine["models"] = model_files(models)
    rounds: list[list[RunResult]] = []
    per_round: list[list[RatioResult]] = []
    for i in range(1, args.rounds + 1):
        round_settings = settings
        if args.rounds > 1:
            round_settings = dataclasses.replace(settings, workdir=settings.workdir / f"round{i}")
            logging.getLogger("ppinfer.bench").info("round %d of %d", i, args.rounds)
        results = sweep(chosen, round_settings, book)
        by_run = {r.run: r.metrics for r in results}
        rounds.append(results)
        per_round.append([evaluate(r, by_run) for r in chosen.ratios])
        if args.rounds > 1:
            _write_json(round_settings.workdir / "results.json", machine, sizes, results, per_round[-1])
    machine["llama.cpp"] = llamacpp_build([r for results in rounds for r in results]) or "not run"
    ratios = [median_of_rounds(list(values)) for values in zip(*per_round, strict=True)]
    for i, results in enumerate(rounds, 1):
        if args.rounds > 1:
            print(f"round {i} of {args.rounds}")
        print(text_table(RUN_HEADERS, [run_row(r.run, r.metrics, r.error, r.skipped) for r in results]))
        print()
    print(text_ratios(ratios))
    _write_json(settings.workdir / "results.json", machine, sizes, [r for results in rounds for r in results], ratios)
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(machine, ratios, rounds), encoding="utf-8")
        logging.getLogger("ppinfer.bench").info("wrote %s", args.markdown)
    return exit_code([r for results in rounds for r in results], ratios, args.check)


def exit_code(results: Sequence[RunResult], ratios: Sequence[RatioResult], check: bool) -> int:
    """1 when a point failed (a skipped one did not); under `check`, 3 when a target is missed or
    cannot be computed (informational ratios have none)."""
    if any(r.metrics is None and not r.skipped for r in results):
        return 1
    if check and any(not r.passed for r in ratios if not r.informational):
        return 3
    return 0


def _models(chosen: Plan, default: Path | None, build: bool) -> dict[str, Path]:
    """Every model the plan's runs use -> its file; synthetic ones are built on first use
    (with `build` false, only their cache paths are named)."""
    names = dict.fromkeys(run.model for run in chosen.runs)
    models = {DEFAULT_MODEL: (default or ensure_model()).resolve()}
    for name in names:
        if name != DEFAULT_MODEL:
            models[name] = ensure_synthetic(name) if build else cached_path(name)
    return models


def _write_json(path: Path, machine: dict[str, str], sizes: Sizes, results: Sequence[RunResult],
                ratios: Sequence[RatioResult]) -> None:
    """Every number of the run in one file, for tools and later comparison."""
    payload = {
        "machine": machine,
        "sizes": dataclasses.asdict(sizes),
        "runs": [
            {"label": r.run.label, "kind": type(r.run).__name__, "settings": dataclasses.asdict(r.run),
             "command": list(r.command), "log": str(r.log), "metrics": r.metrics, "error": r.error,
             "skipped": r.skipped}
            for r in results
        ],
        "ratios": [
            dict(zip(("key", "value", "target", "verdict", "detail"),
                     (r.ratio.key, r.value, r.target_text, r.verdict, r.detail)))
            for r in ratios
        ],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(payload, indent=2), encoding="utf-8")


if __name__ == "__main__":
    sys.exit(main())
