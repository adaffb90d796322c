"""Running a plan: one subprocess per point, strictly one after another, metrics read back.

Each pipeline point is `python -m torch.distributed.run --standalone --nproc_per_node=S
launch/infer.py key=value ...` (one stage too, so every point pays the same launcher costs);
the transformers peer runs in its own process (`python -m ppinfer.bench.peer`) so that its
memory never shows up in a pipeline rank, and each llama.cpp point in a fresh one
(`python -I ppinfer/bench/llamacpp.py`). Points run sequentially because they would otherwise
compete for the same cores and spoil each other's timings. A llama.cpp point is skipped, not
failed, when llama-cpp-python is not installed.
"""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

from ppinfer.bench import llamacpp
from ppinfer.bench.planner import Plan
from ppinfer.bench.prompts import long_prompt, short_prompts
from ppinfer.bench.runs import DEFAULT_MODEL, LlamaCppRun, PeerRun, PipelineRun, Run, Sizes
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("ppinfer.bench")

METRICS_FILE = "metrics.json"
_PLAIN_VALUE = re.compile(r"[\w./-]+")


@dataclass(frozen=True)
class RunResult:
    """One point's outcome: its metrics, or why there are none."""

    run: Run
    metrics: dict[str, Any] | None
    error: str | None
    log: Path
    command: tuple[str, ...]
    skipped: bool = False
    """Not run because an optional peer is not installed (not a failure)."""


@dataclass(frozen=True)
class SweepSettings:
    """Where and how the points run."""

    models: Mapping[str, Path]
    """Every planned run's model name -> its GGUF file (`default` is `--model`)."""
    workdir: Path
    sizes: Sizes
    timeout_s: float
    llamacpp_drop_buffers: tuple[str, ...] = ("AMX",)
    """CPU buffer types llama.cpp must not put weights in (see `llamacpp.drop_buffer_types`)."""

    @property
    def model(self) -> Path:
        """The default model."""
        return self.models[DEFAULT_MODEL]


def repo_root() -> Path:
    """The checkout holding `launch/infer.py` and `conf/` (the package's parent directory)."""
    return Path(__file__).resolve().parents[2]


def infer_script() -> Path:
    script = repo_root() / "launch" / "infer.py"
    if not script.is_file():
        raise FileNotFoundError(
            f"{script} not found: the benchmark runs the torchrun entry point from a source checkout"
        )
    return script


def hydra_value(value: str) -> str:
    """`value` as a Hydra override value: quoted unless it is a plain path or word."""
    if _PLAIN_VALUE.fullmatch(value):
        return value
    escaped = value.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def pipeline_command(run: PipelineRun, model: Path, prompts_file: Path, out_dir: Path) -> list[str]:
    """The torchrun command line of one pipeline point (greedy, EOS ignored, CPU)."""
    overrides = [
        f"model.path={hydra_value(str(model))}",
        f"prompts_file={hydra_value(str(prompts_file))}",
        f"output.dir={hydra_value(str(out_dir))}",
        f"pipeline.microbatches={run.lanes}",
        f"pipeline.lane_size={run.lane_size}",
        f"runtime.threads={run.threads}",
        "runtime.device=cpu",
        f"generation.max_new_tokens={run.max_new_tokens}",
        "generation.temperature=0.0",
        "generation.ignore_eos=true",
        "chat=false",
    ]
    if run.prefill_chunk is not None:
        overrides.append(f"pipeline.prefill_chunk={run.prefill_chunk}")
    if run.layers is not None:
        overrides.append(f"pipeline.layers={run.layers}")
    if run.weights is not None:
        overrides.append(f"runtime.weights={run.weights}")
    return [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={run.stages}",
        str(infer_script()), *overrides,
    ]


def peer_command(spec_file: Path) -> list[str]:
    return [sys.executable, "-m", "ppinfer.bench.peer", str(spec_file)]


def llamacpp_command(spec_file: Path) -> list[str]:
    """The llama.cpp point as a plain script in isolated mode: no ppinfer or torch import, so
    its memory baseline is a bare interpreter."""
    return [sys.executable, "-I", str(Path(llamacpp.__file__).resolve()), str(spec_file)]


def llamacpp_installed() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


