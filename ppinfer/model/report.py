"""How a stage holds its weights: shown in the stage table at start."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass
class WeightsReport:
    """How a stage holds its linear weights, for the stage table."""

    mode: str  # runtime.weights: quantized | dequantized
    float_path: str  # how float linears run (oneDNN prepacked or plain), or the device
    block_kernel: str | None  # the kernel that multiplies stored blocks; None in dequantized mode
    kept: Counter[str] = field(default_factory=Counter)  # type name -> weights kept in their blocks
    dequantized: Counter[str] = field(default_factory=Counter)  # quantized type -> weights with no kernel

    def describe(self) -> str:
        """One line: which weights stay in their blocks and which were dequantized."""
        kept = ", ".join(f"{n} {t}" for t, n in sorted(self.kept.items()))
        fell = ", ".join(f"{n} {t}" for t, n in sorted(self.dequantized.items()))
        if self.block_kernel is None:
            return f"weights dequantized; linears: {self.float_path}"
        text = f"quantized: {kept or 'none'} via {self.block_kernel}"
        if fell:
            text += f"; no kernel, dequantized: {fell}"
        return text + f"; float linears: {self.float_path}"
