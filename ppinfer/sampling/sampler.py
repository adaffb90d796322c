"""Next-token sampling: parameters, per-sequence random streams, logit filters and the draw.

This file owns turning the last stage's logits ``[B, V]`` into next token ids ``[B]``.

Filter order (llama.cpp's default sampler chain, which we follow):
    logit bias -> repetition penalty -> presence/frequency penalties -> top-k -> top-p ->
    min-p -> temperature -> draw.
transformers (``GenerationMixin._get_logits_processor``) instead applies the temperature
*before* top-k/top-p/min-p. Top-k is unaffected by the order, but top-p and min-p are not:
with llama.cpp's order the nucleus is chosen on the untempered distribution, so raising the
temperature flattens the choice among the kept tokens without letting new tokens in.

Reproducibility contract: every sequence owns a CPU ``torch.Generator`` seeded from
``(seed, sequence_index)`` where ``sequence_index`` is the prompt's global index (a server
request with its own seed uses index 0), and the draw
for row ``b`` consumes exactly one uniform number from row ``b``'s generator per step. Every
other operation is row-wise, so a sequence gets the same tokens whatever lane or batch row it
lands in and whoever its neighbours are (given the same logits for that row).

The draw is inverse-CDF sampling on the filtered distribution sorted by descending logit
(ties in original token order): one uniform ``u`` per row picks the first sorted token whose
cumulative probability exceeds ``u`` times the total. One number per step (rather than one per
vocabulary entry, as a Gumbel race would need) keeps the CPU generators cheap for large
vocabularies and keeps the stream position equal to the step count.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

import torch

from ppinfer.sampling.params import GenerationParams

HISTORY_PAD = -1
"""Padding value in the ``[B, L]`` token-history tensor given for the repetition penalty."""


def stream_seed(seed: int, index: int) -> int:
    """The seed of sequence ``index``'s random stream in a run seeded with ``seed``.

    The two integers are hashed (rather than added) so that nearby (seed, index) pairs give
    unrelated streams: (seed=1, index=0) must not replay (seed=0, index=1). 63 bits:
    manual_seed accepts any uint64, but staying positive keeps it portable (and fits int64).
    """
    if index < 0:
        raise ValueError(f"sequence index must be >= 0, got {index!r}")
    material = f"ppinfer-sampling:{seed}:{index}".encode()
    digest = hashlib.blake2b(material, digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def make_generator(seed: int, index: int) -> torch.Generator:
    """A CPU generator for sequence ``index`` of a run seeded with ``seed``."""
    return stream_generator(stream_seed(seed, index))


def stream_generator(seed: int, position: int = 0) -> torch.Generator:
    """A CPU generator started at a stream seed (see ``stream_seed``), past its first
    ``position`` draws: where the stream of a sequence that has sampled ``position`` tokens
    stands (the stream position is the step count)."""
    generator = torch.Generator(device="cpu")
    generator.manual_seed(seed)
    for _ in range(position):
        torch.rand((), generator=generator, dtype=torch.float64)  # as `_draw_uniforms` draws
    return generator


def pad_history(sequences: Sequence[Sequence[int]]) -> torch.Tensor:
    """Stack per-sequence token lists into a ``[B, L]`` int64 tensor padded with HISTORY_PAD."""
    width = max((len(seq) for seq in sequences), default=0)
    history = torch.full((len(sequences), width), HISTORY_PAD, dtype=torch.int64)  # [B, L]
    for row, seq in enumerate(sequences):
        if seq:
            history[row, : len(seq)] = torch.as_tensor(list(seq), dtype=torch.int64)
    return history


def apply_repetition_penalty(
    logits: torch.Tensor, history: torch.Tensor, penalty: float
) -> torch.Tensor:
    """Penalise every token id present in ``history`` (prompt + generated tokens so far).

    As in transformers' ``RepetitionPenaltyLogitsProcessor`` and llama.cpp: a positive logit is
    divided by ``penalty``, a negative one multiplied, once per distinct token however often it
    occurred. ``history`` is ``[B, L]`` int64 padded with HISTORY_PAD. Returns a new tensor.
    """
    batch, vocab = logits.shape
    if history.dim() != 2 or history.shape[0] != batch:
        raise ValueError(
            f"history must be [B={batch}, L] token ids, got shape {tuple(history.shape)}"
        )
    if history.device.type == "cpu" and history.numel() > 0:
        # Checked only on CPU: on an accelerator this would cost a host sync every step.
        low, high = int(history.min()), int(history.max())
        if low < HISTORY_PAD or high >= vocab:
            raise ValueError(
                f"history holds token ids outside [0, {vocab}) (min {low}, max {high}); "
                f"pad with {HISTORY_PAD}"
            )
    history = history.to(logits.device)
    # Padding points at a spare column V that is dropped afterwards, so scatter never needs
    # to write both True and False to the same slot.
    index = torch.where(history == HISTORY_PAD, vocab, history)  # [B, L]
    present = torch.zeros(batch, vocab + 1, dtype=torch.bool, device=logits.device)
    present.scatter_(1, index, True)
    present = present[:, :vocab]  # [B, V]
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)  # [B, V]
    return torch.where(present, penalized, logits)


def apply_logit_bias(logits: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """`logits` ``[B, V]`` with ``params.logit_bias`` added to its token columns (every row)."""
    ids, values = params.bias()
    index = torch.tensor(ids, dtype=torch.int64, device=logits.device)  # [K]
    bias = torch.tensor(values, dtype=logits.dtype, device=logits.device)  # [K]
    return logits.index_add(1, index, bias.expand(logits.shape[0], -1))


def apply_penalties(logits: torch.Tensor, generated: torch.Tensor, params: GenerationParams) -> torch.Tensor:
    """OpenAI's presence and frequency penalties: ``logit - count * frequency_penalty -
    (count > 0) * presence_penalty``, with ``count`` a token's occurrences in ``generated``
    (``[B, L]`` int64 padded with HISTORY_PAD: the tokens generated so far). Returns a new tensor."""
    batch, vocab = logits.shape
    index = torch.where(generated == HISTORY_PAD, vocab, generated).to(logits.device)  # [B, L]
    counts = torch.zeros(batch, vocab + 1, dtype=logits.dtype, device=logits.device)
    counts.scatter_add_(1, index, torch.ones_like(index, dtype=logits.dtype))
    counts = counts[:, :vocab]  # [B, V]
    return logits - counts * params.frequency_penalty - (counts > 0).to(logits.dtype) * params.presence_penalty


def _top_k_keep_sorted(sorted_logits: torch.Tensor, k: int) -> torch.Tensor:
    """Keep mask for descending-sorted logits ``[B, V]``: the first k, plus ties with the k-th."""
    kth = sorted_logits[:, k - 1 : k]  # [B, 1]
    return sorted_logits >= kth


def _top_p_keep_sorted(sorted_logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Keep mask for descending-sorted logits ``[B, V]``: the shortest prefix with mass >= p.

    A token is kept when the mass strictly before it is < p, and the token that crosses p is
    kept too (llama.cpp and transformers agree on this). The top token is kept whatever p is:
    a p below float32's smallest value would otherwise compare as 0 and keep nothing.
    """
    probs = torch.softmax(sorted_logits, dim=-1)  # [B, V]
    mass_before = torch.cumsum(probs, dim=-1) - probs  # [B, V]
    keep = mass_before < top_p  # [B, V]
    keep[:, 0] = True
    return keep