class PromptBook:
    """The prompt texts of every point, and their token ids for the llama.cpp peer; the long
    prompt is built once, with the default model's tokenizer."""

    def __init__(self, models: Mapping[str, Path], sizes: Sizes) -> None:
        self.models, self.sizes = models, sizes
        self._tokenizers: dict[str, Tokenizer] = {}

    def tokenizer(self, model: str) -> Tokenizer:
        if model not in self._tokenizers:
            self._tokenizers[model] = load_tokenizer(self.models[model])
        return self._tokenizers[model]

    @cached_property
    def _long(self) -> str:
        return long_prompt(self.tokenizer(DEFAULT_MODEL), self.sizes.long_prompt_tokens)

    def texts(self, run: Run) -> list[str]:
        if run.prompts == "long":
            return [self._long] * run.sequences
        return short_prompts(run.sequences)

    def ids(self, run: LlamaCppRun) -> list[list[int]]:
        """The token ids the runtime's own `encode` gives `run`'s prompts on `run`'s model."""
        tokenizer = self.tokenizer(run.model)
        return [tokenizer.encode(text) for text in self.texts(run)]

    def write(self, run: Run, path: Path) -> Path:
        """Write `run`'s prompts one per line (the runtime's `prompts_file` format)."""
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(f"{t}\n" for t in self.texts(run)), encoding="utf-8")
        return path


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    """End the point's whole process group (torchrun and its workers), politely first."""
    for sig, grace in ((signal.SIGTERM, 10.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(timeout=grace)
            return
        except subprocess.TimeoutExpired:
            continue


def run_logged(command: Sequence[str], log_path: Path, timeout_s: float) -> int:
    """Run `command` from the repository root with its output in `log_path`; its exit code.

    The child gets its own process group so that a timeout or Ctrl-C ends every rank it started,
    not only the launcher.
    """
    env = dict(os.environ, HF_HUB_OFFLINE="1")  # the peer reads a local file; never wait on the network
    with log_path.open("wb") as sink:
        proc = subprocess.Popen(
            list(command), cwd=repo_root(), stdout=sink, stderr=subprocess.STDOUT, env=env, start_new_session=True,
        )
        try:
            return proc.wait(timeout=timeout_s)
        except BaseException:
            _stop_group(proc)
            raise


def _tail(path: Path, lines: int = 15) -> str:
    if not path.is_file():
        return "(no log)"
    kept = path.read_text(encoding="utf-8", errors="replace").strip().splitlines()[-lines:]
    return "\n    ".join(kept) if kept else "(empty log)"


def _read_metrics(path: Path, code: int, log_path: Path) -> tuple[dict[str, Any] | None, str | None]:
    if code == 0 and path.is_file():
        metrics = json.loads(path.read_text(encoding="utf-8"))
        if "model" in metrics:
            metrics["model_file_bytes"] = Path(metrics["model"]).stat().st_size
        return metrics, None
    why = f"exit code {code}" if code != 0 else f"no {path.name} written"
    return None, f"{why}; see {log_path}:\n    {_tail(log_path)}"


def _execute(command: list[str], log_path: Path, timeout_s: float) -> int | str:
    """The exit code, or the reason there is none (a timeout)."""
    try:
        return run_logged(command, log_path, timeout_s)
    except subprocess.TimeoutExpired:
        return f"timed out after {timeout_s:.0f} s; see {log_path}"


def run_pipeline(run: PipelineRun, settings: SweepSettings, book: PromptBook) -> RunResult:
    out_dir = settings.workdir / run.slug
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / METRICS_FILE).unlink(missing_ok=True)
    prompts = book.write(run, out_dir / "prompts.txt")
    command = pipeline_command(run, settings.models[run.model], prompts, out_dir)
    log_path = out_dir / "run.log"
    outcome = _execute(command, log_path, settings.timeout_s)
    if isinstance(outcome, str):
        return RunResult(run, None, outcome, log_path, tuple(command))
    metrics, error = _read_metrics(out_dir / METRICS_FILE, outcome, log_path)
    return RunResult(run, metrics, error, log_path, tuple(command))


def run_peers(runs: Sequence[PeerRun], settings: SweepSettings, book: PromptBook) -> list[RunResult]:
    """All peer points of one thread count in one process: the model loads once (it is slow to
    convert from GGUF), then each batch is timed in turn."""
    if len({r.threads for r in runs}) != 1:
        raise ValueError(f"one peer process runs one thread count, got {sorted({r.threads for r in runs})}")
    base = settings.workdir / f"hf-t{runs[0].threads}"
    base.mkdir(parents=True, exist_ok=True)
    jobs = []
    for run in runs:
        out = base / run.slug / METRICS_FILE
        out.unlink(missing_ok=True)
        prompts = book.write(run, base / run.slug / "prompts.txt")
        jobs.append({"prompts_file": str(prompts), "max_new_tokens": run.max_new_tokens, "out": str(out)})
    spec_file = base / "spec.json"
    spec = {"model": str(settings.model), "threads": runs[0].threads, "jobs": jobs}
    spec_file.write_text(json.dumps(spec, indent=2), encoding="utf-8")
    command = peer_command(spec_file)
    log_path = base / "run.log"
    outcome = _execute(command, log_path, settings.timeout_s)
    results = []
    for run, job in zip(runs, jobs):
        if isinstance(outcome, str):
            results.append(RunResult(run, None, outcome, log_path, tuple(command)))
            continue
        # A peer that failed midway still leaves the batches it finished.
        metrics, error = _read_metrics(Path(job["out"]), 0, log_path)
        if metrics is None and outcome != 0:
            error = f"exit code {outcome}; see {log_path}:\n    {_tail(log_path)}"
        results.append(RunResult(run, metrics, error, log_path, tuple(command)))
    return results


def run_llamacpp(run: LlamaCppRun, settings: SweepSettings, book: PromptBook) -> RunResult:
    """One llama.cpp point in a fresh process, or a skipped result when llama_cpp is missing."""
    out_dir = settings.workdir / run.slug
    log_path = out_dir / "run.log"
    command = llamacpp_command(out_dir / "spec.json")
    if not llamacpp_installed():
        why = f"llama-cpp-python not installed: {llamacpp.INSTALL_HINT}"
        return RunResult(run, None, why, log_path, tuple(command), skipped=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics_path = out_dir / METRICS_FILE
    metrics_path.unlink(missing_ok=True)
    spec = {"model": str(settings.models[run.model]), "threads": run.threads, "new_tokens": run.max_new_tokens,
            "prompts": book.ids(run), "out": str(metrics_path),
            "drop_buffer_types": list(settings.llamacpp_drop_buffers)}
    (out_dir / "spec.json").write_text(json.dumps(spec), encoding="utf-8")
    outcome = _execute(command, log_path, settings.timeout_s)
    if isinstance(outcome, str):
        return RunResult(run, None, outcome, log_path, tuple(command))
    metrics, error = _read_metrics(metrics_path, outcome, log_path)
    return RunResult(run, metrics, error, log_path, tuple(command))


def sweep(plan: Plan, settings: SweepSettings, book: PromptBook) -> list[RunResult]:
    """Run every point of `plan` in order and return the results in the plan's order."""
    pipeline = [r for r in plan.runs if isinstance(r, PipelineRun)]
    peers = [r for r in plan.runs if isinstance(r, PeerRun)]
    llamacpp_runs = [r for r in plan.runs if isinstance(r, LlamaCppRun)]
    by_run: dict[Run, RunResult] = {}
    total = len(plan.runs)
    for run in pipeline:
        log.info("[%d/%d] %s", len(by_run) + 1, total, run.label)
        started = time.perf_counter()
        by_run[run] = run_pipeline(run, settings, book)
        _log_outcome(by_run[run], time.perf_counter() - started)
    for threads in dict.fromkeys(r.threads for r in peers):
        group = [r for r in peers if r.threads == threads]
        log.info("[%d-%d/%d] %s", len(by_run) + 1, len(by_run) + len(group), total,
                 ", ".join(r.label for r in group))
        started = time.perf_counter()
        for result in run_peers(group, settings, book):
            by_run[result.run] = result
            _log_outcome(result, time.perf_counter() - started)
    for run in llamacpp_runs:
        log.info("[%d/%d] %s", len(by_run) + 1, total, run.label)
        started = time.perf_counter()
        by_run[run] = run_llamacpp(run, settings, book)
        _log_outcome(by_run[run], time.perf_counter() - started)
    return [by_run[r] for r in plan.runs]


def _log_outcome(result: RunResult, seconds: float) -> None:
    if result.skipped:
        log.warning("    %s skipped: %s", result.run.label, result.error)
        return
    if result.metrics is None:
        log.error("    %s failed: %s", result.run.label, result.error)
        return
    m = result.metrics
    log.info("    %.0f s: prefill %.1f tok/s, decode %.1f tok/s, TTFT %.3f s",
             seconds, m["prefill_tokens_per_s"], m["decode_tokens_per_s"], m["time_to_first_token_s"])
