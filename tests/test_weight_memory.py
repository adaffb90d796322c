"""A stage allocates memory for its own slice only: building stage [0,10) of SmolLM2's 30
layers raises peak RSS by at most 40% of the whole model's fp32 parameter bytes. With
quantized weights (the default) the whole model costs a fraction of its float32 build.

Measured in fresh subprocesses (peak RSS only grows, so each build gets its own process):
peak RSS after building minus peak RSS after importing torch and ppinfer. The whole model's
parameter bytes are counted from the file: numel x 4 (fp32 at run time) over every tensor,
so a tied output head is counted once.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import gguf
import pytest

pytestmark = pytest.mark.slow

N_LAYER = 30
SCRIPT = Path(__file__).with_name("measure_stage_rss.py")


def _allocated(path: Path, start: int, end: int, weights: str = "dequantized") -> int:
    """Bytes of peak RSS that building stage [start, end) adds in a fresh process."""
    done = subprocess.run(
        [sys.executable, str(SCRIPT), str(path), str(start), str(end), str(N_LAYER), weights],
        capture_output=True, text=True, timeout=120, check=True,
    )
    return int(json.loads(done.stdout)["allocated"])


@pytest.fixture(scope="module")
def param_bytes(smollm2_path: Path) -> int:
    """fp32 bytes of every parameter in the file (tied output counted once)."""
    reader = gguf.GGUFReader(smollm2_path)
    assert "output.weight" not in {t.name for t in reader.tensors}  # SmolLM2 is tied
    return sum(int(t.n_elements) * 4 for t in reader.tensors)


def test_first_third_allocates_at_most_40_percent(
    smollm2_path: Path, param_bytes: int, record_property: pytest.RecordProperty
) -> None:
    stage = _allocated(smollm2_path, 0, 10)
    whole = _allocated(smollm2_path, 0, N_LAYER)
    record_property("stage_0_10_bytes", stage)
    record_property("whole_model_bytes", whole)
    record_property("param_bytes", param_bytes)
    assert stage <= 0.40 * param_bytes, (
        f"stage [0,10) allocated {stage / 2**20:.0f} MiB = {stage / param_bytes:.0%} of the "
        f"{param_bytes / 2**20:.0f} MiB of fp32 parameters (whole model: {whole / 2**20:.0f} MiB)"
    )
    # A third of the layers (plus the embedding) must cost well under the whole build.
    assert stage <= 0.5 * whole, f"stage [0,10) {stage / 2**20:.0f} MiB vs whole {whole / 2**20:.0f} MiB"


def test_quantized_weights_cost_a_fraction_of_float32(smollm2_path: Path) -> None:
    """SmolLM2's Q4_1 blocks are 5.8x smaller than its float32 weights; the quantized build's
    peak (blocks, plus the transient copy of one tensor and the file's metadata) must stay
    under a third of the float32 build's and under twice the file size."""
    quantized = _allocated(smollm2_path, 0, N_LAYER, "quantized")
    dequantized = _allocated(smollm2_path, 0, N_LAYER, "dequantized")
    file_bytes = smollm2_path.stat().st_size
    assert quantized <= dequantized / 3, f"{quantized / 2**20:.0f} MiB vs float32 {dequantized / 2**20:.0f} MiB"
    assert quantized <= 2 * file_bytes, f"{quantized / 2**20:.0f} MiB for a {file_bytes / 2**20:.0f} MiB file"
