"""Leaf modules built from loaded tensors: linear, norms, rotary embedding, row embedding.

Modules take their weights as constructor arguments (no random init followed by a copy), so
building a stage costs exactly one tensor per weight.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np
import torch
import torch.nn.functional as F
from gguf import GGMLQuantizationType
from torch import nn

from ppinfer.families.hparams import RopeParams
from ppinfer.gguf.reader import dequantize
from ppinfer.kernels import fused as fused_ops


def frozen(t: torch.Tensor) -> nn.Parameter:
    return nn.Parameter(t, requires_grad=False)


class Linear(nn.Module):
    """y = x W^T (+ b), W `[out, in]`."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias) if bias is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias)


class PackedLinear(nn.Module):
    """y = x W^T (+ b) on the CPU with W prepacked into oneDNN's blocked layout: the same
    math (float32 or bfloat16), 1.2-2x faster than the default GEMM for decode-sized batches.

    A large W arrives as several row blocks (each packed on its own) so that packing never
    holds two full copies of, say, a 113 MB output head; their outputs are concatenated.
    """

    BATCH_HINT = 16  # rows of x the packing is tuned for (a typical lane)

    def __init__(self, blocks: Iterable[torch.Tensor], bias: torch.Tensor | None = None) -> None:
        super().__init__()
        self.blocks: list[torch.Tensor] = []
        rows: list[int] = []
        for block in blocks:  # a generator: each float block is freed once packed
            rows.append(block.shape[0])
            self.in_features = block.shape[1]
            self.blocks.append(torch.ops.mkldnn._reorder_linear_weight(block, self.BATCH_HINT))
        self.out_features = sum(rows)
        self.biases: list[torch.Tensor | None] = list(bias.split(rows)) if bias is not None else [None] * len(rows)

    @property
    def nbytes(self) -> int:
        return sum(w.numel() * w.element_size() for w in self.blocks) + sum(
            b.numel() * b.element_size() for b in self.biases if b is not None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., out]."""
        outs = [
            torch.ops.mkldnn._linear_pointwise(x, w, b, "none", [], "")
            for w, b in zip(self.blocks, self.biases)
        ]
        return outs[0] if len(outs) == 1 else torch.cat(outs, dim=-1)


class ConcatLinear(nn.Module):
    """Linears over the same input whose outputs are concatenated: a fused projection (q, k, v)
    whose parts are stored in different types and so run through different kernels."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., in] -> [..., sum of the parts' out]."""
        return torch.cat([part(x) for part in self.parts], dim=-1)


class RMSNorm(nn.Module):
    """x * rsqrt(mean(x^2) + eps) * w, reduced in float32 (gemma's weights already hold the +1)."""

    def __init__(self, weight: torch.Tensor, eps: float, fused: bool = False) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.eps = eps
        self._fused = fused_ops.rms_norm_op() if fused else None  # float32 CPU stages only

    @property
    def fused(self) -> bool:
        """Whether the fused op (csrc/fused.cpp) computes it."""
        return self._fused is not None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self._fused is not None:
            return self._fused(x, self.weight, self.eps)
        if x.dtype == torch.float32:  # fused (the same arithmetic) where no cast is needed
            if self.weight.dim() == 1:
                return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
            return F.rms_norm(x, (x.shape[-1],), None, self.eps) * self.weight  # per-head weights
        xf = x.float()
        xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (xf * self.weight.float()).to(x.dtype)


class ProjectionQkNorm(nn.Module):
    """RMSNorm of the whole q projection and of the whole k projection, each with its own
    weight (olmoe), over the `[B, T, H + Hkv, D]` view of the q and k heads."""

    def __init__(self, q_norm: RMSNorm, k_norm: RMSNorm, n_head: int) -> None:
        super().__init__()
        self.q_norm, self.k_norm, self.n_head = q_norm, k_norm, n_head

    def forward(self, qk: torch.Tensor) -> torch.Tensor:
        """qk [B, T, H + Hkv, D] -> the same shape, q and k heads normalised."""
        b, t, _, d = qk.shape
        q = self.q_norm(qk[:, :, : self.n_head].reshape(b, t, -1))  # [B, T, H D]
        k = self.k_norm(qk[:, :, self.n_head :].reshape(b, t, -1))  # [B, T, Hkv D]
        return torch.cat((q, k), dim=-1).view(b, t, -1, d)


