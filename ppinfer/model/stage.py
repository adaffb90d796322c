"""`PipelineStage`: one contiguous slice of a decoder, the same interface for every family."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from ppinfer.families.hparams import HParams
from ppinfer.kernels.select import BLOCK_LINEARS
from ppinfer.model.block import DecoderBlock, LayerInputs, Piece
from ppinfer.model.cache import BLOCK_SIZE, KVCache, KVPool, RowsView, blocks_for
from ppinfer.model.kvquant import KVType
from ppinfer.model.layers import PackedLinear, RotaryEmbedding, RowEmbedding
from ppinfer.model.moe import MoeFeedForward
from ppinfer.model.report import WeightsReport
from ppinfer.plan.stage_plan import StagePlan


class PipelineStage(nn.Module):
    """Layers `[plan.layer_start, plan.layer_end)`; the embedding only if `plan.is_first`,
    the final norm and output head only if `plan.is_last` (None elsewhere)."""

    def __init__(
        self,
        plan: StagePlan,
        hparams: HParams,
        layers: list[DecoderBlock],
        ropes: list[RotaryEmbedding],
        embedding: RowEmbedding | None,
        final_norm: nn.Module | None,
        output: nn.Module | None,
        dtype: torch.dtype,
        device: torch.device,
        weights_report: WeightsReport | None = None,
    ) -> None:
        super().__init__()
        if len(layers) != plan.n_layers:
            raise ValueError(f"stage {plan} got {len(layers)} layers")
        if (embedding is None) == plan.is_first or (output is None) == plan.is_last:
            raise ValueError(f"stage {plan}: embedding/output presence does not match the plan")
        self.plan, self.hparams, self.dtype, self.device = plan, hparams, dtype, device
        self.layers = nn.ModuleList(layers)
        self.ropes = nn.ModuleList(ropes)  # distinct rotary embeddings used by these layers
        self.embedding, self.final_norm, self.output = embedding, final_norm, output
        self.weights_report = weights_report

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids [B, T] int64 -> hidden [B, T, E]. First stage only."""
        if self.embedding is None:
            raise RuntimeError(f"embed() called on stage {self.plan}, which is not the first stage")
        return self.embedding(input_ids)

    def forward(
        self,
        hidden: torch.Tensor,
        positions: torch.Tensor,
        cache: KVCache,
        rows: Sequence[int] | None = None,
    ) -> torch.Tensor:
        """hidden [b, T, E], positions [b, T] (rope positions, -1 = padding) -> [b, T, E] for
        the cache rows `rows` of `cache` (increasing; rows 0..b-1 by default), each of which
        appends T slots for every layer of this stage."""
        slots = cache.rows(range(hidden.shape[0]) if rows is None else rows, positions)
        io = self._inputs(slots, positions)
        for i, layer in enumerate(self.layers):
            hidden = layer(hidden, slots.layer(i), io)
        return hidden

    def forward_ragged(
        self, hidden: torch.Tensor, pieces: Sequence[tuple[torch.Tensor, Sequence[int]]], cache: KVCache
    ) -> torch.Tensor:
        """Several pieces of work on one lane's rows in one forward: piece i is `(positions
        [b_i, T_i], rows)` as in `forward` (distinct rows for distinct pieces), and hidden
        [1, N, E] holds their tokens one after another, each piece row by row (N = sum b_i T_i).
        Returns [1, N, E]. Norms, projections and the MLP stream each weight once for all N
        tokens; attention runs piece by piece, each row over its own keys (a decode step and a
        newcomer's prefill chunk share the step)."""
        views = [(cache.rows(rows, positions), positions) for positions, rows in pieces]
        inputs = [self._inputs(slots, positions) for slots, positions in views]
        for i, layer in enumerate(self.layers):
            parts = [
                Piece(positions.shape[0], positions.shape[1], slots.layer(i), io)
                for (slots, positions), io in zip(views, inputs)
            ]
            hidden = layer.ragged(hidden, parts)
        return hidden

    def _inputs(self, slots: RowsView, positions: torch.Tensor) -> LayerInputs:
        """The rotations and masks every layer of this stage uses for `slots`."""
        spans = {(layer.attn.window, layer.attn.chunk) for layer in self.layers}
        return LayerInputs(
            rope={id(r): r.rotations(positions) for r in self.ropes},
            masks={span: slots.mask(*span) for span in spans},
            positions=positions,
        )

    def lm_head(self, hidden: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, E] -> logits [B, T, V] float32. Last stage only."""
        if self.output is None or self.final_norm is None:
            raise RuntimeError(f"lm_head() called on stage {self.plan}, which is not the last stage")
        logits = self.output(self.final_norm(hidden)).float()
        if self.hparams.logit_scale != 1.0:
            logits = logits / self.hparams.logit_scale
        cap = self.hparams.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def new_pool(self, tokens: int, dtype: KVType | None = None) -> KVPool:
        """A KV cache pool for this stage's layers with room for `tokens` slots (rounded up to
        whole blocks), keys and values stored as `dtype` (the stage's dtype by default)."""
        return KVPool(
            n_layers=self.plan.n_layers,
            n_head_kv=[self.hparams.layers[i].n_head_kv for i in self.plan.layer_ids],
            head_dim=self.hparams.head_dim,
            n_blocks=blocks_for(tokens),
            dtype=dtype or self.dtype,
            device=self.device,
            head_dim_v=self.hparams.head_dim_v,
        )

    def new_cache(self, batch: int, max_len: int, dtype: KVType | None = None) -> KVCache:
        """A fresh KV cache for one lane of `batch` sequences of up to `max_len` tokens, over a
        pool of its own that holds them all."""
        return KVCache(self.new_pool(batch * blocks_for(max_len) * BLOCK_SIZE, dtype), batch, max_len)

    @property
    def weight_bytes(self) -> int:
        """Bytes of the weights this stage holds: parameters, packed float weights and stored
        blocks (the token embedding, read from the mapped file row by row, excluded)."""
        held = sum(m.nbytes for m in self.modules() if isinstance(m, (PackedLinear, *BLOCK_LINEARS)))
        return held + sum(p.numel() * p.element_size() for p in self.parameters())

    def describe_experts(self) -> str:
        """The routed experts this stage holds, for the stage table: '-' for a dense stage,
        else e.g. '3 layers x 8 experts (2 used), 1.5 MiB'."""
        moe = [layer.mlp for layer in self.layers if isinstance(layer.mlp, MoeFeedForward)]
        if not moe:
            return "-"
        counts = sorted({(m.params.n_expert, m.params.n_expert_used) for m in moe})
        kinds = ", ".join(f"{n} experts ({used} used)" for n, used in counts)
        mib = sum(m.expert_bytes for m in moe) / (1024.0 * 1024.0)
        return f"{len(moe)} layers x {kinds}, {mib:.1f} MiB"
