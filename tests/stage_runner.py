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
from ppinfer.pipeline.work import WorkItem
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


@torch.no_grad()
def chunked_logits(
    stages: list[PipelineStage], ids: np.ndarray, chunk: int, kv_dtype: torch.dtype | None = None
) -> np.ndarray:
    """Logits [T, V] of one sequence fed `chunk` tokens per forward through every stage's KV
    cache (of `kv_dtype`, the stage's by default), as a pipeline with
    `pipeline.prefill_chunk=chunk` (and decode, at chunk 1) runs it."""
    tokens = torch.from_numpy(ids)  # [1, T]
    states = [stage.new_cache(batch=1, max_len=tokens.shape[1], dtype=kv_dtype) for stage in stages]
    hidden_states = []
    for start in range(0, tokens.shape[1], chunk):
        piece = tokens[:, start:start + chunk]
        positions = arange_positions(1, piece.shape[1], start)
        hidden = stages[0].embed(piece)
        for stage, state in zip(stages, states):
            hidden = stage.forward(hidden, positions, state)
        hidden_states.append(hidden)  # [1, chunk, E]
    # One pass of the output head over every position (a real model's head is the largest
    # weight: reading it per step would cost more than the steps).
    return stages[-1].lm_head(torch.cat(hidden_states, dim=1))[0].numpy()


def fed_ids(item: WorkItem, seqs: list[np.ndarray]) -> torch.Tensor:
    """The ids `item` feeds when sequence s is `seqs[s]`: [b, T] int64, 0 on left padding;
    with a folded chunk [1, N], its parts' ids one after another (as the first rank feeds them)."""
    if item.folded is not None:
        return torch.cat([fed_ids(part, seqs).flatten() for part in item.parts])[None]
    ids = torch.zeros(len(item.rows), item.length, dtype=torch.int64)
    for i, row in enumerate(item.rows):
        for t in range(max(0, -row.first_pos), item.length):
            ids[i, t] = int(seqs[row.seq][row.first_pos + t])
    return ids


def assert_as_alone(item: WorkItem, logits: torch.Tensor, alone: list[np.ndarray], tolerance: float) -> None:
    """`logits` [b, T, V] of `item` ([1, N, V] with a folded chunk, its parts' one after
    another) equal, at every real position, each sequence's logits alone (`alone[s]`
    [positions, V])."""
    if item.folded is not None:
        pieces = logits[0].split([len(part.rows) * part.length for part in item.parts])
        for part, piece in zip(item.parts, pieces):
            assert_as_alone(part, piece.view(len(part.rows), part.length, -1), alone, tolerance)
        return
    for i, row in enumerate(item.rows):
        for t in range(item.length):
            pos = row.first_pos + t
            if pos >= 0:
                gap = float(np.abs(logits[i, t].numpy() - alone[row.seq][pos]).max())
                assert gap <= tolerance, f"sequence {row.seq} at position {pos} ({item}) differs by {gap:.3g}"


# The real models' decoder layers, and prose to score them on (about 260 tokens).
LAYERS = {"smollm2": 30, "gemma3": 18}
PROSE = (
    "The lighthouse stood at the edge of the harbour for more than a century. Every evening the "
    "keeper climbed the narrow stairs, trimmed the wick and polished the great lens until it "
    "shone. Ships that came in from the north sea used its beam to find the channel between the "
    "rocks, and the fishermen of the town said that as long as the light turned, nobody would be "
    "lost on a winter night. When the harbour was rebuilt, engineers proposed an electric lamp "
    "that needed no keeper at all. The town argued about it for a year. Some people thought the "
    "old ways were part of the place; others pointed out that the keeper was getting old and that "
    "the stairs were dangerous in the ice. In the end the new lamp was installed, but the keeper "
    "was allowed to stay in the cottage at the foot of the tower. He still walked up the hill each "
    "evening to watch the beam sweep across the water, and he kept a notebook in which he wrote "
    "the name of every ship that passed. Years later, a historian found the notebooks in the "
    "town library. They recorded storms, rescues, a whale that had wandered into the bay, and the "
    "slow change of the fleet from sail to steam to diesel. The historian wrote that the notebooks "
    "were the best record of the harbour that anyone had kept, because they were written by a "
    "person who had looked at the sea every single day of his working life."
)
