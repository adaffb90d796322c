"""The Mixture-of-Experts feed-forward: one module for every family, driven by `MoeParams`.

A router scores the experts per token (softmax or sigmoid over `ffn_gate_inp`), the top
`n_expert_used` are chosen (by the scores plus an optional per-expert selection bias, among
the best groups of experts where the experts are grouped), their weights optionally
renormalised and scaled, and the token's output is the weighted sum of the chosen experts'
SwiGLU outputs (plus a shared expert, optionally scaled by its own sigmoid gate). Tokens are
grouped by expert, so each active expert runs one product over the rows routed to it, and
experts nobody chose are never touched.

Expert weights are held by an `experts` module called as `experts(x, counts)` on the rows of
every (token, chosen expert) pair sorted by expert, `counts[e]` rows for expert e: float
tensors on the exact path (`FloatExperts`, a product per active expert), the file's blocks on
the quantized path (`kernels.experts.BlockExperts`, every active expert in one kernel call).
A layer's routing, gather and scatter are a fixed handful of tensor operations, whatever the
number of experts.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ppinfer.families.hparams import MoeParams
from ppinfer.families.spec import Gating
from ppinfer.kernels import fused as fused_ops
from ppinfer.model.layers import frozen


class FloatExperts(nn.Module):
    """Rows grouped by expert times their expert's W [n_expert, out, in] held as floats."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.weight = frozen(weight)  # [n_expert, out, in]
        self.n_expert, self.out_features = weight.shape[0], weight.shape[1]

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, in] (counts[e] rows of expert e, in expert order) -> [M, out]."""
        parts = x.split(counts.tolist())
        products = [F.linear(part, self.weight[e]) for e, part in enumerate(parts) if part.shape[0]]
        return torch.cat(products) if products else x.new_zeros((0, self.out_features))


class ConcatExperts(nn.Module):
    """Experts whose output rows are the concatenation of several expert tensors ([gate | up])
    stored in different types, so held by different modules."""

    def __init__(self, parts: list[nn.Module]) -> None:
        super().__init__()
        self.parts = nn.ModuleList(parts)

    def forward(self, x: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
        """x [M, in] grouped by expert -> [M, sum of the parts' out]."""
        return torch.cat([part(x, counts) for part in self.parts], dim=-1)


class SharedExpertGate(nn.Module):
    """sigmoid(x . w): one scalar per token scaling the shared expert's output (qwen2moe)."""

    def __init__(self, linear: nn.Module, fused: bool = False) -> None:
        super().__init__()
        self.linear = linear  # [E] -> [1]
        self._sigmoid = fused_ops.sigmoid_op() if fused else torch.sigmoid

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [N, E] -> [N, 1]."""
        return self._sigmoid(self.linear(x))


class MoeFeedForward(nn.Module):
    """Routed SwiGLU experts (+ an optional shared expert) over x [B, T, E]."""

    def __init__(
        self,
        params: MoeParams,
        router: nn.Module,  # [n_expert, E] linear: router logits
        gate_up: nn.Module,  # experts(x [M, E] grouped by expert, counts [n_expert]) -> [M, 2 F]: [gate | up]
        down: nn.Module,  # experts(h [M, F] grouped by expert, counts [n_expert]) -> [M, E]
        shared: nn.Module | None = None,  # a dense SwiGLU feed-forward on every token
        shared_gate: nn.Module | None = None,  # scales the shared expert's output per token
        selection_bias: torch.Tensor | None = None,  # [n_expert] added to the scores to choose only
        expert_biases: tuple[torch.Tensor, torch.Tensor] | None = None,  # [n_expert, 2F] ([gate | up]), [n_expert, E]
        clamped: bool = False,  # gpt-oss's clamped SwiGLU
        fused: bool = False,
        weight_input: bool = False,  # the router weight scales the expert's input, not its output (llama4)
    ) -> None:
        super().__init__()
        self.params = params
        self.clamped, self.weight_input = clamped, weight_input
        self.gate_up_bias, self.down_bias = expert_biases if expert_biases is not None else (None, None)
        self.register_buffer("selection_bias", None if selection_bias is None else selection_bias.float())
        self.router, self.gate_up, self.down = router, gate_up, down
        self.shared, self.shared_gate = shared, shared_gate
        self._glu = fused_ops.glu_op() if fused else None
        self._sigmoid = fused_ops.sigmoid_op() if fused else torch.sigmoid  # position-independent where fused

    @property
    def fused(self) -> bool:
        """Whether the SwiGLU is the fused `glu` op."""
        return self._glu is not None

    @property
    def expert_bytes(self) -> int:
        """Bytes held by the routed experts (blocks or floats)."""
        tensors = [*self.gate_up.parameters(), *self.gate_up.buffers(), *self.down.parameters(), *self.down.buffers()]
        return sum(t.numel() * t.element_size() for t in tensors)

    def route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [N, E] -> (weights [N, k] float32, chosen experts [N, k] int64)."""
        p = self.params
        logits = self.router(x).float()  # [N, n_expert]
        if p.gating is Gating.SOFTMAX_CHOSEN:
            chosen_logits, chosen = logits.topk(p.n_expert_used, dim=-1)  # [N, k] each
            return chosen_logits.softmax(dim=-1), chosen
        probs = logits.softmax(dim=-1) if p.gating is Gating.SOFTMAX else self._sigmoid(logits)
        scores = probs if self.selection_bias is None else probs + self.selection_bias  # [N, n_expert]
        if p.n_group > 1:
            groups = scores.view(scores.shape[0], p.n_group, -1)  # [N, G, n_expert / G]
            group_scores = groups.topk(2, dim=-1).values.sum(dim=-1)  # [N, G]
            best = group_scores.topk(p.n_group_used, dim=-1).indices  # [N, g]
            keep = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, best, True)  # [N, G]
            scores = groups.masked_fill(~keep[..., None], float("-inf")).view_as(scores)
        chosen = scores.topk(p.n_expert_used, dim=-1).indices  # [N, k]
        weights = probs.gather(1, chosen)  # [N, k]
        if p.normalize:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        if p.weights_scale != 1.0:
            weights = weights * p.weights_scale
        return weights, chosen

    def _swiglu(self, h: torch.Tensor) -> torch.Tensor:
        """[n, 2F] ([gate | up]) -> [n, F]."""
        if self.clamped:  # gpt-oss: gate capped at 7, up clamped to [-7, 7], alpha 1.702
            gate, up = h.chunk(2, dim=-1)
            gate = gate.clamp(max=7.0)
            return gate * torch.sigmoid(1.702 * gate) * (up.clamp(-7.0, 7.0) + 1)
        if self._glu is not None:
            return self._glu(h, 0)
        gate, up = h.chunk(2, dim=-1)
        return F.silu(gate) * up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, T, E] -> [B, T, E]."""
        flat = x.reshape(-1, x.shape[-1])  # [N, E]
        weights, chosen = self.route(flat)  # [N, k] each
        k = self.params.n_expert_used
        # Token slots (token * k + j) grouped by expert: expert e's are the next counts[e] of `order`.
        experts = chosen.flatten()  # [N k]
        order = experts.argsort(stable=True)  # [N k]
        counts = torch.bincount(experts, minlength=self.params.n_expert)  # [n_expert]
        tokens = order // k  # [N k]: the token of each grouped slot
        slot_weights = weights.flatten()[order, None].to(x.dtype)  # [N k, 1]
        rows = flat[tokens]  # [N k, E]
        if self.weight_input:
            rows = rows * slot_weights
        h = self.gate_up(rows, counts)  # [N k, 2F]
        if self.gate_up_bias is not None:
            h = h + self.gate_up_bias[experts[order]]
        y = self.down(self._swiglu(h), counts)  # [N k, E]
        if self.down_bias is not None:
            y = y + self.down_bias[experts[order]]
        if not self.weight_input:
            y = y * slot_weights
        out = torch.zeros_like(flat).index_add_(0, tokens, y)  # [N, E]
        if self.shared is not None:
            s = self.shared(flat)  # [N, E]
            if self.shared_gate is not None:
                s = s * self.shared_gate(flat).to(s.dtype)
            out = out + s
        return out.view_as(x)
