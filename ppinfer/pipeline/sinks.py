"""What the last stage does with its output: sample each row's next token (generate) or keep
every position's logits (score)."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ppinfer.generation.sampling import pad_history, sample, stream_generator
from ppinfer.model import PipelineStage
from ppinfer.pipeline.outputs import LOGITS, write_logits, writing
from ppinfer.pipeline.schedule import Kind, WorkItem
from ppinfer.pipeline.transport import RowSampling
from ppinfer.profiling.trace import NULL_TRACER, Tracer


@dataclass
class _Stream:
    """The last stage's view of the sequence in one row: its random stream and, when its
    repetition penalty needs it, every token it has seen."""

    seq: int
    generator: torch.Generator
    history: list[int] | None


class SampleSink:
    """Samples the next token of each computing row of a sampling item, each row with its own
    settings and random stream (so a sequence gets the same tokens wherever it runs)."""

    def __init__(self, tracer: Tracer = NULL_TRACER) -> None:
        self.tracer = tracer
        self._streams: dict[tuple[int, int], _Stream] = {}  # (lane, row) -> the row's sequence

    def consume(
        self, stage: PipelineStage, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor,
        sampling: tuple[RowSampling, ...],
    ) -> torch.Tensor | None:
        """ids [b, T] and hidden [b, T, E] of `item` -> sampled ids [b] after a sampling item,
        else None."""
        for i in range(len(item.rows)):
            self._track(item, i, ids[i], sampling[i])
        if not item.samples:
            return None
        tokens = torch.zeros(len(item.rows), dtype=torch.int64)
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden[:, -1:])[:, 0]  # [b, V]
        with self.tracer.range("sample"):
            for rows, settings in _same_settings(sampling):
                streams = [self._streams[(item.lane, item.rows[i].row)] for i in rows]
                history = None
                if settings.repetition_penalty != 1.0:
                    history = pad_history([s.history or [] for s in streams]).to(logits.device)
                generators = None if settings.greedy else [s.generator for s in streams]
                picked = sample(logits[rows], settings, generators, history).cpu()  # [len(rows)]
                tokens[rows] = picked
                for stream, token in zip(streams, picked.tolist()):
                    if stream.history is not None:
                        stream.history.append(token)
        return tokens

    def _track(self, item: WorkItem, i: int, ids: torch.Tensor, sampling: RowSampling) -> None:
        """Start the row's stream on a new sequence; record the tokens it was fed."""
        step = item.rows[i]
        key = (item.lane, step.row)
        stream = self._streams.get(key)
        if step.reset or stream is None or stream.seq != step.seq:
            keeps = sampling.repetition_penalty != 1.0
            stream = _Stream(step.seq, stream_generator(sampling.stream_seed), [] if keeps else None)
            self._streams[key] = stream
        if stream.history is not None and item.kind is Kind.PREFILL:
            # the prompt's tokens, padding excluded (decode inputs were sampled here already)
            stream.history.extend(ids[max(0, -step.first_pos):].tolist())

    def finish(self, out_dir: Path) -> dict[str, Any]:
        return {}


def _same_settings(sampling: tuple[RowSampling, ...]) -> list[tuple[list[int], RowSampling]]:
    """Rows grouped by identical sampling settings (their streams differ, not their filters)."""
    groups: dict[tuple[float, int, float, float, float], tuple[list[int], RowSampling]] = {}
    for i, s in enumerate(sampling):
        key = (s.temperature, s.top_k, s.top_p, s.min_p, s.repetition_penalty)
        groups.setdefault(key, ([], s))[0].append(i)
    return list(groups.values())


class ScoreSink:
    """Keeps the logits at every position of the scored sequence; perplexity at the end."""

    def __init__(self, prompt: list[int], tracer: Tracer = NULL_TRACER) -> None:
        self.prompt, self.tracer = prompt, tracer
        self._rows: list[torch.Tensor] = []

    def consume(
        self, stage: PipelineStage, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor,
        sampling: tuple[RowSampling, ...],
    ) -> torch.Tensor | None:
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden)[0]  # [T, V] (one sequence, no padding)
        self._rows.append(logits.cpu())
        if not item.samples:
            return None
        return torch.zeros(len(item.rows), dtype=torch.int64)

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Write logits.npy; returns the perplexity fields for metrics.json."""
        logits = torch.cat(self._rows)  # [T, V]
        with writing(out_dir, LOGITS):
            write_logits(out_dir, logits.numpy())
        ids = torch.tensor(self.prompt, dtype=torch.int64)
        if ids.numel() < 2:
            return {"scored_tokens": int(ids.numel())}
        nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean").item()
        return {"scored_tokens": int(ids.numel()), "nll": nll, "perplexity": math.exp(nll)}


Sink = SampleSink | ScoreSink
