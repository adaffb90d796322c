"""What this CPU can run, probed once with torch's own queries.

No kernel choice anywhere else assumes a CPU feature: float linears are prepacked for oneDNN
only where oneDNN supports the dtype on this CPU (its bfloat16 path needs AVX512-BW/VL/DQ or
AVX-NE-CONVERT; on an AVX2-only CPU it raises), and the block kernels run their AVX2 code only
where the CPU has it. Setting `PPINFER_CPU_BASELINE=1` makes every such choice take the path
that needs no optional feature, so that path is testable on any machine.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass

import torch

BASELINE_ENV = "PPINFER_CPU_BASELINE"


@dataclass(frozen=True)
class CpuCapabilities:
    vector_isa: str  # torch's dispatch level: "DEFAULT", "AVX2", "AVX512", ...
    onednn_float32: bool  # float32 weights can be prepacked for oneDNN
    onednn_bfloat16: bool  # bfloat16 weights can be prepacked for oneDNN
    baseline: bool  # forced to the feature-less path by PPINFER_CPU_BASELINE

    def prepacks(self, dtype: torch.dtype) -> bool:
        """Whether linear weights of `dtype` are prepacked for oneDNN on this CPU."""
        if dtype == torch.float32:
            return self.onednn_float32
        if dtype == torch.bfloat16:
            return self.onednn_bfloat16
        return False

    def describe(self, dtype: torch.dtype) -> str:
        """One phrase for the stage table: how float linears of `dtype` run here."""
        path = "oneDNN prepacked" if self.prepacks(dtype) else "plain F.linear"
        forced = ", forced baseline" if self.baseline else ""
        return f"{path} ({self.vector_isa}{forced})"


def baseline_forced() -> bool:
    return os.environ.get(BASELINE_ENV, "") not in ("", "0")


@functools.cache
def _probe(baseline: bool) -> CpuCapabilities:
    onednn = torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_linear_pointwise")
    bf16 = onednn and bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    isa = torch.backends.cpu.get_cpu_capability()
    if baseline:
        return CpuCapabilities(isa, onednn_float32=onednn, onednn_bfloat16=False, baseline=True)
    return CpuCapabilities(isa, onednn_float32=onednn, onednn_bfloat16=bf16, baseline=False)


def cpu_capabilities() -> CpuCapabilities:
    """This CPU's capabilities (the baseline set when PPINFER_CPU_BASELINE is set)."""
    return _probe(baseline_forced())
