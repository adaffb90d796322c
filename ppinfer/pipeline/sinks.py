"""What the last stage does with its output: sample each row's next token (generate) or keep
every position's logits (score).

Sampling also reports log-probabilities where a sequence asks for them: its sampled tokens'
(`logprobs`) from the logits it samples from, and its prompt's (`prompt_logprobs`) from the
logits of every prompt position, computed chunk by chunk as the prompt goes through (the
last position of a chunk predicts the first token of the next) and sent back with its first
token."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from ppinfer.model import PipelineStage
from ppinfer.pipeline.wire import Admission
from ppinfer.pipeline.work import ItemKind, WorkItem
from ppinfer.profiling.trace import NULL_TRACER, Tracer
from ppinfer.sampling.grammar import Constraint, GrammarVocab, VocabSource
from ppinfer.sampling.logprobs import RowLogprobs, TokenLogprob, token_logprobs
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.sampler import pad_history, sample, stream_generator
from ppinfer.text.tokenizer import Tokenizer


@dataclass
class _Stream:
    """The last stage's view of the sequence in one row: its settings, its random stream, and
    what its settings need: every token it has seen (repetition penalty), the tokens it has
    generated (presence and frequency penalties), its prompt's log-probabilities so far."""

    seq: int
    params: GenerationParams
    generator: torch.Generator
    history: list[int] | None
    generated: list[int] | None = None
    prompt_logprobs: list[TokenLogprob | None] | None = None
    pending: torch.Tensor | None = None
    """Logits [V] of the last prompt position seen so far (it predicts the next chunk's first token)."""
    constraint: Constraint | None = None
    """Its grammar's state (`response_format` or `grammar`), advanced by every token it samples."""


@dataclass
class Sampled:
    """What a sampling item gives back to the first rank: one id per row, and the rows'
    log-probabilities when any of them asked (None otherwise: nothing more is sent)."""

    tokens: torch.Tensor  # [b] int64
    logprobs: list[RowLogprobs | None] | None = None


