"""What the last stage does with its output: sample and stop (generate) or keep every
position's logits (score)."""

from __future__ import annotations

import logging
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ppinfer.generation.sampling import Sampler, pad_history
from ppinfer.generation.stopping import StopConditions, StopState
from ppinfer.model import PipelineStage
from ppinfer.pipeline.batches import Batch
from ppinfer.pipeline.outputs import LOGITS, ResultsWriter, write_logits, writing
from ppinfer.pipeline.schedule import Kind, WorkItem
from ppinfer.profiling.trace import NULL_TRACER, Tracer

log = logging.getLogger("ppinfer")


@dataclass
class TokenCounts:
    """Token and time accounting at the last stage (for metrics and the progress line)."""

    prompt_tokens: int = 0
    generated_tokens: int = 0  # tokens sampled by decode steps, for active sequences only
    first_tokens: int = 0  # tokens sampled right after prefill
    prefill_s: float = 0.0  # time between item completions, attributed to each item's kind
    decode_s: float = 0.0
    first_token_at: float | None = None
    decode_steps: dict[int, int] = field(default_factory=dict)  # batch index -> decode items
    last_done: float = field(default_factory=time.perf_counter)

    def account(self, item: WorkItem) -> None:
        now = time.perf_counter()
        if item.kind is Kind.PREFILL:
            self.prefill_s += now - self.last_done
        else:
            self.decode_s += now - self.last_done
            self.decode_steps[item.batch] = self.decode_steps.get(item.batch, 0) + 1
        self.last_done = now


class GenerateSink:
    """Samples the next tokens of a lane, tracks stop conditions, writes finished sequences."""

    def __init__(
        self,
        batches: list[Batch],
        texts: list[str],
        sampler: Sampler,
        conditions: StopConditions,
        decode: Callable[[list[int]], str],
        writer: ResultsWriter,
        use_history: bool,
        counts: TokenCounts,
        tracer: Tracer = NULL_TRACER,
    ) -> None:
        self.tracer = tracer
        self.batches, self.texts, self.sampler = batches, texts, sampler
        self.conditions, self.decode, self.writer = conditions, decode, writer
        self.use_history, self.counts = use_history, counts
        self._stops: dict[int, list[StopState]] = {}  # batch index -> per-sequence state
        self._last_log = time.perf_counter()

    def consume(self, stage: PipelineStage, item: WorkItem, hidden: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        """hidden [B, T, E] of `item` -> (sampled ids [B] or None, whether the batch is done)."""
        batch = self.batches[item.batch]
        if item.kind is Kind.PREFILL:
            self.counts.prompt_tokens += int((batch.positions(item.start, item.length) >= 0).sum())
        if not item.samples:
            self.counts.account(item)
            return None, False
        stops = self._stops.setdefault(item.batch, [StopState(self.conditions, self.decode) for _ in batch.seq_ids])
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden[:, -1:])[:, 0]  # [B, V]
        with self.tracer.range("sample"):
            history = None
            if self.use_history:
                history = pad_history([list(p) + s.token_ids for p, s in zip(batch.prompts, stops)]).to(logits.device)
            tokens = self.sampler(logits, list(batch.seq_ids), history)  # [B]
            active = 0
            for stop, token in zip(stops, tokens.tolist()):
                if not stop.finished:
                    active += 1
                    stop.append(token)
        if item.kind is Kind.PREFILL:
            self.counts.first_tokens += active
            if self.counts.first_token_at is None:
                self.counts.first_token_at = time.perf_counter()
        else:
            self.counts.generated_tokens += active
        self.counts.account(item)
        self._progress()
        done = all(s.finished for s in stops)
        if done:
            self._emit(batch, self._stops.pop(item.batch))
        return tokens, done

    def _emit(self, batch: Batch, stops: list[StopState]) -> None:
        for seq, prompt_ids, stop in zip(batch.seq_ids, batch.prompts, stops):
            self.sampler.release(seq)
            record: dict[str, Any] = {
                "index": seq,
                "prompt": self.texts[seq],
                "prompt_ids": list(prompt_ids),
                "token_ids": stop.token_ids,
                "text": stop.text,
                "finish_reason": stop.finish_reason,
            }
            for rec in self.writer.add(seq, record):
                # the run's product, on stdout (logs go to stderr)
                sys.stdout.write(f"--- [{rec['index']}] {rec['prompt']!r}\n{rec['text']}\n")
                sys.stdout.flush()

    def _progress(self) -> None:
        now = time.perf_counter()
        if now - self._last_log < 2.0:
            return
        self._last_log = now
        c = self.counts
        rate = c.generated_tokens / c.decode_s if c.decode_s > 0 else 0.0
        log.info("generated %d tokens, decode %.1f tokens/s", c.generated_tokens + c.first_tokens, rate)

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Nothing to add: results.jsonl was written as sequences completed."""
        return {}


class ScoreSink:
    """Keeps the logits at every position of the scored sequence; perplexity at the end."""

    def __init__(self, batches: list[Batch], counts: TokenCounts, tracer: Tracer = NULL_TRACER) -> None:
        self.batches, self.counts, self.tracer = batches, counts, tracer
        self._rows: list[torch.Tensor] = []

    def consume(self, stage: PipelineStage, item: WorkItem, hidden: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden)[0]  # [T, V] (one sequence, no padding)
        self._rows.append(logits.cpu())
        self.counts.prompt_tokens += item.length
        if self.counts.first_token_at is None and item.samples:
            self.counts.first_token_at = time.perf_counter()
        self.counts.account(item)
        if not item.samples:
            return None, False
        return torch.zeros(hidden.shape[0], dtype=torch.int64, device=hidden.device), True

    def finish(self, out_dir: Path) -> dict[str, Any]:
        """Write logits.npy; returns the perplexity fields for metrics.json."""
        logits = torch.cat(self._rows)  # [T, V]
        with writing(out_dir, LOGITS):
            write_logits(out_dir, logits.numpy())
        ids = torch.tensor(self.batches[0].prompts[0], dtype=torch.int64)
        if ids.numel() < 2:
            return {"scored_tokens": int(ids.numel())}
        nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean").item()
        return {"scored_tokens": int(ids.numel()), "nll": nll, "perplexity": math.exp(nll)}


Sink = GenerateSink | ScoreSink
