"""`python -m ppinfer.bench`: run the benchmark scenarios and report the issue's ratios.

    python -m ppinfer.bench                         # every scenario, full size
    python -m ppinfer.bench --scenario peer         # one scenario (repeat the flag for more)
    python -m ppinfer.bench --quick                 # tiny smoke run of every scenario
    python -m ppinfer.bench --markdown docs/benchmarks.md
    python -m ppinfer.bench --dry-run               # the plan and commands, nothing run

Exit status: 0 when every point ran, 1 when one failed, 3 under `--check` when a target is
missed or cannot be computed.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import shlex
import sys
from pathlib import Path
from typing import Sequence

from ppinfer.bench.report import (
    RUN_HEADERS, RatioResult, evaluate, machine_info, markdown_report, run_row, text_ratios, text_table,
)
from ppinfer.bench.scenarios import FULL, QUICK, SCENARIOS, PipelineRun, Plan, Sizes, plan
from ppinfer.bench.sweep import PromptBook, RunResult, SweepSettings, pipeline_command, repo_root, sweep
from ppinfer.hub import ensure_model

SIZE_FLAGS = ("max_new_tokens", "lane_size", "long_prompt_tokens", "prefill_chunk", "peer_threads")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m ppinfer.bench",
        description="Sweep stages x lanes x sequences per lane on the default model, time transformers' "
                    "generate on the same file, and report the ratios the pipeline targets.",
    )
    parser.add_argument("--scenario", action="append", choices=(*SCENARIOS, "all"), metavar="NAME",
                        help=f"one of {', '.join(SCENARIOS)}, all (default: all; repeat for several)")
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run of the harness")
    parser.add_argument("--max-new-tokens", type=int, help=f"tokens per sequence (default {FULL.max_new_tokens})")
    parser.add_argument("--lane-size", type=int, help=f"sequences per lane (default {FULL.lane_size})")
    parser.add_argument("--long-prompt-tokens", type=int,
                        help=f"prefill scenario prompt length (default {FULL.long_prompt_tokens})")
    parser.add_argument("--prefill-chunk", type=int, help=f"prefill scenario chunk (default {FULL.prefill_chunk})")
    parser.add_argument("--peer-threads", type=int, help=f"transformers threads (default {FULL.peer_threads})")
    parser.add_argument("--model", type=Path, help="GGUF file (default: the default model, fetched if needed)")
    parser.add_argument("--workdir", type=Path, default=Path("outputs/bench"),
                        help="where each point's prompts, log and metrics go (default outputs/bench)")
    parser.add_argument("--markdown", type=Path, metavar="FILE", help="also write the report as Markdown")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds allowed per point (default 1800)")
    parser.add_argument("--dry-run", action="store_true", help="print the plan and commands, run nothing")
    parser.add_argument("--check", action="store_true", help="exit 3 when a target is missed")
    return parser


def _describe(chosen: Plan, settings: SweepSettings) -> str:
    lines = [f"scenarios: {', '.join(chosen.scenarios)}", "runs:"]
    for run in chosen.runs:
        lines.append(f"  {run.label}")
        if isinstance(run, PipelineRun):
            out = settings.workdir / run.slug
            lines.append("    " + shlex.join(pipeline_command(run, settings.model, out / "prompts.txt", out)))
    lines.append("ratios:")
    lines.extend(f"  {r.key}: {r.title} ({'>=' if r.higher_is_better else '<='} {r.target:g})" for r in chosen.ratios)
    return "\n".join(lines)


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
    chosen = plan(args.scenario or ["all"], sizes)
    if args.model is not None and not args.model.is_file():
        parser.error(f"--model {args.model}: no such file")
    model = (args.model or ensure_model()).resolve()
    settings = SweepSettings(model=model, workdir=args.workdir.resolve(), sizes=sizes, timeout_s=args.timeout)
    if args.dry_run:
        print(_describe(chosen, settings))
        return 0
    # Build the long prompt before any point runs, so a tokenizer problem fails in seconds.
    book = PromptBook(model, sizes)
    for run in chosen.runs:
        book.texts(run)
    command = shlex.join(["python", "-m", "ppinfer.bench", *(sys.argv[1:] if argv is None else argv)])
    machine = machine_info(repo_root(), command)  # dated when the run starts
    results = sweep(chosen, settings, book)
    by_run = {r.run: r.metrics for r in results}
    ratios = [evaluate(r, by_run) for r in chosen.ratios]
    rows = [run_row(r.run, r.metrics, r.error) for r in results]
    print(text_table(RUN_HEADERS, rows))
    print()
    print(text_ratios(ratios))
    _write_json(settings.workdir / "results.json", machine, sizes, results, ratios)
    if args.markdown is not None:
        runs = [(r.run, r.metrics, r.error) for r in results]
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        args.markdown.write_text(markdown_report(machine, ratios, runs), encoding="utf-8")
        logging.getLogger("ppinfer.bench").info("wrote %s", args.markdown)
    if any(r.metrics is None for r in results):
        return 1
    if args.check and any(not r.passed for r in ratios):
        return 3
    return 0


def _write_json(path: Path, machine: dict[str, str], sizes: Sizes, results: Sequence[RunResult],
                ratios: Sequence[RatioResult]) -> None:
    """Every number of the run in one file, for tools and later comparison."""
    payload = {
        "machine": machine,
        "sizes": dataclasses.asdict(sizes),
        "runs": [
            {"label": r.run.label, "kind": type(r.run).__name__, "settings": dataclasses.asdict(r.run),
             "command": list(r.command), "log": str(r.log), "metrics": r.metrics, "error": r.error}
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