class SampleSink:
    """Samples the next token of each computing row of a sampling item, each row with its own
    sequence's settings and random stream (so a sequence gets the same tokens wherever it
    runs). Settings arrive once per sequence (`admit`), before its first chunk."""

    def __init__(self, tracer: Tracer = NULL_TRACER, grammar: Callable[[], GrammarVocab] | None = None) -> None:
        """`grammar`: builds the vocabulary for `response_format` constraints (once, when the
        first constrained sequence comes)."""
        self.tracer = tracer
        self._grammar_factory = grammar
        self._grammar: GrammarVocab | None = None
        self._admitted: dict[int, Admission] = {}  # sequences whose first chunk is still to come
        self._streams: dict[tuple[int, int], _Stream] = {}  # (lane, row) -> the row's sequence

    def admit(self, admissions: list[Admission]) -> None:
        for admission in admissions:
            self._admitted[admission.seq] = admission

    def consume(
        self, stage: PipelineStage, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor
    ) -> Sampled | None:
        """ids [b, T] and hidden [b, T, E] of `item` -> sampled ids [b] (and log-probabilities)
        after a sampling item, else None."""
        for i in range(len(item.rows)):
            self._track(item, i, ids[i])
        streams = [self._streams[(item.lane, step.row)] for step in item.rows]
        if item.kind is ItemKind.PREFILL:
            for i, stream in enumerate(streams):
                if stream.prompt_logprobs is not None:
                    self._prompt_logprobs(stage, stream, ids[i], hidden[i], max(0, -item.rows[i].first_pos))
        if not item.samples:
            return None
        tokens = torch.zeros(len(item.rows), dtype=torch.int64)
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden[:, -1:])[:, 0]  # [b, V]
        raw = logits
        if any(s.constraint is not None for s in streams):
            with self.tracer.range("grammar"):
                logits = self._constrain(streams, logits)
        with self.tracer.range("sample"):
            for rows in _alike(streams):
                group = [streams[i] for i in rows]
                settings = group[0].params
                history = generated = None
                if settings.repetition_penalty != 1.0:
                    history = pad_history([s.history or [] for s in group]).to(logits.device)
                if settings.penalized:
                    generated = pad_history([s.generated or [] for s in group]).to(logits.device)
                generators = None if settings.greedy else [s.generator for s in group]
                picked = sample(logits[rows], settings, generators, history, generated).cpu()  # [len(rows)]
                tokens[rows] = picked
                for stream, token in zip(group, picked.tolist()):
                    if stream.history is not None:
                        stream.history.append(token)
                    if stream.generated is not None:
                        stream.generated.append(token)
                    if stream.constraint is not None:
                        stream.constraint.advance(token)
        return Sampled(tokens, self._logprobs(streams, raw, tokens))

    def _constrain(self, streams: list[_Stream], logits: torch.Tensor) -> torch.Tensor:
        """`logits` [b, V] with the tokens each row's grammar forbids at -inf."""
        logits = logits.float().clone()
        for i, stream in enumerate(streams):
            if stream.constraint is not None:
                allowed = stream.constraint.allowed().to(logits.device)  # [V]
                logits[i, : allowed.shape[0]].masked_fill_(~allowed, float("-inf"))
                logits[i, allowed.shape[0]:] = float("-inf")  # padding columns of the output head
        return logits

    def _prompt_logprobs(
        self, stage: PipelineStage, stream: _Stream, ids: torch.Tensor, hidden: torch.Tensor, first: int
    ) -> None:
        """Add the entries of one row's prefill chunk (ids [T], hidden [T, E], padding before
        `first`): each position's logits predict the next prompt token."""
        assert stream.prompt_logprobs is not None and stream.params.prompt_logprobs is not None
        with self.tracer.range("prompt_logprobs"):
            logits = stage.lm_head(hidden[None, first:])[0].float()  # [t, V]
            targets = ids[first:]  # [t]
            if stream.pending is None:  # the prompt's first chunk: nothing predicts its first token
                stream.prompt_logprobs.append(None)
                sources, targets = logits[:-1], targets[1:]
            else:
                sources = torch.cat([stream.pending[None], logits[:-1]])  # [t, V]
            if targets.numel():
                stream.prompt_logprobs += token_logprobs(sources, targets, stream.params.prompt_logprobs)
            stream.pending = logits[-1].clone()

    def _logprobs(
        self, streams: list[_Stream], logits: torch.Tensor, tokens: torch.Tensor
    ) -> list[RowLogprobs | None] | None:
        """Each row's report after sampling `tokens` [b] from `logits` [b, V], or None when no
        row asked for any."""
        rows: list[RowLogprobs | None] = [None] * len(streams)
        for i, stream in enumerate(streams):
            params = stream.params
            entry = None
            if params.logprobs is not None:
                entry = token_logprobs(logits[i:i + 1], tokens[i:i + 1], params.logprobs)[0]
            prompt = ()
            if stream.prompt_logprobs is not None and stream.pending is not None:
                prompt = tuple(stream.prompt_logprobs)
                stream.prompt_logprobs, stream.pending = None, None  # sent once, with the first token
            if entry is not None or prompt:
                rows[i] = RowLogprobs(entry, prompt)
        return rows if any(r is not None for r in rows) else None

    def _track(self, item: WorkItem, i: int, ids: torch.Tensor) -> None:
        """Start the row's stream on a new sequence; record the tokens it was fed."""
        step = item.rows[i]
        key = (item.lane, step.row)
        stream = self._streams.get(key)
        if step.reset or stream is None or stream.seq != step.seq:
            admission = self._admitted.pop(step.seq)
            params, before = admission.params, list(admission.generated)
            # Resumed after a preemption (`before`: its tokens so far, which its recompute feeds
            # again): the random stream goes on past the draws they took, the penalties count
            # them, the grammar has consumed them, and the prompt's log-probabilities were sent
            # with its first token.
            history: list[int] | None = [] if params.repetition_penalty != 1.0 else None
            draws = 0 if params.greedy else len(before)
            fresh = not before and params.prompt_logprobs is not None
            stream = _Stream(step.seq, params, stream_generator(admission.stream_seed, draws), history,
                             generated=before if params.penalized else None,
                             prompt_logprobs=[] if fresh else None,
                             constraint=self._constraint(params, before))
            self._streams[key] = stream
        if stream.history is not None and item.kind is ItemKind.PREFILL:
            # the prompt's tokens, padding excluded (decode inputs were sampled here already)
            stream.history.extend(ids[max(0, -step.first_pos):].tolist())


    def _constraint(self, params: GenerationParams, consumed: list[int]) -> Constraint | None:
        grammar = params.constraint_grammar()
        if grammar is None:
            return None
        if self._grammar is None:
            if self._grammar_factory is None:
                raise RuntimeError("a grammar needs the vocabulary: SampleSink(grammar=...)")
            self._grammar = self._grammar_factory()
        return self._grammar.constraint(grammar, consumed)


