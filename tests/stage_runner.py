"""Drives ppinfer pipeline stages in one process for the tests (no torch.distributed).

Only the public stage interface is used: `build_stage`, `embed`, `forward`, `lm_head`,
`new_cache`. Everything runs in float32 on CPU under `torch.no_grad()`, on dequantized
weights unless a test asks for the quantized path.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from ppinfer.model import KVCache, PipelineStage, build_stage
from ppinfer.plan import StagePlan


def build(
    path: Path, layer_start: int, layer_end: int, total_layers: int, weights: str = "dequantized"
) -> PipelineStage:
    """The stage owning layers [layer_start, layer_end) of `path`, fp32 on CPU; dequantized
    weights (the exact path the reference comparisons need) unless `weights` says otherwise."""
    plan = StagePlan(layer_start, layer_end, total_layers)
    return build_stage(path, plan, dtype=torch.float32, device="cpu", weights=weights)


def whole(path: Path, total_layers: int, weights: str = "dequantized") -> PipelineStage:
    """The single stage holding the whole model."""
    return build(path, 0, total_layers, total_layers, weights)


def arange_positions(batch: int, length: int, offset: int = 0) -> torch.Tensor:
    """Positions [B, T] int64: offset, offset+1, ... for every sequence."""
    return torch.arange(offset, offset + length, dtype=torch.int64).expand(batch, length).contiguous()


@torch.no_grad()
def chained_logits(stages: list[PipelineStage], ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of unpadded sequences [B, T] run through `stages` in order, each with
    its own fresh state (the whole sequence as one prefill)."""
    tokens = torch.from_numpy(ids)
    batch, length = tokens.shape
    positions = arange_positions(batch, length)
    hidden = stages[0].embed(tokens)  # [B, T, E]
    for stage in stages:
        hidden = stage.forward(hidden, positions, stage.new_cache(batch=batch, max_len=length))
    return stages[-1].lm_head(hidden).numpy()


def full_logits(stage: PipelineStage, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] of the whole-model `stage` on unpadded sequences [B, T]."""
    return chained_logits([stage], ids)


@torch.no_grad()
def step(stage: PipelineStage, ids: torch.Tensor, positions: torch.Tensor, state: KVCache) -> np.ndarray:
    """One forward of the whole-model `stage` that appends ids [B, T] to `state`; logits [B, T, V]."""
    return stage.lm_head(stage.forward(stage.embed(ids), positions, state)).numpy()


def kl_and_top1(exact: np.ndarray, got: np.ndarray) -> tuple[float, float]:
    """Mean KL(exact || got) per position and top-1 agreement of logits [..., V]."""
    p = torch.log_softmax(torch.from_numpy(exact).double(), -1)
    q = torch.log_softmax(torch.from_numpy(got).double(), -1)
    kl = (p.exp() * (p - q)).sum(-1)  # [...]
    return float(kl.mean()), float((exact.argmax(-1) == got.argmax(-1)).mean())