class LayerNorm(nn.Module):
    """Standard LayerNorm with weight and bias (phi2, starcoder2)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor, eps: float) -> None:
        super().__init__()
        self.weight = frozen(weight)
        self.bias = frozen(bias)
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), self.weight, self.bias, self.eps)


class RotaryEmbedding(nn.Module):
    """Rotation of consecutive pairs (x[2i], x[2i+1]) of the first `n_rot` dims of each head,
    as one complex multiplication (NEOX-mode families have their q/k rows reordered into
    pairs at load time, so one rotation serves every family). With YaRN the rotation also
    scales the pair by the attention factor `mscale`."""

    def __init__(self, params: RopeParams, factors: torch.Tensor | None, device: torch.device) -> None:
        super().__init__()
        self.n_rot = params.n_rot
        exponent = torch.arange(0, params.n_rot, 2, dtype=torch.int64, device=device).float() / params.n_rot
        inv_freq = 1.0 / (params.base**exponent)  # [n_rot/2] unscaled ("extrapolated")
        if params.factors is not None:
            if factors is None or factors.numel() != params.n_rot // 2:
                raise ValueError(f"{params.factors} must have {params.n_rot // 2} values")
            inv_freq = inv_freq / factors.float().to(device)
        scaled = inv_freq * params.freq_scale  # [n_rot/2] interpolated
        if params.yarn is not None:
            keep = yarn_ramp(params) * params.yarn.ext_factor  # [n_rot/2]: weight of the unscaled one
            scaled = scaled * (1 - keep.to(device)) + inv_freq * keep.to(device)
        self.register_buffer("inv_freq", scaled, persistent=False)
        self.mscale = params.mscale

    def rotations(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> (cos, sin) * mscale of each pair's angle, [B, T, n_rot/2, 2] float32."""
        angles = positions.float()[..., None] * self.inv_freq  # [B, T, n_rot/2]
        return torch.view_as_real(torch.polar(torch.full_like(angles, self.mscale), angles))


def yarn_ramp(params: RopeParams) -> torch.Tensor:
    """Per rotated pair i [n_rot/2]: 1 for the high frequencies (pairs that turn more than
    beta_fast times over the original context), which keep their unscaled frequency; 0 for the
    low ones (fewer than beta_slow turns), which are interpolated; linear in between. The pair
    that turns r times is n_rot ln(orig_ctx / (2 pi r)) / (2 ln base), floored for beta_fast and
    ceiled for beta_slow."""
    yarn = params.yarn
    assert yarn is not None
    n = params.n_rot

    def pair_at(rotations: float) -> float:
        return n * math.log(yarn.orig_ctx / (rotations * 2 * math.pi)) / (2 * math.log(params.base))

    low = max(0.0, math.floor(pair_at(yarn.beta_fast)))
    high = min(n - 1.0, math.ceil(pair_at(yarn.beta_slow)))
    i = torch.arange(n // 2, dtype=torch.float32)
    return 1 - ((i - low) / max(0.001, high - low)).clamp(0, 1)  # [n_rot/2]


def apply_rope(x: torch.Tensor, rotations: torch.Tensor, n_rot: int) -> torch.Tensor:
    """x [B, T, H, D]: pairs of dims [0, n_rot) rotated by `rotations` [B, T, n_rot/2, 2];
    dims >= n_rot pass through."""
    pairs = x[..., :n_rot].float().reshape(*x.shape[:-1], n_rot // 2, 2)  # [B, T, H, n_rot/2, 2]
    turn = torch.view_as_complex(rotations)[:, :, None]  # [B, T, 1, n_rot/2]
    rotated = torch.view_as_real(torch.view_as_complex(pairs) * turn).flatten(-2).to(x.dtype)
    if n_rot == x.shape[-1]:
        return rotated
    return torch.cat((rotated, x[..., n_rot:]), dim=-1)


class RowEmbedding(nn.Module):
    """Token embedding kept in its stored (often quantized) form; rows are dequantized on
    lookup, as llama.cpp's get_rows does, so the first stage never holds a float copy of the
    whole table and only the rows actually used are paged in from the mapped file."""

    def __init__(
        self,
        raw: np.ndarray,
        qtype: GGMLQuantizationType,
        scale: float | None,  # gemma multiplies embeddings by sqrt(E)
        dtype: torch.dtype,
        source: str,
    ) -> None:
        super().__init__()
        self.raw = raw  # [V, bytes_per_row] uint8 view of the mapped file
        self.qtype = qtype
        self.scale = scale
        self.dtype = dtype
        self.source = source

    @property
    def num_embeddings(self) -> int:
        return self.raw.shape[0]

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """ids [B, T] int64 -> [B, T, E] in the runtime dtype, on ids' device."""
        flat = ids.reshape(-1).cpu().numpy()
        if flat.size and (flat.min() < 0 or flat.max() >= self.num_embeddings):
            bad = int(flat[(flat < 0) | (flat >= self.num_embeddings)][0])
            raise ValueError(f"token id {bad} is outside the vocabulary [0, {self.num_embeddings})")
        rows = dequantize(self.raw[flat], self.qtype, self.source)  # [B*T, E] float32
        out = torch.from_numpy(rows).to(device=ids.device, dtype=self.dtype)
        if self.scale is not None:
            # rounded to the runtime dtype first, as the reference implementations do
            out = out * torch.tensor(self.scale, dtype=out.dtype, device=out.device)
        return out.view(*ids.shape, -1)