def grammar_vocab(tokenizer: Tokenizer) -> GrammarVocab:
    """The vocabulary of `tokenizer` as the grammar library needs it: control tokens (no text
    spells them) marked special, end-of-generation ids as its end tokens."""
    pieces = [tokenizer.token_bytes(i) for i in range(tokenizer.vocab_size)]
    special = [i for i, piece in enumerate(pieces) if piece and not tokenizer.decode([i], skip_special=True)]
    return GrammarVocab(VocabSource(
        pieces, special, sorted(tokenizer.eog_ids), tokenizer.bos_id,
        lambda text: tokenizer.encode(text, add_bos=False, parse_special=False),
    ))


def _alike(streams: list[_Stream]) -> list[list[int]]:
    """Rows (indices into `streams`) grouped by equal sampler settings: one sampler call per
    group (their random streams differ, not their filters)."""
    groups: dict[tuple, list[int]] = {}
    for i, stream in enumerate(streams):
        groups.setdefault(stream.params.sampler_key(), []).append(i)
    return list(groups.values())


class ScoreSink:
    """Keeps the logits at every position of the scored sequence; perplexity at the end."""

    def __init__(self, prompt: list[int], tracer: Tracer = NULL_TRACER) -> None:
        self.prompt, self.tracer = prompt, tracer
        self._rows: list[torch.Tensor] = []

    def admit(self, admissions: list[Admission]) -> None:
        """Nothing is sampled: settings are not needed."""

    def consume(
        self, stage: PipelineStage, item: WorkItem, ids: torch.Tensor, hidden: torch.Tensor
    ) -> Sampled | None:
        with self.tracer.range("lm_head"):
            logits = stage.lm_head(hidden)[0]  # [T, V] (one sequence, no padding)
        self._rows.append(logits.cpu())
        if not item.samples:
            return None
        return Sampled(torch.zeros(len(item.rows), dtype=torch.int64))

    def logits(self) -> torch.Tensor:
        """Every scored position's logits, [T, V] float32."""
        return torch.cat(self._rows)

    def perplexity(self) -> dict[str, Any]:
        """The fields metrics.json gets: tokens scored, and with at least 2 of them the mean
        negative log-likelihood of each token given those before it and its perplexity."""
        ids = torch.tensor(self.prompt, dtype=torch.int64)
        if ids.numel() < 2:
            return {"scored_tokens": int(ids.numel())}
        logits = self.logits()  # [T, V]
        nll = torch.nn.functional.cross_entropy(logits[:-1].double(), ids[1:], reduction="mean").item()
        return {"scored_tokens": int(ids.numel()), "nll": nll, "perplexity": math.exp(nll)}


Sink = SampleSink | ScoreSink
