"""Which kernel multiplies stored GGUF blocks on a device: the one place that decides.

- CPU: ppinfer's own block kernels (`ppinfer.kernels.cpu`), AVX-512 VNNI, AVX-VNNI or AVX2 where
  the CPU has it and portable C++ elsewhere, for every type they implement; with AVX2 or better the
  types that have a packed layout are packed at load (16 rows interleaved, what the decode
  products stream fastest). The stage table names the instruction set and the packed types.
- CUDA: torch's int4 kernel for the types whose blocks are exactly int4 groups of 32
  (`ppinfer.kernels.int4`); other types are dequantized to the runtime dtype.

A backend that cannot run here (no compiler for the CPU kernels, say) still answers: it
supports no type and its description says why, so the stage table shows the fallback.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from ppinfer.kernels import build, cpu, experts, int4
from ppinfer.kernels.capabilities import cpu_capabilities

ISA_ENV = "PPINFER_KERNEL_ISA"
"""Forces the CPU block kernels' instruction set for a whole run (a benchmark of the AVX2 path on
an AVX-512 CPU, say): one of KERNEL_ISAS; unset or "auto" takes the best the CPU runs.
`PPINFER_CPU_BASELINE=1` forces "scalar" whatever it says."""
KERNEL_ISAS = ("auto", "avx512vnni", "avxvnni", "avx2", "scalar")

WEIGHT_MODES = ("quantized", "dequantized")
"""How a model's weights are held (`runtime.weights`): in their stored blocks, multiplied by
the block kernels where a type has one, or dequantized to the runtime dtype at load."""

BLOCK_LINEARS = (cpu.BlockLinear, int4.Int4Linear, experts.BlockExperts)
"""The modules that hold stored blocks (their `nbytes` are resident weight bytes)."""


@dataclass(frozen=True)
class BlockBackend:
    """Builds linear layers over stored blocks for one device."""

    device: torch.device
    types: frozenset[GGMLQuantizationType]
    name: str  # for the stage table
    packed: frozenset[GGMLQuantizationType] = frozenset()  # held 16 rows interleaved (CPU)

    def supports(self, qtype: GGMLQuantizationType) -> bool:
        return qtype in self.types

    def linear(
        self, raw: np.ndarray, qtype: GGMLQuantizationType, in_features: int, bias: torch.Tensor | None
    ) -> nn.Module:
        """A linear over `raw` ([out, bytes_per_row] uint8 blocks, which the module copies: the
        caller may release the file pages it views)."""
        if self.device.type == "cuda":
            return int4.Int4Linear(raw, qtype, in_features, self.device, bias)
        return cpu.BlockLinear(_blocks_view(raw), qtype, in_features, bias, packed=qtype in self.packed)

    @property
    def expert_types(self) -> frozenset[GGMLQuantizationType]:
        """The types whose 3-D expert tensors stay in their blocks (the CPU kernels' types; on
        CUDA experts are dequantized)."""
        return self.types if self.device.type == "cpu" else frozenset()

    def supports_experts(self, qtype: GGMLQuantizationType) -> bool:
        return qtype in self.expert_types

    def experts(self, raw: np.ndarray, qtype: GGMLQuantizationType, in_features: int) -> nn.Module:
        """Per-expert products over `raw` ([n_expert, out, bytes_per_row] uint8, which the module
        copies)."""
        return experts.BlockExperts(_blocks_view(raw), qtype, in_features, packed=qtype in self.packed)

    def describe(self) -> str:
        return self.name


def _blocks_view(raw: np.ndarray) -> torch.Tensor:
    """raw's bytes as a uint8 tensor viewing the caller's array, read-only file pages included
    (the block modules only read them into new memory)."""
    with warnings.catch_warnings():  # the view is never written
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(np.ascontiguousarray(raw, dtype=np.uint8))


def block_backend(device: torch.device) -> BlockBackend:
    """The block kernels for `device`."""
    if device.type == "cuda":
        if not int4.int4_available(device):
            return BlockBackend(device, frozenset(), f"no int4 kernel (torch {torch.__version__} on this GPU)")
        return BlockBackend(device, frozenset(int4.supported_int4_types()), "torch int4 (tinygemm)")
    problem = build.unavailable_reason()
    if problem is not None:
        return BlockBackend(device, frozenset(), f"no block kernels ({problem})")
    # Process-wide: the portable dots when the baseline is forced, else the forced or best one.
    build.set_isa(kernel_isa())
    isa = build.isa()
    packed = cpu.packed_types(runnable=True)
    name = f"block kernels ({isa})"
    if packed:
        name = f"block kernels ({isa}; {'/'.join(sorted(t.name for t in packed))} rows packed by 16)"
    return BlockBackend(device, frozenset(cpu.supported_types()), name, packed)


def kernel_isa() -> str:
    """The instruction set the CPU block kernels take in this process: "scalar" under
    PPINFER_CPU_BASELINE, else PPINFER_KERNEL_ISA's (default "auto"); a name outside KERNEL_ISAS,
    or one this CPU cannot run, is a ValueError naming it."""
    if cpu_capabilities().baseline:
        return "scalar"
    name = os.environ.get(ISA_ENV, "") or "auto"
    if name not in KERNEL_ISAS:
        raise ValueError(f"{ISA_ENV}={name!r}: expected one of {', '.join(KERNEL_ISAS)}")
    why = build.ops().isa_unavailable(name)
    if why:
        raise ValueError(f"{ISA_ENV}={name!r}: this CPU cannot run it ({why})")
    return name
