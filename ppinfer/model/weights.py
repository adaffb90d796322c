"""Reading one file's tensors into modules: float tensors, linear layers over stored blocks or
float weights, fused projections and expert weights, norms. Records which tensors were
consumed, so the loader can refuse a file with tensors it would silently ignore."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from gguf import GGMLQuantizationType
from torch import nn

from ppinfer.errors import ModelFileError
from ppinfer.families.spec import FamilySpec, Norm
from ppinfer.gguf.reader import GGUFFile
from ppinfer.kernels import fused as fused_ops
from ppinfer.kernels.blocks import nonfinite_scale_block
from ppinfer.kernels.cpu import InvariantLinear
from ppinfer.kernels.select import BlockBackend
from ppinfer.model.layers import ConcatLinear, LayerNorm, Linear, PackedLinear, RMSNorm
from ppinfer.model.moe import ConcatExperts, FloatExperts
from ppinfer.model.report import WeightsReport

PACK_BLOCK_ELEMENTS = 1 << 20  # values (4 MB of float32) per separately packed row block
FLOAT_STORAGE = (GGMLQuantizationType.F32, GGMLQuantizationType.F16, GGMLQuantizationType.BF16)


@dataclass
class _Stored:
    """A weight's stored blocks (`raw`: [rows, bytes_per_row], or [n_expert, rows, bytes_per_row],
    uint8 view of the file)."""

    name: str
    qtype: GGMLQuantizationType
    raw: np.ndarray


# A row transform applied to a weight before fusing (pair_order for NEOX q/k), or None.
RowTransform = Callable[[np.ndarray], np.ndarray] | None


class Weights:
    """Reads tensors of one file into torch, recording which names were consumed; builds
    linear layers: over the stored blocks where a kernel serves their type (`blocks`), else
    over float weights: on a quantized float32 CPU stage as `InvariantLinear` (batch-invariant
    like the block products), elsewhere prepacked for oneDNN when `packed`."""

    def __init__(
        self, gf: GGUFFile, dtype: torch.dtype, device: torch.device, packed: bool,
        blocks: BlockBackend | None, report: WeightsReport,
    ) -> None:
        self.gf, self.dtype, self.device, self.packed = gf, dtype, device, packed
        self.blocks, self.report = blocks, report
        self.fused = fused_ops.available(device, dtype)  # norms and decode attention in one op each
        self.invariant = blocks is not None and self.fused  # float weights as InvariantLinear
        self.used: set[str] = set()

    def has(self, name: str) -> bool:
        return name in self.gf.tensors

    def array(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        self.used.add(name)
        return self.gf.load(name, shape)

    def tensor(self, arr: np.ndarray) -> torch.Tensor:
        if not arr.flags.writeable:
            arr = arr.copy()
        return torch.from_numpy(arr).to(device=self.device, dtype=self.dtype)

    def get(self, name: str, shape: tuple[int, ...]) -> torch.Tensor:
        return self.tensor(self.array(name, shape))

    def optional(self, name: str, shape: tuple[int, ...]) -> torch.Tensor | None:
        return self.get(name, shape) if self.has(name) else None

    def stored(self, name: str, shape: tuple[int, ...]) -> _Stored | None:
        """The stored blocks of weight `name` ([out, in], or [n_expert, out, in] for experts)
        when a kernel multiplies its type in place; None for float types, in dequantized mode,
        or when no kernel serves the type."""
        info = self.gf.check_shape(name, shape)
        if self.blocks is None or info.qtype in FLOAT_STORAGE:
            return None
        kernel = self.blocks.supports(info.qtype) if len(shape) == 2 else self.blocks.supports_experts(info.qtype)
        if not kernel:
            self.report.dequantized[info.qtype.name] += 1
            return None
        raw = self.gf.raw(name)
        bad = nonfinite_scale_block(raw, info.qtype)
        if bad is not None:
            raise ModelFileError(f"{self.gf.path}: tensor {name!r}: block {bad} has a non-finite scale")
        self.used.add(name)
        self.report.kept[info.qtype.name] += 1
        return _Stored(name, info.qtype, raw)

    def block_linear(
        self, parts: list[_Stored], raws: list[np.ndarray], bias: np.ndarray | torch.Tensor | None
    ) -> nn.Module:
        """One block linear over the rows of `raws` (the parts' blocks, transformed), one type."""
        assert self.blocks is not None
        raw = raws[0] if len(raws) == 1 else np.concatenate(raws)  # [rows, bytes_per_row]
        in_features = self.gf.info(parts[0].name).shape[1]
        b = self.tensor(bias) if isinstance(bias, np.ndarray) else bias
        module = self.blocks.linear(raw, parts[0].qtype, in_features, b)
        for part in parts:
            self.gf.release(part.name)
        return module

    def linear(self, name: str, shape: tuple[int, int], bias: torch.Tensor | None = None) -> nn.Module:
        """The weight `name` [out, in] as a linear layer (a float one on a quantized stage as an
        `InvariantLinear`, so the stage stays batch-invariant)."""
        stored = self.stored(name, shape)
        if stored is not None:
            return self.block_linear([stored], [stored.raw], bias)
        if self.invariant:
            layer = InvariantLinear(self.get(name, shape), bias)
            self.gf.release(name)
            return layer
        if not self.packed:
            return Linear(self.get(name, shape), bias)
        self.used.add(name)
        blocks = (self.tensor(self.gf.load_rows(name, a, b)) for a, b in self.gf.row_blocks(name, PACK_BLOCK_ELEMENTS))
        layer = PackedLinear(blocks, bias)
        self.gf.release(name)
        return layer

    def fused_linear(
        self, parts: list[tuple[str, tuple[int, int], RowTransform]], biases: list[np.ndarray | None] | None = None
    ) -> nn.Module:
        """One projection over several weights whose output rows are stacked in order (q, k, v;
        gate, up). Parts stored in one type with a kernel become one block linear; parts of
        mixed types each keep their own layer; without kernels the float rows are fused."""
        biases = biases or [None] * len(parts)
        stored = [self.stored(name, shape) for name, shape, _ in parts]
        part_bias = [
            b if b is not None or all(x is None for x in biases) else np.zeros(shape[0], np.float32)
            for b, (_, shape, _) in zip(biases, parts)
        ]
        bias = None if all(b is None for b in part_bias) else np.concatenate(part_bias)
        transformed = [
            (t(s.raw) if t is not None else s.raw) if s is not None else None
            for s, (_, _, t) in zip(stored, parts)
        ]
        if all(s is not None for s in stored) and len({s.qtype for s in stored}) == 1:
            return self.block_linear(stored, transformed, bias)
        if any(s is not None for s in stored):
            return ConcatLinear([
                self.block_linear([s], [raw], b) if s is not None else self._float_part(name, shape, t, b)
                for s, raw, b, (name, shape, t) in zip(stored, transformed, part_bias, parts)
            ])
        weight = np.concatenate([t(self.array(n, s)) if t is not None else self.array(n, s) for n, s, t in parts])
        return self.linear_from(weight, bias)

    def _float_part(
        self, name: str, shape: tuple[int, int], transform: RowTransform, bias: np.ndarray | None
    ) -> nn.Module:
        weight = self.array(name, shape)
        return self.linear_from(transform(weight) if transform is not None else weight, bias)

    def linear_from(self, weight: np.ndarray, bias: np.ndarray | None = None) -> nn.Module:
        """A linear layer over a weight assembled at load time (fused qkv, gate/up; an
        `InvariantLinear` on a quantized stage)."""
        w = self.tensor(weight)
        b = self.tensor(bias) if bias is not None else None
        if self.invariant:
            return InvariantLinear(w, b)
        return PackedLinear([w], b) if self.packed else Linear(w, b)

    def experts(self, parts: list[tuple[str, tuple[int, int, int]]]) -> nn.Module:
        """Expert weights [n_expert, out, in] whose output rows are stacked in order (gate,
        up): one block module when every part has a kernel and one type, a module per part
        when the types differ, float tensors otherwise."""
        stored = [self.stored(name, shape) for name, shape in parts]
        if all(s is not None for s in stored) and len({s.qtype for s in stored}) == 1:
            return self._block_experts(stored)
        if any(s is not None for s in stored):
            return ConcatExperts([
                self._block_experts([s]) if s is not None else self._float_experts([part])
                for s, part in zip(stored, parts)
            ])
        return self._float_experts(parts)

    def _block_experts(self, parts: list[_Stored | None]) -> nn.Module:
        assert self.blocks is not None
        stored = [s for s in parts if s is not None]
        raw = stored[0].raw if len(stored) == 1 else np.concatenate([s.raw for s in stored], axis=1)
        in_features = self.gf.info(stored[0].name).shape[2]
        module = self.blocks.experts(raw, stored[0].qtype, in_features)  # [n_expert, out, bytes_per_row]
        for part in stored:
            self.gf.release(part.name)
        return module

    def _float_experts(self, parts: list[tuple[str, tuple[int, int, int]]]) -> nn.Module:
        arrays = [self.array(name, shape) for name, shape in parts]
        return FloatExperts(self.tensor(arrays[0] if len(arrays) == 1 else np.concatenate(arrays, axis=1)))

    def norm(self, spec: FamilySpec, prefix: str, size: int, eps: float) -> nn.Module:
        weight = self.get(f"{prefix}.weight", (size,))
        if spec.norm is Norm.LAYER:
            return LayerNorm(weight, self.get(f"{prefix}.bias", (size,)), eps)
        return RMSNorm(weight, eps, self.fused)
