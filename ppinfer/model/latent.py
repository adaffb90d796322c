"""Multi-head latent attention (deepseek2): keys and values come from a low-rank latent.

Each token is projected to a latent of `kv_lora_rank` values plus one rotary key of `n_rot`
values shared by every head. The latent is normalised and decompressed into each head's
non-rotary key part and value; the query of each head is its non-rotary part followed by
its rotary part. The decompressed per-head keys and values go into the KV cache as any
other attention's do (the cache holds full keys and values, not the latent: simpler, and
exact; the latent form would hold (kv_lora_rank + n_rot) values per token instead of
n_head (D + Dv)). With `fused` (float32 on the CPU) the cache write and attention are the
fused `attend` op, given q and k rotated here (n_rot 0), so the layer is batch-invariant as the
others are.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppinfer.kernels import fused as fused_ops
from ppinfer.model.block import LayerInputs
from ppinfer.model.cache import LayerKV
from ppinfer.model.layers import RotaryEmbedding, apply_rope


class LatentAttention(nn.Module):
    """Attention over keys [nope | rope] and values decompressed per head from a latent."""

    window = 0  # global attention
    chunk = 0  # not chunked

    def __init__(
        self,
        q: nn.Module,  # x [.., E] -> [.., H D]: one projection, or the low-rank chain with its norm
        kv_a: nn.Module,  # x [.., E] -> [.., R + n_rot]: the latent and the shared rotary key
        kv_norm: nn.Module,  # RMSNorm over the latent [.., R]
        kv_b: nn.Module,  # latent [.., R] -> [.., H (D - n_rot + Dv)]: per head [k_nope | v]
        out: nn.Module,  # [.., H Dv] -> [.., E]
        n_head: int,
        head_dim: int,  # D: non-rotary plus rotary dims of a query or key head
        head_dim_v: int,  # Dv
        kv_lora_rank: int,
        scale: float,
        rope: RotaryEmbedding,
        fused: bool = False,
    ) -> None:
        super().__init__()
        self.q, self.kv_a, self.kv_norm, self.kv_b, self.out = q, kv_a, kv_norm, kv_b, out
        self.n_head, self.head_dim, self.head_dim_v = n_head, head_dim, head_dim_v
        self.kv_lora_rank, self.scale, self.rope = kv_lora_rank, scale, rope
        self.nope = head_dim - rope.n_rot
        self._attend_op = fused_ops.attend_op() if fused else None

    def forward(self, x: torch.Tensor, kv: LayerKV, io: LayerInputs) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]; this step's decompressed keys and values go into `kv`."""
        b, t, _ = x.shape
        h, n_rot, nope = self.n_head, self.rope.n_rot, self.nope
        rotations = io.rope[id(self.rope)]  # [B, T, n_rot/2, 2]
        q = self.q(x).view(b, t, h, self.head_dim)  # [B, T, H, D]
        q = torch.cat((q[..., :nope], apply_rope(q[..., nope:], rotations, n_rot)), dim=-1)
        latent = self.kv_a(x)  # [B, T, R + n_rot]
        c = self.kv_norm(latent[..., : self.kv_lora_rank])  # [B, T, R]
        k_rope = apply_rope(latent[..., None, self.kv_lora_rank :], rotations, n_rot)  # [B, T, 1, n_rot]
        kv_heads = self.kv_b(c).view(b, t, h, nope + self.head_dim_v)  # [B, T, H, nope + Dv]
        k = torch.cat((kv_heads[..., :nope], k_rope.expand(b, t, h, n_rot)), dim=-1)  # [B, T, H, D]
        v = kv_heads[..., nope:]  # [B, T, H, Dv]
        mask = io.masks[self.window, self.chunk]  # [B, 1, T, n]
        if self._attend_op is not None:
            qk = torch.cat((q, k), dim=2)  # [B, T, 2H, D]
            y = self._attend_op(
                qk, v, fused_ops.NO_ROTATION, kv.k, kv.v, kv.table, kv.cols, mask, h, 0, self.scale, 0.0, None
            )  # [B, T, H Dv]
            return self.out(y)
        keys, values = kv.write(k, v)  # [B, H, n, D], [B, H, n, Dv]
        y = F.scaled_dot_product_attention(q.transpose(1, 2), keys, values, attn_mask=mask, scale=self.scale)
        return self.out(y.transpose(1, 2).reshape(b, t, h * self.head_dim_v))  # [B, H, T, Dv] -> [B, T, E]


class LowRankQuery(nn.Module):
    """q_b(norm(q_a(x))): queries through a low-rank bottleneck."""

    def __init__(self, q_a: nn.Module, norm: nn.Module, q_b: nn.Module) -> None:
        super().__init__()
        self.q_a, self.norm, self.q_b = q_a, norm, q_b

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [.., E] -> [.., H D]."""
        return self.q_b(self.norm(self.q_a(x)))