def _min_p_keep_sorted(sorted_logits: torch.Tensor, min_p: float) -> torch.Tensor:
    """Keep mask for descending-sorted logits ``[B, V]``: p_i >= min_p * p_max.

    Written on logits (l_i - l_max >= log(min_p)) as llama.cpp does: it is the same condition
    and needs no softmax.
    """
    return sorted_logits >= sorted_logits[:, :1] + math.log(min_p)


def _sort_desc(logits: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Sort ``[B, V]`` by descending logit; stable, so ties stay in token-id order."""
    return torch.sort(logits, dim=-1, descending=True, stable=True)


def tempered_probs(sorted_logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """Softmax of descending-sorted logits ``[B, V]`` at ``temperature`` > 0; float64 ``[B, V]``.

    Numerically safe for every finite positive temperature, down to the smallest float: the
    row maximum (column 0) is subtracted *before* dividing, so the top token's scaled logit is
    exactly 0 and the others are <= 0 (a tiny temperature sends them to -inf, i.e. greedy
    among the tied maxima) rather than inf - inf = NaN. The division is done in float64, where
    a Python float temperature cannot round to 0 as it can in float32 (below ~1e-45). float64
    also keeps the tail of a 262k-entry vocabulary from being lost to rounding in the CDF.
    Filtered-out tokens (-inf) stay at probability 0.
    """
    logits64 = sorted_logits.double()  # [B, V]
    shifted = logits64 - logits64[:, :1]  # [B, V], <= 0
    return torch.softmax(shifted / temperature, dim=-1)  # [B, V]


def _draw_uniforms(generators: Sequence[torch.Generator], device: torch.device) -> torch.Tensor:
    """One uniform in [0, 1) per row, each from its own row's generator; ``[B]`` float64."""
    uniforms = torch.stack(
        [torch.rand((), generator=gen, dtype=torch.float64) for gen in generators]
    )  # [B]
    if device.type == "cuda":
        # Pinned + non_blocking: a pageable copy would wait for the whole forward pass.
        return uniforms.pin_memory().to(device, non_blocking=True)
    return uniforms.to(device)


def candidates(logits: torch.Tensor, params: GenerationParams) -> tuple[torch.Tensor, torch.Tensor]:
    """The tokens that may be drawn: logits ``[B, V]`` sorted by descending logit (ties in
    token order) with the filtered-out ones at -inf, and the sort order ``[B, V]`` (column j
    of a row is token ``order[j]``). The filters run in llama.cpp's order, each on the
    previous one's result (removed tokens at -inf), so top-p measures mass over the top-k
    survivors; the top token always survives."""
    vocab = logits.shape[-1]
    sorted_logits, order = _sort_desc(logits)  # [B, V], [B, V]
    if 0 < params.top_k < vocab:
        keep = _top_k_keep_sorted(sorted_logits, params.top_k)
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    if params.top_p < 1.0:
        keep = _top_p_keep_sorted(sorted_logits, params.top_p)
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    if params.min_p > 0.0:
        keep = _min_p_keep_sorted(sorted_logits, params.min_p)
        sorted_logits = sorted_logits.masked_fill(~keep, float("-inf"))
    return sorted_logits, order


def sample(
    logits: torch.Tensor,
    params: GenerationParams,
    generators: Sequence[torch.Generator] | None = None,
    history: torch.Tensor | None = None,
    generated: torch.Tensor | None = None,
) -> torch.Tensor:
    """Choose the next token of each row of ``logits`` ``[B, V]``; returns int64 ``[B]``.

    ``generators[b]`` is row b's own generator (see ``make_generator``); it may be None only
    for greedy decoding. ``history`` (``[B, L]`` int64 padded with HISTORY_PAD, see
    ``pad_history``: prompt and generated tokens) is needed only when
    ``params.repetition_penalty != 1``, ``generated`` (the same, generated tokens only) only
    when presence or frequency penalties are set. The result lives on the logits' device.
    """
    if logits.dim() != 2:
        raise ValueError(f"logits must be [B, V], got shape {tuple(logits.shape)}")
    batch = logits.shape[0]
    logits = logits.float()
    if params.logit_bias:
        logits = apply_logit_bias(logits, params)
    if params.repetition_penalty != 1.0:
        if history is None:
            raise ValueError(
                f"repetition_penalty={params.repetition_penalty} needs the token history"
            )
        logits = apply_repetition_penalty(logits, history, params.repetition_penalty)
    if params.penalized:
        if generated is None:
            raise ValueError("presence_penalty and frequency_penalty need the generated tokens")
        logits = apply_penalties(logits, generated, params)
    if params.greedy:
        return logits.argmax(dim=-1)  # [B]
    if generators is None or len(generators) != batch:
        got = "none" if generators is None else len(generators)
        raise ValueError(f"sampling needs one generator per row: {batch} rows, got {got}")

    sorted_logits, order = candidates(logits, params)  # [B, V], [B, V]
    probs = tempered_probs(sorted_logits, params.temperature)  # [B, V] float64
    cdf = torch.cumsum(probs, dim=-1)  # [B, V]
    uniforms = _draw_uniforms(generators, logits.device)  # [B]
    target = (uniforms * cdf[:, -1]).unsqueeze(-1)  # [B, 1]
    pos = torch.searchsorted(cdf, target, right=True)  # [B, 1]
    # Rounding can put the target at the very end of the CDF; clamp to the last token that
    # has any probability so a filtered-out token can never be returned.
    last_live = (probs > 0).sum(dim=-1, keepdim=True) - 1  # [B, 1]
    pos = torch.minimum(pos, last_live)
    return order.gather(1, pos).squeeze(-1)  # [B]
