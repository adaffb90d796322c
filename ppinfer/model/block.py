"""The one generic decoder block, driven by `FamilySpec` flags; attention with a KV cache."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from ppinfer.families.spec import Mlp
from ppinfer.model.layers import Linear, RotaryEmbedding, apply_rope


@dataclass
class LayerInputs:
    """Per-forward values shared by the layers of a stage."""

    rope: dict[int, torch.Tensor]  # id(RotaryEmbedding) -> rotations [B, T, 1, n_rot/2] complex
    masks: dict[int, torch.Tensor]  # sliding window (0 = global) -> [B, 1, T, n] bool


KVWrite = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]
"""Stores a layer's new k, v [B, T, Hkv, D] in its cache; returns the keys and values to
attend to, [B, Hkv, n, D] each (`RowsView.write` bound to the layer)."""


class Attention(nn.Module):
    """Grouped-query attention over fused qkv, with optional q/k norm and score softcap.

    q and k heads are normalised and rotated together as one `[B, T, H + Hkv, D]` view of
    the fused projection (fewer, larger kernels than per-tensor work)."""

    def __init__(
        self,
        qkv: Linear,  # [(H + 2 Hkv) D, E]
        out: Linear,  # [E, H D]
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        scale: float,
        rope: RotaryEmbedding,
        window: int,
        softcap: float | None,
        qk_norm: nn.Module | None,  # RMSNorm over D with weight [H + Hkv, D] (q rows, then k)
    ) -> None:
        super().__init__()
        self.qkv, self.out = qkv, out
        self.n_head, self.n_head_kv, self.head_dim = n_head, n_head_kv, head_dim
        self.scale, self.rope, self.window, self.softcap = scale, rope, window, softcap
        self.qk_norm = qk_norm

    def forward(self, x: torch.Tensor, kv: KVWrite, io: LayerInputs) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]; this step's keys and values go through `kv`."""
        b, t, _ = x.shape
        d, h, hkv = self.head_dim, self.n_head, self.n_head_kv
        qkv = self.qkv(x).view(b, t, h + 2 * hkv, d)  # [B, T, H + 2 Hkv, D]
        qk, v = qkv[:, :, : h + hkv], qkv[:, :, h + hkv :]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        qk = apply_rope(qk, io.rope[id(self.rope)], self.rope.n_rot)  # [B, T, H + Hkv, D]
        q, k = qk[:, :, :h], qk[:, :, h:]
        keys, values = kv(k, v)  # [B, Hkv, n, D] each
        mask = io.masks[self.window]  # [B, 1, T, n]
        q = q.transpose(1, 2)  # [B, H, T, D]
        if self.softcap is None:
            y = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.n_head != self.n_head_kv
            )
        else:
            y = self._softcapped(q, keys, values, mask)
        return self.out(y.transpose(1, 2).reshape(b, t, self.n_head * d))

    def _softcapped(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Explicit attention with tanh(s / c) * c on the scores (gemma2); returns [B, H, T, D]."""
        b, h, t, d = q.shape
        group = h // self.n_head_kv
        qg = q.view(b, self.n_head_kv, group, t, d)  # [B, Hkv, G, T, D]
        scores = (qg @ keys[:, :, None].transpose(-1, -2)).float() * self.scale  # [B, Hkv, G, T, n]
        scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        probs = scores.softmax(dim=-1).to(values.dtype)
        return (probs @ values[:, :, None]).view(b, h, t, d)


class FeedForward(nn.Module):
    """Gated (SwiGLU / GeGLU, gate and up fused as one matmul) or plain GELU MLP."""

    def __init__(self, kind: Mlp, up: Linear, down: Linear) -> None:
        super().__init__()
        self.kind, self.up, self.down = kind, up, down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # [B, T, 2F] gated ([gate | up]) or [B, T, F]
        if self.kind is Mlp.GELU:
            return self.down(F.gelu(h, approximate="tanh"))
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) if self.kind is Mlp.SWIGLU else F.gelu(gate, approximate="tanh")
        return self.down(act * up)


class DecoderBlock(nn.Module):
    """Pre-norm residual block; optional post-branch norms (gemma2/3) or a parallel
    attention+MLP form with one shared norm (phi2)."""

    def __init__(
        self,
        attn_norm: nn.Module,
        attn: Attention,
        mlp: FeedForward,
        ffn_norm: nn.Module | None,  # None for the parallel form
        post_attn_norm: nn.Module | None,
        post_ffn_norm: nn.Module | None,
    ) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp = attn_norm, attn, mlp
        self.ffn_norm, self.post_attn_norm, self.post_ffn_norm = ffn_norm, post_attn_norm, post_ffn_norm

    def forward(self, x: torch.Tensor, kv: KVWrite, io: LayerInputs) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]."""
        h = self.attn_norm(x)
        a = self.attn(h, kv, io)
        if self.ffn_norm is None:
            return x + a + self.mlp(h)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        x = x + a
        m = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            m = self.post_ffn_norm(m)
        return x + m
