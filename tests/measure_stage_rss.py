"""Measures how much resident memory building one stage allocates, in a fresh process.

Run as a script by test_weight_memory.py:
`python measure_stage_rss.py FILE START END TOTAL [quantized|dequantized]` (default dequantized).
Prints one JSON object: peak RSS (bytes) after the imports, peak RSS after the build, and
their difference. A fresh process is needed because peak RSS only grows.
"""

from __future__ import annotations

import json
import resource
import sys
from pathlib import Path

import torch

from ppinfer.model import build_stage
from ppinfer.plan import StagePlan


def peak_rss_bytes() -> int:
    """This process's peak resident set size (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def main(argv: list[str]) -> None:
    path, start, end, total = Path(argv[0]), int(argv[1]), int(argv[2]), int(argv[3])
    weights = argv[4] if len(argv) > 4 else "dequantized"
    baseline = peak_rss_bytes()
    stage = build_stage(path, StagePlan(start, end, total), dtype=torch.float32, device="cpu", weights=weights)
    after = peak_rss_bytes()
    assert stage is not None
    json.dump({"baseline": baseline, "after": after, "allocated": after - baseline}, sys.stdout)


if __name__ == "__main__":
    main(sys.argv[1:])
