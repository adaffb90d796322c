"""metrics.json: throughput, latency and, per stage, where the time went."""

from __future__ import annotations

import resource
from dataclasses import dataclass
from typing import Any

import torch

STAGE_FIELDS = (
    "compute_s", "comm_s", "idle_s", "wall_s", "peak_rss_bytes", "peak_cuda_bytes",
    "baseline_rss_bytes", "decode_idle_fraction",
)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss_bytes() -> int:
    with open("/proc/self/statm", encoding="ascii") as fh:
        return int(fh.read().split()[1]) * resource.getpagesize()


@dataclass(frozen=True)
class StageMetrics:
    """One rank's figures; travels to the writing rank as a float64 tensor."""

    compute_s: float
    comm_s: float
    idle_s: float
    wall_s: float
    peak_rss_bytes: float
    peak_cuda_bytes: float
    baseline_rss_bytes: float
    decode_idle_fraction: float  # idle share of the decode phase after the fill

    def to_tensor(self, device: torch.device) -> torch.Tensor:
        return torch.tensor([getattr(self, f) for f in STAGE_FIELDS], dtype=torch.float64, device=device)

    @classmethod
    def from_tensor(cls, t: torch.Tensor) -> StageMetrics:
        return cls(*t.tolist())

    def as_dict(self, stage: int, layers: tuple[int, int]) -> dict[str, Any]:
        wall = self.wall_s or 1e-12
        return {
            "stage": stage,
            "layers": list(layers),
            "compute_s": self.compute_s,
            "comm_s": self.comm_s,
            "idle_s": self.idle_s,
            "bubble_fraction": self.idle_s / wall,
            "decode_idle_fraction": self.decode_idle_fraction,
            "peak_rss_bytes": int(self.peak_rss_bytes),
            "peak_rss_above_baseline_bytes": int(self.peak_rss_bytes - self.baseline_rss_bytes),
            "peak_cuda_bytes": int(self.peak_cuda_bytes),
        }
