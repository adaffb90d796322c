"""Turning results into numbers people read: the ratios, the run table (plain text and
Markdown), the machine description, and the Markdown page `docs/benchmarks.md` is made from."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Mapping, Sequence

from ppinfer.bench.scenarios import Metrics, PeerRun, Ratio, Run, Term

MB = 2**20

RUN_HEADERS = (
    "runner", "stages", "threads/rank", "lanes", "seqs/lane", "prompts", "new tok",
    "prefill tok/s", "decode tok/s", "TTFT s", "bubble meas (max)", "bubble theory",
    "peak RSS MB/rank", "above baseline MB/rank",
)
RATIO_HEADERS = ("ratio", "value", "target", "verdict", "from")


@dataclass(frozen=True)
class RatioResult:
    """A ratio's value (None when a run it needs failed or lacks the metric) and how it was
    obtained: the numbers it divides, or why it could not be computed."""

    ratio: Ratio
    value: float | None
    detail: str

    @property
    def passed(self) -> bool | None:
        if self.value is None:
            return None
        r = self.ratio
        return self.value >= r.target if r.higher_is_better else self.value <= r.target

    @property
    def verdict(self) -> str:
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]

    @property
    def target_text(self) -> str:
        return f"{'>=' if self.ratio.higher_is_better else '<='} {self.ratio.target:g}"


class MissingRun(LookupError):
    """A ratio needs a run that has no metrics (not planned, or failed)."""


def _term_value(term: Term, results: Mapping[Run, Metrics | None]) -> float:
    metrics = results.get(term.run)
    if metrics is None:
        raise MissingRun(f"no metrics for {term.run.label}")
    return term.scale * term.metric.read(metrics)


def _term_text(term: Term, value: float) -> str:
    unscaled = value / term.scale
    unit = f" {term.metric.unit}" if term.metric.unit else ""
    scale = f"{term.scale:g} x " if term.scale != 1.0 else ""
    return f"{scale}{unscaled:.4g}{unit} ({term.run.label})"


def _numerator(ratio: Ratio, results: Mapping[Run, Metrics | None]) -> tuple[Term, float, str]:
    """The numerator term actually used, its value, and a note when it is the fallback."""
    try:
        return ratio.numerator, _term_value(ratio.numerator, results), ""
    except KeyError as missing:
        if ratio.fallback is None:
            raise
        note = f" [fallback: {ratio.fallback.metric.name}, as metrics.json lacks {missing}]"
        return ratio.fallback, _term_value(ratio.fallback, results), note


def evaluate(ratio: Ratio, results: Mapping[Run, Metrics | None]) -> RatioResult:
    """Compute `ratio` from the runs' metrics; a missing run or metric gives value None."""
    try:
        numerator, top, note = _numerator(ratio, results)
        if ratio.denominator is None:
            return RatioResult(ratio, top, f"{_term_text(numerator, top)}{note}")
        bottom = _term_value(ratio.denominator, results)
    except MissingRun as why:
        return RatioResult(ratio, None, str(why))
    except KeyError as missing:
        return RatioResult(ratio, None, f"metrics.json lacks {missing}")
    value = top / bottom if bottom else float("inf")
    return RatioResult(ratio, value, f"{_term_text(numerator, top)} / {_term_text(ratio.denominator, bottom)}{note}")


def _num(value: Any, digits: int) -> str:
    return f"{float(value):.{digits}f}" if value is not None else "-"


def run_row(run: Run, metrics: Metrics | None, error: str | None) -> list[str]:
    """One table row: the configuration (as the run reports it, else as planned), then the
    figures (or the failure)."""
    m: Mapping[str, Any] = metrics or {}
    if isinstance(run, PeerRun):
        runner, stages, lanes, lane_size = "transformers", 1, 1, run.sequences
    else:
        runner, stages, lanes, lane_size = "ppinfer", run.stages, run.lanes, run.lane_size
    config = [
        runner,
        str(m.get("stages", stages)),
        str(m.get("threads_per_rank", run.threads)),
        str(m.get("microbatches", lanes)),
        str(m.get("lane_size", lane_size)),
        f"{run.sequences} {run.prompts}",
        str(run.max_new_tokens),
    ]
    if metrics is None:
        first_line = (error or "no metrics").splitlines()[0]
        return config + [f"failed: {first_line}"] + [""] * (len(RUN_HEADERS) - len(config) - 1)
    per_stage = m.get("per_stage", [])
    bubbles = [s["bubble_fraction"] for s in per_stage if "bubble_fraction" in s]
    return config + [
        _num(m["prefill_tokens_per_s"], 1),
        _num(m["decode_tokens_per_s"], 1),
        _num(m["time_to_first_token_s"], 3),
        _num(max(bubbles), 3) if bubbles else "-",
        _num(m.get("theoretical_bubble_fraction"), 3),
        "/".join(f"{s['peak_rss_bytes'] / MB:.0f}" for s in per_stage) or "-",
        "/".join(f"{s['peak_rss_above_baseline_bytes'] / MB:.0f}" for s in per_stage) or "-",
    ]


