"""What a ratio compares: a `Metric` read from one run's metrics, a `Term` (one metric of one
run, optionally scaled), and the `Ratio` of two terms against its target."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from ppinfer.bench.runs import Metrics, Run


def _token_latency(m: Metrics) -> float:
    rate = float(m["decode_tokens_per_s"])
    return 1.0 / rate if rate > 0 else float("inf")


def _decode_idle(m: Metrics) -> float:
    return max(float(s["decode_idle_fraction"]) for s in m["per_stage"])


def _bubble(m: Metrics) -> float:
    return max(float(s["bubble_fraction"]) for s in m["per_stage"])


def _largest_rank_above_baseline_mb(m: Metrics) -> float:
    return max(float(s["peak_rss_above_baseline_bytes"]) for s in m["per_stage"]) / 2**20


def _total_above_baseline_mb(m: Metrics) -> float:
    return sum(float(s["peak_rss_above_baseline_bytes"]) for s in m["per_stage"]) / 2**20


def _total_above_baseline_per_file_byte(m: Metrics) -> float:
    return _total_above_baseline_mb(m) * 2**20 / float(m["model_file_bytes"])


@dataclass(frozen=True)
class Metric:
    """A number read from one run's metrics (raises KeyError when the file lacks it)."""

    name: str
    unit: str
    read: Callable[[Metrics], float]


DECODE = Metric("decode", "tok/s", lambda m: float(m["decode_tokens_per_s"]))
PREFILL = Metric("prefill", "tok/s", lambda m: float(m["prefill_tokens_per_s"]))
TOKEN_LATENCY = Metric("per-token latency", "s", _token_latency)
DECODE_IDLE = Metric("max stage idle fraction in decode after the fill", "", _decode_idle)
BUBBLE = Metric("max stage idle fraction over the whole run (fill and drain included)", "", _bubble)
PEAK_ABOVE_BASELINE = Metric("largest rank's peak RSS above its idle baseline", "MB", _largest_rank_above_baseline_mb)
TOTAL_ABOVE_BASELINE = Metric("sum over ranks of peak RSS above the idle baseline", "MB", _total_above_baseline_mb)
TOTAL_PER_FILE_BYTE = Metric("sum over ranks of peak RSS above the idle baseline / model file size", "",
                             _total_above_baseline_per_file_byte)


@dataclass(frozen=True)
class Term:
    """`scale` times `metric` of `run`."""

    run: Run
    metric: Metric
    scale: float = 1.0


@dataclass(frozen=True, kw_only=True)
class Ratio:
    """numerator / denominator (or the numerator alone) compared with its target, or
    shown for information when `target` is None."""

    key: str
    title: str
    numerator: Term
    denominator: Term | None
    target: float | None
    higher_is_better: bool
    fallback: Term | None = None
    """Used, and flagged, when the numerator's metric is missing from the run's metrics."""

    @property
    def runs(self) -> tuple[Run, ...]:
        terms = (self.denominator, self.numerator, self.fallback)  # baseline first in tables
        return tuple(dict.fromkeys(t.run for t in terms if t is not None))
