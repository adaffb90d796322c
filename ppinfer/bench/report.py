"""Turning results into numbers people read: the ratios, the run table (plain text and
Markdown), the machine description, and the Markdown page `docs/benchmarks.md` is made from."""

from __future__ import annotations

import datetime
import os
import platform
import subprocess
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, Protocol

from ppinfer.bench.metrics import Ratio, Term
from ppinfer.bench.runs import LlamaCppRun, Metrics, PeerRun, Run

MB = 2**20

RUN_HEADERS = (
    "runner", "model", "stages", "threads/rank", "lanes", "seqs/lane", "prompts", "new tok",
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
        """None when there is no value or no target (an informational ratio)."""
        r = self.ratio
        if self.value is None or r.target is None:
            return None
        return self.value >= r.target if r.higher_is_better else self.value <= r.target

    @property
    def informational(self) -> bool:
        return self.ratio.target is None

    @property
    def verdict(self) -> str:
        if self.informational and self.value is not None:
            return "info"
        return {True: "pass", False: "FAIL", None: "n/a"}[self.passed]

    @property
    def target_text(self) -> str:
        if self.ratio.target is None:
            return "-"
        return f"{'>=' if self.ratio.higher_is_better else '<='} {self.ratio.target:g}"


class Outcome(Protocol):
    """One point's result as the report reads it (`sweep.RunResult` is one)."""

    run: Run
    metrics: Metrics | None
    error: str | None
    skipped: bool


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


def median_of_rounds(rounds: Sequence[RatioResult]) -> RatioResult:
    """One ratio evaluated in each of several rounds -> the round whose value is the median
    (the lower of the middle two for an even count), its detail preceded by every round's
    value; no value where no round has one."""
    valued = sorted((r for r in rounds if r.value is not None), key=lambda r: r.value or 0.0)
    values = ", ".join(f"{r.value:.3f}" if r.value is not None else "-" for r in rounds)
    if not valued:
        return RatioResult(rounds[0].ratio, None, f"no round gave a value ({values}); round 1: {rounds[0].detail}")
    middle = valued[(len(valued) - 1) // 2]
    return RatioResult(middle.ratio, middle.value, f"median of {len(rounds)} rounds ({values}); {middle.detail}")


def _num(value: Any, digits: int) -> str:
    return f"{float(value):.{digits}f}" if value is not None else "-"


def run_row(run: Run, metrics: Metrics | None, error: str | None, skipped: bool = False) -> list[str]:
    """One table row: the configuration (as the run reports it, else as planned), then the
    figures (or the failure)."""
    m: Mapping[str, Any] = metrics or {}
    if isinstance(run, PeerRun):
        runner, model, stages, lanes, lane_size = "transformers", run.model, 1, 1, run.sequences
    elif isinstance(run, LlamaCppRun):
        runner, model, stages, lanes, lane_size = "llama.cpp", run.model, 1, 1, run.sequences
    else:
        runner = "ppinfer" if run.weights is None else f"ppinfer {run.weights}"
        model, stages, lanes, lane_size = run.model, run.stages, run.lanes, run.lane_size
    config = [
        runner,
        model,
        str(m.get("stages", stages)),
        str(m.get("threads_per_rank", run.threads)),
        str(m.get("microbatches", lanes)),
        str(m.get("lane_size", lane_size)),
        f"{run.sequences} {run.prompts}",
        str(run.max_new_tokens),
    ]
    if metrics is None:
        first_line = (error or "no metrics").splitlines()[0]
        outcome = "skipped" if skipped else "failed"
        return config + [f"{outcome}: {first_line}"] + [""] * (len(RUN_HEADERS) - len(config) - 1)
    per_stage = m.get("per_stage", [])
    bubbles = [s["bubble_fraction"] for s in per_stage if "bubble_fraction" in s]
    return [
        *config,
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
        "llama-cpp-python": _package_version("llama-cpp-python"),
        "ppinfer commit": _commit(root),
    }


def model_files(models: Mapping[str, Path]) -> str:
    """`name: file (size)` for every model the runs use."""
    return "; ".join(f"{name}: {path.name} ({path.stat().st_size / 1e6:.0f} MB)" for name, path in models.items())


def llamacpp_build(outcomes: Sequence[Outcome]) -> str | None:
    """The llama.cpp build and the buffer types it used, from the first llama.cpp run that has them."""
    for o in outcomes:
        if isinstance(o.run, LlamaCppRun) and o.metrics is not None and "llama_cpp_version" in o.metrics:
            buffers = ", ".join(o.metrics.get("llama_cpp_extra_buffer_types", [])) or "none"
            return f"{o.metrics['llama_cpp_version']}; extra CPU buffer types: {buffers}"
    return None


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
- ppinfer runs with the runtime's default `runtime.weights` (quantized: weights stay in their
  GGUF blocks) unless the runner column says `dequantized`. Ratios with target `-` are shown for
  information.
- transformers peer: `AutoModelForCausalLM.from_pretrained(dir, gguf_file=..., dtype=float32)` in
  its own process, `torch.set_num_threads(2)`, one left-padded batch of the same token ids
  (ppinfer's tokenizer), greedy, `min_new_tokens = max_new_tokens`; one short untimed warm-up
  call; TTFT and decode split by a streamer that stamps each step.
- llama.cpp peer: llama-cpp-python's low-level API in a fresh process per point, the same file
  and token ids, `n_threads = n_threads_batch = 2`, library defaults otherwise (mmapped weights,
  f16 KV cache) except that weights never go to AMX buffers (on the benchmark VM AMX tile
  instructions fault); B sequences share one context (`n_seq_max = B`, unified KV cache), prefill
  is one `llama_decode` of every prompt, each decode step one `llama_decode` of B tokens; greedy,
  exactly `max_new_tokens` tokens (EOS never checked); one untimed 2-token run of the same
  prompts first. Its RSS above baseline is above a bare Python interpreter and includes the
  mapped file pages it touched.
- 1.1b-q4_0 and 7b-q4_0 are synthetic llama-architecture files (`python -m
  ppinfer.bench.synthetic`): TinyLlama-1.1B's and Llama-2-7B's shapes, SmolLM2's tokenizer and
  49152-token vocabulary, tied output, every 2-D tensor Q4_0 with random 4-bit values and block
  scale 0.0045, norms 1.0. Only their speed and memory mean anything.
"""

LLAMACPP_INSTALL = """\
### Benchmarking against llama.cpp

The llama.cpp points need llama-cpp-python (the optional `bench` extra); without it they are
reported as skipped and the rest of the benchmark runs. It compiles llama.cpp for about 15
minutes, so build the wheel once into a cache outside the repository and install that file:
`pip wheel --no-deps 'llama-cpp-python>=0.3' -w ~/.cache/ppinfer-bench/wheels`, then
`pip install ~/.cache/ppinfer-bench/wheels/llama_cpp_python-*.whl` (installing `.[bench]` would
rebuild any newer release). The synthetic models are built on first use into
`~/.cache/ppinfer/bench-models/` (`python -m ppinfer.bench.synthetic` builds them ahead).
`--suite quant` runs the llama.cpp comparisons, `--suite moe` the Qwen3-MoE-shaped model
(2.9 GB) against llama.cpp, `--scenario quant-7b` the 7B-shaped model (3.8 GB, 4 ranks).
llama.cpp's weights are kept out of AMX buffers, whose tile instructions
fault on some VMs; `--llamacpp-amx` lets llama.cpp use them. llama.cpp's threads spin while
they wait, so its figures only mean something on an otherwise idle machine.
"""


def markdown_report(
    machine: Mapping[str, str], ratios: Sequence[RatioResult], rounds: Sequence[Sequence[Outcome]]
) -> str:
    """The whole benchmark page: machine, ratios against their targets, every round's runs,
    method."""
    machine_rows = [[k, f"`{v}`" if k == "command" else v] for k, v in machine.items()]
    parts = [
        "# ppinfer benchmarks",
        f"Generated by `{machine['command']}` on {machine['date']}.",
        LLAMACPP_INSTALL,
        "## Machine",
        markdown_table(("", ""), machine_rows),
        "## Targets",
        markdown_table(RATIO_HEADERS, [ratio_row(r) for r in ratios]),
    ]
    for i, runs in enumerate(rounds, 1):
        parts.append("## Runs" if len(rounds) == 1 else f"## Runs, round {i} of {len(rounds)}")
        parts.append(markdown_table(RUN_HEADERS, [run_row(o.run, o.metrics, o.error, o.skipped) for o in runs]))
    parts += ["## How the numbers are measured", METHOD_NOTES]
    return "\n\n".join(p.rstrip("\n") for p in parts) + "\n"