def ratio_row(result: RatioResult) -> list[str]:
    value = f"{result.value:.3f}" if result.value is not None else "-"
    return [f"{result.ratio.key}: {result.ratio.title}", value, result.target_text, result.verdict, result.detail]


def text_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Columns padded to their widest cell, for a terminal."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]
    lines = ["  ".join(c.ljust(w) for c, w in zip(headers, widths)).rstrip()]
    lines.append("  ".join("-" * w for w in widths))
    lines.extend("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows)
    return "\n".join(lines)


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def cells(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|").replace("\n", " ") for c in row) + " |"

    return "\n".join([cells(headers), "|" + "---|" * len(headers), *(cells(r) for r in rows)])


def text_ratios(results: Sequence[RatioResult]) -> str:
    """Ratios for a terminal: one block each, since the titles and details are long."""
    blocks = []
    for r in results:
        value = f"{r.value:.3f}" if r.value is not None else "-"
        blocks.append(f"{r.verdict:4}  {r.ratio.key} = {value} (target {r.target_text})\n"
                      f"      {r.ratio.title}\n      {r.detail}")
    return "\n".join(blocks)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError as exc:
        return f"unknown ({exc.strerror})"
    return platform.processor() or "unknown"


def _package_version(name: str) -> str:
    try:
        return version(name)
    except PackageNotFoundError:
        return "not installed"


def _commit(root: Path) -> str:
    try:
        done = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                              check=False, timeout=10)
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"unknown ({type(exc).__name__})"
    return done.stdout.strip() if done.returncode == 0 else "unknown (not a git checkout)"


def machine_info(root: Path, command: str) -> dict[str, str]:
    """What a reader needs to reproduce or compare the numbers."""
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "command": command,
        "CPU": _cpu_model(),
        "cores": f"{os.cpu_count()} logical, {usable} usable by this process",
        "OS": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": _package_version("torch"),
        "transformers": _package_version("transformers"),
        "ppinfer commit": _commit(root),
    }


METHOD_NOTES = """\
- Every ppinfer point is its own `torchrun --standalone --nproc_per_node=S launch/infer.py` run on
  CPU (float32, greedy, `generation.ignore_eos=true`); the points run one after another, never two
  at once. The figures are the runtime's own `metrics.json`.
- prefill tok/s: prompt tokens (padding excluded) / time spent on prefill work; decode tok/s:
  tokens sampled after each sequence's first / time spent on decode work; TTFT: time from the
  start of the loop to the first sampled token.
- bubble meas (max): the largest per-stage idle share of the rank's loop time; bubble theory: the
  same order of work with every item costing the same (fill and drain only).
- peak RSS: each rank's peak resident set; above baseline: minus the rank's RSS when it started,
  i.e. a process that has imported torch but loaded nothing.
- transformers peer: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` in
  its own process, `torch.set_num_threads(2)`, one left-padded batch of the same token ids
  (ppinfer's tokenizer), greedy, `min_new_tokens = max_new_tokens`; one short untimed warm-up
  call; TTFT and decode split by a streamer that stamps each step.
"""


def markdown_report(machine: Mapping[str, str], ratios: Sequence[RatioResult],
                    runs: Sequence[tuple[Run, Metrics | None, str | None]]) -> str:
    """The whole benchmark page: machine, ratios against the issue's targets, every run, method."""
    machine_rows = [[k, f"`{v}`" if k == "command" else v] for k, v in machine.items()]
    parts = [
        "# ppinfer benchmarks",
        f"Generated by `{machine['command']}` on {machine['date']}.",
        "## Machine",
        markdown_table(("", ""), machine_rows),
        "## Targets",
        markdown_table(RATIO_HEADERS, [ratio_row(r) for r in ratios]),
        "## Runs",
        markdown_table(RUN_HEADERS, [run_row(run, m, e) for run, m, e in runs]),
        "## How the numbers are measured",
        METHOD_NOTES,
    ]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
