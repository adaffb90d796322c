"""The one generic decoder block, driven by `FamilySpec` flags; attention with a KV cache."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ppinfer.families.spec import AttnTemperature, Mlp
from ppinfer.kernels import fused as fused_ops
from ppinfer.model.cache import LayerKV
from ppinfer.model.layers import Linear, RotaryEmbedding, apply_rope


@dataclass
class LayerInputs:
    """Per-forward values shared by the layers of a stage."""

    rope: dict[int, torch.Tensor]  # id(RotaryEmbedding) -> rotations [B, T, n_rot/2, 2] (cos, sin)
    masks: dict[tuple[int, int], torch.Tensor]  # (sliding window, chunk) (0 = none) -> [B, 1, T, n] bool
    positions: torch.Tensor  # [B, T] int64 (-1 = padding)


@dataclass
class Piece:
    """One rectangle of a ragged forward (`DecoderBlock.ragged`): `rows` x `length` tokens,
    with their slots in one layer's cache and their per-forward inputs."""

    rows: int
    length: int
    kv: LayerKV
    io: LayerInputs

    @property
    def tokens(self) -> int:
        return self.rows * self.length


def attend_ragged(attn: nn.Module, x: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
    """x [1, N, E], the pieces' tokens one after another (each piece row by row) -> [1, N, E]:
    each piece attends over its own rows' keys. `Attention` projects all N tokens at once;
    any other attention runs piece by piece."""
    if isinstance(attn, Attention):
        return attn.ragged(x, pieces)
    parts = x[0].split([p.tokens for p in pieces])  # [b_i T_i, E] each
    outs = [attn(part.view(p.rows, p.length, -1), p.kv, p.io).flatten(0, 1) for part, p in zip(parts, pieces)]
    return torch.cat(outs)[None]


class Attention(nn.Module):
    """Grouped-query attention over fused qkv, with optional q/k norm and score softcap.

    q and k heads are normalised and rotated together as one `[B, T, H + Hkv, D]` view of
    the fused projection (fewer, larger kernels than per-tensor work). With `fused` (float32 on
    the CPU), cache write and attention are one op for decode and prefill alike, whose sums run
    over each query's visible keys in order: a query's result does not depend on the forward's
    width, padding or chunking (batch invariance). The op rotates q and k too where nothing
    comes between rotation and attention (`plain`); llama4's layers (NoPE, an L2 norm after
    rotation, a query temperature) prepare q and k in torch and hand them over unrotated."""

    def __init__(
        self,
        qkv: Linear,  # [(H + 2 Hkv) D, E]
        out: Linear,  # [E, H D]
        n_head: int,
        n_head_kv: int,
        head_dim: int,
        scale: float,
        rope: RotaryEmbedding | None,  # None: no rotary embedding (a NoPE layer)
        window: int,
        softcap: float | None,
        qk_norm: nn.Module | None,  # over the [B, T, H + Hkv, D] q and k heads, before rope
        fused: bool = False,
        sinks: torch.Tensor | None = None,  # [H]: a logit per head that joins every softmax (gpt-oss)
        post_rope_norm: nn.Module | None = None,  # over the q and k heads after rope (llama4)
        temperature: AttnTemperature | None = None,  # per-position query scale (llama4's NoPE layers)
        chunk: int = 0,  # > 0: attend within chunks of this many positions (llama4's rope layers)
    ) -> None:
        super().__init__()
        self.qkv, self.out = qkv, out
        self.n_head, self.n_head_kv, self.head_dim = n_head, n_head_kv, head_dim
        self.scale, self.rope, self.window, self.softcap = scale, rope, window, softcap
        self.qk_norm, self.post_rope_norm, self.temperature = qk_norm, post_rope_norm, temperature
        self.chunk = chunk
        self.sinks = None if sinks is None else nn.Parameter(sinks, requires_grad=False)
        self.plain = rope is not None and post_rope_norm is None and temperature is None
        self._attend_op = fused_ops.attend_op() if fused else None

    @property
    def fused(self) -> bool:
        """Whether cache write and attention (and, where `plain`, rotation) are the one fused op."""
        return self._attend_op is not None

    def forward(self, x: torch.Tensor, kv: LayerKV, io: LayerInputs) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]; this step's keys and values go into `kv`."""
        b, t, _ = x.shape
        qkv = self.qkv(x).view(b, t, self.n_head + 2 * self.n_head_kv, self.head_dim)  # [B, T, H + 2 Hkv, D]
        return self.out(self._attend(qkv, kv, io))

    def ragged(self, x: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
        """x [1, N, E] (see `attend_ragged`) -> [1, N, E]: one projection in and one out for
        every piece's tokens, attention piece by piece."""
        qkv = self.qkv(x)[0]  # [N, (H + 2 Hkv) D]
        heads = self.n_head + 2 * self.n_head_kv
        ys = [
            self._attend(part.view(p.rows, p.length, heads, self.head_dim), p.kv, p.io).flatten(0, 1)
            for part, p in zip(qkv.split([p.tokens for p in pieces]), pieces)
        ]  # [b_i T_i, H D] each
        return self.out(torch.cat(ys)[None])

    def _attend(self, qkv: torch.Tensor, kv: LayerKV, io: LayerInputs) -> torch.Tensor:
        """qkv [B, T, H + 2 Hkv, D] -> attention output [B, T, H D]; the keys and values go
        into `kv`."""
        b, t, _, d = qkv.shape
        h, hkv = self.n_head, self.n_head_kv
        qk, v = qkv[:, :, : h + hkv], qkv[:, :, h + hkv :]
        if self.qk_norm is not None:
            qk = self.qk_norm(qk)
        mask = io.masks[self.window, self.chunk]  # [B, 1, T, n]
        if self._attend_op is not None:
            if self.plain:  # the op rotates q and k
                assert self.rope is not None
                rot, n_rot = io.rope[id(self.rope)], self.rope.n_rot
            else:
                qk, rot, n_rot = self._positioned(qk, io), fused_ops.NO_ROTATION, 0
            return self._attend_op(
                qk, v, rot, kv.k, kv.v, kv.table, kv.cols, mask, h, n_rot, self.scale, self.softcap or 0.0, self.sinks
            )  # [B, T, H D]
        qk = self._positioned(qk, io)
        q, k = qk[:, :, :h], qk[:, :, h:]
        keys, values = kv.write(k, v)  # [B, Hkv, n, D] each
        q = q.transpose(1, 2)  # [B, H, T, D]
        if self.softcap is None and self.sinks is None:
            y = F.scaled_dot_product_attention(
                q, keys, values, attn_mask=mask, scale=self.scale, enable_gqa=self.n_head != self.n_head_kv
            )
        else:
            y = self._explicit(q, keys, values, mask)
        return y.transpose(1, 2).reshape(b, t, h * d)

    def _positioned(self, qk: torch.Tensor, io: LayerInputs) -> torch.Tensor:
        """qk [B, T, H + Hkv, D] rotated, normalised after rotation and with its queries scaled
        by their positions' temperature, where the layer has each."""
        if self.rope is not None:
            qk = apply_rope(qk, io.rope[id(self.rope)], self.rope.n_rot)
        if self.post_rope_norm is not None:
            qk = self.post_rope_norm(qk)
        if self.temperature is not None:
            q = qk[:, :, : self.n_head] * self._query_scale(io.positions).to(qk.dtype)
            qk = torch.cat((q, qk[:, :, self.n_head :]), dim=2)
        return qk

    def _query_scale(self, positions: torch.Tensor) -> torch.Tensor:
        """positions [B, T] -> [B, T, 1, 1]: 1 + scale ln(floor((pos + offset) / floor_scale) + 1)."""
        temp = self.temperature
        assert temp is not None
        steps = torch.floor((positions.clamp(min=0).double() + temp.offset) / temp.floor_scale)
        return (torch.log1p(steps) * temp.scale + 1.0).float()[..., None, None]

    def _explicit(
        self, q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        """Explicit attention with tanh(s / c) * c on the scores (gemma2) and/or a sink logit per
        head in each softmax (gpt-oss, whose probability mass goes nowhere); returns [B, H, T, D]."""
        b, h, t, d = q.shape
        group = h // self.n_head_kv
        qg = q.view(b, self.n_head_kv, group, t, d)  # [B, Hkv, G, T, D]
        scores = (qg @ keys[:, :, None].transpose(-1, -2)).float() * self.scale  # [B, Hkv, G, T, n]
        if self.softcap is not None:
            scores = torch.tanh(scores / self.softcap) * self.softcap
        scores = scores.masked_fill(~mask[:, :, None], float("-inf"))
        if self.sinks is not None:
            sink = self.sinks.float().view(1, self.n_head_kv, group, 1, 1).expand(b, -1, -1, t, 1)  # [B, Hkv, G, T, 1]
            probs = torch.cat((scores, sink), dim=-1).softmax(dim=-1)[..., :-1].to(values.dtype)
        else:
            probs = scores.softmax(dim=-1).to(values.dtype)
        return (probs @ values[:, :, None]).view(b, h, t, d)


class FeedForward(nn.Module):
    """Gated (SwiGLU / GeGLU, gate and up fused as one matmul) or plain GELU MLP. With `fused`
    (float32 on the CPU) the gated activation is one op."""

    def __init__(self, kind: Mlp, up: Linear, down: Linear, fused: bool = False) -> None:
        super().__init__()
        self.kind, self.up, self.down = kind, up, down
        self._glu = fused_ops.glu_op() if fused and kind is not Mlp.GELU else None
        self._glu_kind = 0 if kind is Mlp.SWIGLU else 1

    @property
    def glu_kind(self) -> int | None:
        """The fused `glu` op's kind (0 SiLU, 1 GELU), or None where the activation is torch ops."""
        return self._glu_kind if self._glu is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)  # [B, T, 2F] gated ([gate | up]) or [B, T, F]
        if self.kind is Mlp.GELU:
            return self.down(F.gelu(h, approximate="tanh"))
        if self._glu is not None:
            return self.down(self._glu(h, self._glu_kind))  # [B, T, F] -> [B, T, E]
        gate, up = h.chunk(2, dim=-1)
        act = F.silu(gate) if self.kind is Mlp.SWIGLU else F.gelu(gate, approximate="tanh")
        return self.down(act * up)


class DecoderBlock(nn.Module):
    """Pre-norm residual block; optional post-branch norms (gemma2/3) or a parallel
    attention+MLP form with one shared norm (phi2). The MLP is a `FeedForward` or a
    `MoeFeedForward`.

    `layer_op`, where the loader sets one (`ppinfer.model.layer_op`), runs the whole block as one
    call to the ops its modules call, the same bits without the host's cost between them."""

    def __init__(
        self,
        attn_norm: nn.Module,
        attn: nn.Module,  # an Attention or a LatentAttention
        mlp: nn.Module,
        ffn_norm: nn.Module | None,  # None for the parallel form
        post_attn_norm: nn.Module | None,
        post_ffn_norm: nn.Module | None,
        residual_scale: float = 1.0,  # multiplies each branch before its residual add (granite)
    ) -> None:
        super().__init__()
        self.attn_norm, self.attn, self.mlp = attn_norm, attn, mlp
        self.ffn_norm, self.post_attn_norm, self.post_ffn_norm = ffn_norm, post_attn_norm, post_ffn_norm
        self.residual_scale = residual_scale
        self.layer_op: torch.ScriptObject | None = None  # None: module by module

    def forward(self, x: torch.Tensor, kv: LayerKV, io: LayerInputs) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]."""
        if self.layer_op is not None:
            attn = self.attn
            mask = io.masks[attn.window, attn.chunk]
            return self.layer_op.forward(x, io.rope[id(attn.rope)], kv.k, kv.v, kv.table, kv.cols, mask)
        return self._residual(x, lambda h: self.attn(h, kv, io))

    def ragged(self, x: torch.Tensor, pieces: list[Piece]) -> torch.Tensor:
        """x [1, N, E], several pieces' tokens one after another (see `attend_ragged`) ->
        [1, N, E]: the norms, projections and MLP run once over all N tokens."""
        return self._residual(x, lambda h: attend_ragged(self.attn, h, pieces))

    def _residual(self, x: torch.Tensor, attend: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The block around its attention `attend`: normed x [.., E] -> [.., E]."""
        h = self.attn_norm(x)
        a = attend(h)
        if self.ffn_norm is None:
            return x + a + self.mlp(h)
        if self.post_attn_norm is not None:
            a = self.post_attn_norm(a)
        if self.residual_scale != 1.0:
            a = a * self.residual_scale
        x = x + a
        m = self.mlp(self.ffn_norm(x))
        if self.post_ffn_norm is not None:
            m = self.post_ffn_norm(m)
        if self.residual_scale != 1.0:
            m = m * self.residual_scale
        return x + m

