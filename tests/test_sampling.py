"""Sampling: parameter checks, filter masks, greedy, seeded reproducibility, distributions.

References are hand-derived cases and transformers' logits processors (an independent
implementation), never this package's own output.
"""

from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from ppinfer.sampling.logprobs import token_logprobs
from ppinfer.sampling.params import GenerationParams
from ppinfer.sampling.sampler import (
    HISTORY_PAD,
    apply_logit_bias,
    apply_penalties,
    apply_repetition_penalty,
    candidates,
    make_generator,
    pad_history,
    sample,
    stream_generator,
)


def _keep(logits: torch.Tensor, **settings: float) -> torch.Tensor:
    """Bool [B, V] in token order: the tokens the sampler may draw under `settings` (the
    candidates it keeps; -inf inputs are never kept)."""
    sorted_logits, order = candidates(logits, GenerationParams(temperature=1.0, **settings))
    kept = torch.isfinite(sorted_logits)  # [B, V], sorted
    return torch.empty_like(kept).scatter_(1, order, kept)


def top_k_mask(logits: torch.Tensor, k: int) -> torch.Tensor:
    return _keep(logits, top_k=k)


def top_p_mask(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    return _keep(logits, top_p=top_p)


def min_p_mask(logits: torch.Tensor, min_p: float) -> torch.Tensor:
    return _keep(logits, min_p=min_p)


def _kept(mask: torch.Tensor) -> set[int]:
    """Token ids of row 0 of a keep mask."""
    return set(torch.nonzero(mask[0]).flatten().tolist())


def _logits_from_probs(probs: list[float]) -> torch.Tensor:
    return torch.tensor([[math.log(p) for p in probs]], dtype=torch.float32)  # [1, V]


# --- parameters ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("temperature", -0.5),
        ("temperature", float("nan")),
        ("temperature", float("inf")),
        ("top_k", -1),
        ("top_p", 0.0),
        ("top_p", 1.5),
        ("min_p", -0.1),
        ("min_p", 1.2),
        ("repetition_penalty", 0.0),
        ("repetition_penalty", 1e-300),
        ("repetition_penalty", 1e300),
        ("top_k", 2**63),
        ("repetition_penalty", -1.0),
        ("repetition_penalty", float("inf")),
        ("repetition_penalty", float("nan")),
        ("top_p", float("nan")),
        ("min_p", float("inf")),
        ("seed", -3),
    ],
)
def test_invalid_params_name_field_and_value(field: str, value: float) -> None:
    with pytest.raises(ValueError) as info:
        GenerationParams(**{field: value}).checked()
    assert field in str(info.value)
    assert repr(value) in str(info.value)


def test_defaults_are_greedy_and_valid() -> None:
    params = GenerationParams().checked()
    assert params.greedy
    assert not GenerationParams(temperature=0.8).checked().greedy


# --- masks on hand-made distributions -----------------------------------------------------


def test_top_k_mask_hand_cases() -> None:
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0, 0.0]])
    assert _kept(top_k_mask(logits, 2)) == {1, 2}
    assert _kept(top_k_mask(logits, 1)) == {1}
    assert _kept(top_k_mask(logits, 0)) == {0, 1, 2, 3, 4}  # 0 = off
    assert _kept(top_k_mask(logits, 9)) == {0, 1, 2, 3, 4}
    # Ties with the k-th value are kept, as transformers' TopKLogitsWarper does.
    tied = torch.tensor([[3.0, 1.0, 3.0, 3.0]])
    assert _kept(top_k_mask(tied, 2)) == {0, 2, 3}


def test_top_p_mask_hand_cases() -> None:
    # Sorted: id1 0.5, id2 0.25, id3 0.15, id0 0.1 -> mass before: 0, .5, .75, .9
    logits = _logits_from_probs([0.1, 0.5, 0.25, 0.15])
    assert _kept(top_p_mask(logits, 0.45)) == {1}
    assert _kept(top_p_mask(logits, 0.6)) == {1, 2}
    assert _kept(top_p_mask(logits, 0.8)) == {1, 2, 3}
    assert _kept(top_p_mask(logits, 0.95)) == {0, 1, 2, 3}
    assert _kept(top_p_mask(logits, 1.0)) == {0, 1, 2, 3}
    # The most likely token survives even a tiny top_p.
    assert _kept(top_p_mask(logits, 1e-6)) == {1}


def test_min_p_mask_hand_cases() -> None:
    logits = _logits_from_probs([0.5, 0.2, 0.05, 0.25])
    assert _kept(min_p_mask(logits, 0.3)) == {0, 1, 3}  # threshold 0.15
    assert _kept(min_p_mask(logits, 0.45)) == {0, 3}  # threshold 0.225
    assert _kept(min_p_mask(logits, 0.0)) == {0, 1, 2, 3}
    assert _kept(min_p_mask(logits, 1.0)) == {0}


def _transformers_keep(warper: object, logits: torch.Tensor) -> torch.Tensor:
    dummy_ids = torch.zeros(logits.shape[0], 1, dtype=torch.long)
    return torch.isfinite(warper(dummy_ids, logits.clone()))  # type: ignore[operator]


@pytest.mark.parametrize("value", [0.3, 0.7, 0.9])
def test_masks_match_transformers_on_random_logits(value: float) -> None:
    generator = torch.Generator().manual_seed(1234)
    logits = torch.randn(8, 300, generator=generator) * 3.0  # [B, V]
    k = int(value * 100)
    assert torch.equal(top_k_mask(logits, k), _transformers_keep(TopKLogitsWarper(k), logits))
    assert torch.equal(
        top_p_mask(logits, value), _transformers_keep(TopPLogitsWarper(value), logits)
    )
    min_p = value / 10
    assert torch.equal(
        min_p_mask(logits, min_p), _transformers_keep(MinPLogitsWarper(min_p), logits)
    )


# --- repetition penalty -------------------------------------------------------------------


def test_repetition_penalty_hand_case() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 3.0, -0.5]])
    # Row 0 saw tokens 0 and 1 (1 twice: penalised once); row 1 saw only token 3.
    history = pad_history([[0, 1, 1], [3]])
    assert history.tolist() == [[0, 1, 1], [3, HISTORY_PAD, HISTORY_PAD]]
    out = apply_repetition_penalty(logits, history, 2.0)
    expected = torch.tensor([[1.0, -2.0, 0.5, 3.0, -0.5], [2.0, -1.0, 0.5, 1.5, -0.5]])
    assert torch.equal(out, expected)


def test_repetition_penalty_changes_greedy_choice() -> None:
    logits = torch.tensor([[3.0, 2.0]])
    params = GenerationParams(repetition_penalty=2.0)
    # 3.0 / 2 = 1.5 < 2.0, so the repeated token 0 loses to token 1.
    assert sample(logits, params, history=pad_history([[0]])).tolist() == [1]
    assert sample(logits, GenerationParams()).tolist() == [0]


def test_repetition_penalty_matches_transformers() -> None:
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, generator=generator)  # [B, V]
    history = torch.randint(0, 40, (3, 12), generator=generator)  # [B, L], no padding
    reference = RepetitionPenaltyLogitsProcessor(1.3)(history, logits.clone())
    assert torch.equal(apply_repetition_penalty(logits, history, 1.3), reference)


def test_repetition_penalty_rejects_out_of_range_ids() -> None:
    with pytest.raises(ValueError, match="40"):
        apply_repetition_penalty(torch.zeros(1, 40), torch.tensor([[3, 40]]), 1.2)
    with pytest.raises(ValueError, match="history"):
        sample(torch.zeros(1, 4), GenerationParams(repetition_penalty=1.2))


# --- greedy -------------------------------------------------------------------------------


def test_greedy_is_argmax_and_uses_no_randomness() -> None:
    logits = torch.randn(5, 1000, generator=torch.Generator().manual_seed(0))
    generators = [make_generator(0, i) for i in range(5)]
    states = [gen.get_state() for gen in generators]
    tokens = sample(logits, GenerationParams(temperature=0.0, top_k=3), generators)
    assert tokens.dtype == torch.int64
    assert torch.equal(tokens, logits.argmax(dim=-1))
    assert all(torch.equal(gen.get_state(), s) for gen, s in zip(generators, states))


def test_sampling_requires_one_generator_per_row() -> None:
    logits = torch.zeros(2, 4)
    with pytest.raises(ValueError, match="one generator per row"):
        sample(logits, GenerationParams(temperature=1.0))
    with pytest.raises(ValueError, match="2 rows, got 1"):
        sample(logits, GenerationParams(temperature=1.0), [make_generator(0, 0)])


# --- seeded reproducibility ---------------------------------------------------------------

_STEPS = 24
_VOCAB = 64
_PARAMS = GenerationParams(temperature=1.3, top_k=40, top_p=0.95, min_p=0.01, seed=11)


def _step_logits(index: int) -> torch.Tensor:
    """Fixed per-sequence logits for every step: ``[_STEPS, V]``, flat enough to vary."""
    return torch.randn(_STEPS, _VOCAB, generator=torch.Generator().manual_seed(100 + index))


def _run(params: GenerationParams, indices: list[int]) -> dict[int, list[int]]:
    """Sample _STEPS tokens for a batch whose row b is sequence indices[b], each sequence
    with its own generator from (seed, its index), as the last stage keeps them."""
    per_seq = {index: _step_logits(index) for index in indices}
    generators = {index: make_generator(params.seed, index) for index in indices}
    out: dict[int, list[int]] = {index: [] for index in indices}
    for step in range(_STEPS):
        logits = torch.stack([per_seq[index][step] for index in indices])  # [B, V]
        tokens = sample(logits, params, [generators[index] for index in indices])
        for index, token in zip(indices, tokens.tolist()):
            out[index].append(token)
    return out


def test_sequence_tokens_do_not_depend_on_batch_row_or_neighbours() -> None:
    alone = _run(_PARAMS, [3])[3]
    in_batch = _run(_PARAMS, [7, 3, 0, 12])[3]
    other_batch = _run(_PARAMS, [3, 5])[3]
    assert alone == in_batch == other_batch
    assert len(set(alone)) > 5  # really sampled, not stuck on one token


def test_same_seed_repeats_and_different_seed_differs() -> None:
    first = _run(_PARAMS, [0, 1])
    again = _run(_PARAMS, [0, 1])
    reseeded = _run(dataclasses.replace(_PARAMS, seed=12), [0, 1])
    assert first == again
    assert first[0] != reseeded[0]
    assert first[1] != reseeded[1]
    # Two sequences of one run get different streams even with the same logits.
    gen_a, gen_b = make_generator(11, 0), make_generator(11, 1)
    assert torch.rand(8, generator=gen_a).tolist() != torch.rand(8, generator=gen_b).tolist()


# --- distributions ------------------------------------------------------------------------


def _counts(logits_row: list[float], params: GenerationParams, draws: int) -> list[int]:
    """Sample ``draws`` rows of the same logits, each row with its own generator."""
    logits = torch.tensor([logits_row]).expand(draws, -1)  # [N, V]
    generators = [make_generator(params.seed, i) for i in range(draws)]
    tokens = sample(logits, params, generators)
    return torch.bincount(tokens, minlength=len(logits_row)).tolist()


def _chi_square(counts: list[int], probs: list[float]) -> float:
    total = sum(counts)
    return sum((c - total * p) ** 2 / (total * p) for c, p in zip(counts, probs))


def test_temperature_gives_the_softmax_distribution() -> None:
    logits_row = [2.0, 1.0, 0.5, 0.0, -1.0]
    temperature = 0.7
    weights = [math.exp(x / temperature) for x in logits_row]
    expected = [w / sum(weights) for w in weights]
    untempered = [math.exp(x) / sum(math.exp(y) for y in logits_row) for x in logits_row]
    counts = _counts(logits_row, GenerationParams(temperature=temperature, seed=3), 4000)
    # df = 4: the 99.9% quantile is 18.47. The seed is fixed, so this cannot flake.
    assert _chi_square(counts, expected) < 18.47
    # ...and the statistic is sensitive enough to tell temperature 0.7 from 1.0.
    assert _chi_square(counts, untempered) > 100


@pytest.mark.parametrize("temperature", [1e-40, 1e-50, 5e-324])
def test_tiny_temperature_samples_the_argmax(temperature: float) -> None:
    # 1e-40 is a float32 denormal and 1e-50 rounds to 0 in float32: dividing the logits by
    # either used to give inf - inf = NaN in the softmax and an out-of-bounds index.
    logits = torch.randn(6, 100, generator=torch.Generator().manual_seed(4)) * 3.0  # [B, V]
    params = GenerationParams(temperature=temperature, top_k=40, seed=2)
    tokens = sample(logits, params, [make_generator(2, i) for i in range(6)])
    assert torch.equal(tokens, logits.argmax(dim=-1))


def test_tiny_temperature_draws_among_tied_maxima_only() -> None:
    logits = torch.tensor([[1.0, 5.0, 2.0, 5.0, 4.999]]).expand(400, -1)  # [N, V]
    tokens = sample(logits, GenerationParams(temperature=1e-30), [make_generator(0, i) for i in range(400)])
    counts = torch.bincount(tokens, minlength=5).tolist()
    assert counts[0] == counts[2] == counts[4] == 0
    assert counts[1] > 150 and counts[3] > 150


def test_top_p_is_applied_before_temperature() -> None:
    # At T=1 the probabilities are 0.5/0.3/0.2, so top_p=0.7 keeps tokens 0 and 1. Applying
    # T=10 first (transformers' order) would flatten them to ~1/3 each and keep all three.
    logits_row = [math.log(0.5), math.log(0.3), math.log(0.2)]
    counts = _counts(logits_row, GenerationParams(temperature=10.0, top_p=0.7, seed=9), 2000)
    assert counts[2] == 0
    # Within the nucleus T=10 makes them nearly even: (0.5/0.3)**0.1 ~ 1.05.
    assert counts[0] > 900 and counts[1] > 900


def test_sampled_tokens_always_survive_the_filters() -> None:
    generator = torch.Generator().manual_seed(77)
    for trial in range(20):
        logits = torch.randn(4, 50, generator=generator) * 2.0  # [B, V]
        params = GenerationParams(temperature=1.5, top_k=10, top_p=0.8, min_p=0.05, seed=trial)
        masked = logits.masked_fill(~top_k_mask(logits, 10), float("-inf"))
        masked = masked.masked_fill(~top_p_mask(masked, 0.8), float("-inf"))
        allowed = min_p_mask(masked, 0.05) & torch.isfinite(masked)  # [B, V]
        tokens = sample(logits, params, [make_generator(trial, i) for i in range(4)])
        assert allowed.gather(1, tokens.unsqueeze(1)).all()


@pytest.mark.parametrize("settings", [
    {"top_p": 1e-300},
    {"top_p": 5e-324, "top_k": 1},
    {"min_p": 1.0},
    {"top_p": 1e-300, "min_p": 1.0, "top_k": 2**31 - 1},
    {"repetition_penalty": 1e-3, "top_p": 1e-45},
    {"repetition_penalty": 1e3, "temperature": 1e-300},
    {"temperature": 1e300},
])
def test_the_most_extreme_valid_settings_always_leave_a_token(settings: dict) -> None:
    """Every value the bounds admit samples some token: the filters never drop them all."""
    generator = torch.Generator().manual_seed(5)
    logits = torch.randn(3, 40, generator=generator) * 8.0  # [B, V]
    history = torch.tensor([[int(logits[0].argmax()), 1], [2, 3], [4, -1]])  # [B, L]
    params = GenerationParams(**{"temperature": 1.0, **settings}).checked()
    tokens = sample(logits, params, [make_generator(0, i) for i in range(3)], history)
    assert tokens.shape == (3,) and ((tokens >= 0) & (tokens < 40)).all()
    only_the_top = params.top_p < 1e-40 or params.min_p == 1.0
    if only_the_top and params.repetition_penalty == 1.0:
        assert torch.equal(tokens, logits.argmax(dim=-1))


def test_presence_and_frequency_penalties_hand_case() -> None:
    """OpenAI's formula, worked by hand: logit - count * frequency - (count > 0) * presence,
    counting the generated tokens of each row only."""
    logits = torch.tensor([[1.0, 2.0, 3.0, 4.0], [0.5, 0.5, 0.5, 0.5]])
    generated = torch.tensor([[3, 3, 1, HISTORY_PAD], [0, HISTORY_PAD, HISTORY_PAD, HISTORY_PAD]])
    params = GenerationParams(presence_penalty=0.5, frequency_penalty=0.25)
    out = apply_penalties(logits, generated, params)
    # row 0: token 1 seen once: 2 - 0.25 - 0.5; token 3 twice: 4 - 0.5 - 0.5; row 1: token 0 once
    expected = torch.tensor([[1.0, 1.25, 3.0, 3.0], [-0.25, 0.5, 0.5, 0.5]])
    torch.testing.assert_close(out, expected)
    negative = apply_penalties(logits, generated, GenerationParams(presence_penalty=-1.0, frequency_penalty=-2.0))
    torch.testing.assert_close(negative[0], torch.tensor([1.0, 2.0 + 2.0 + 1.0, 3.0, 4.0 + 4.0 + 1.0]))


def test_penalties_change_the_greedy_choice_and_need_the_generated_tokens() -> None:
    logits = torch.tensor([[2.0, 1.9, 0.0]])
    generated = pad_history([[0]])
    assert sample(logits, GenerationParams()).item() == 0
    assert sample(logits, GenerationParams(presence_penalty=0.2), generated=generated).item() == 1
    assert sample(logits, GenerationParams(frequency_penalty=0.05), generated=generated).item() == 0
    assert sample(logits, GenerationParams(frequency_penalty=0.05), generated=pad_history([[0, 0, 0]])).item() == 1
    with pytest.raises(ValueError, match="generated tokens"):
        sample(logits, GenerationParams(frequency_penalty=0.5))


def test_logit_bias_hand_case() -> None:
    logits = torch.tensor([[0.0, 1.0, 2.0], [5.0, 1.0, 2.0]])
    params = GenerationParams(logit_bias={"0": 1.5, "2": -100.0})
    torch.testing.assert_close(apply_logit_bias(logits, params), torch.tensor([[1.5, 1.0, -98.0], [6.5, 1.0, -98.0]]))
    assert sample(logits, params).tolist() == [0, 0]
    assert sample(logits, GenerationParams(logit_bias={"1": 100.0})).tolist() == [1, 1]
    with pytest.raises(ValueError, match="logit_bias='3': token id outside the vocabulary"):
        params.updated({"logit_bias": {"3": 1}}).check_vocabulary(3)


def test_logprobs_are_the_log_softmax_with_the_top_k() -> None:
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.0]])
    total = math.log(sum(math.exp(v) for v in (1.0, 3.0, 2.0, 0.0)))
    (entry,) = token_logprobs(logits, torch.tensor([2]), 2)
    assert entry.token == 2 and entry.logprob == pytest.approx(2.0 - total)
    assert [t for t, _ in entry.top] == [1, 2]
    assert [v for _, v in entry.top] == pytest.approx([3.0 - total, 2.0 - total])
    assert token_logprobs(logits, torch.tensor([0]), 0)[0].top == ()


@pytest.mark.parametrize("field, value", [
    ("presence_penalty", 2.5), ("frequency_penalty", -2.01), ("logit_bias", {"x": 1}), ("logit_bias", {"1": 100.5}),
    ("logprobs", 21), ("prompt_logprobs", -1),
])
def test_new_settings_are_bounded(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=f"^{field}"):
        GenerationParams().updated({field: value})


@pytest.mark.parametrize("settings", [{"temperature": 0.8}, {"temperature": 1.0, "top_k": 3, "top_p": 0.9}])
def test_a_stream_resumed_at_a_position_draws_what_the_sampler_would_draw_next(settings: dict) -> None:
    """`stream_generator(seed, n)` stands where a stream stands after `n` sampled tokens (how
    the last stage resumes a preempted sequence): the tokens sampled from it next equal those
    of the stream that sampled the first `n`."""
    params = GenerationParams(**settings)
    logits = torch.randn(12, 1, 50, generator=torch.Generator().manual_seed(4))  # [steps, 1, V]
    running = stream_generator(99)
    tokens = [int(sample(step, params, [running])[0]) for step in logits]
    resumed = stream_generator(99, 7)
    assert [int(sample(step, params, [resumed])[0]) for step in logits[7:]] == tokens[7:]
    fresh = stream_generator(99)
    assert [int(sample(step, params, [fresh])[0]) for step in logits[7:]] != tokens[7:], "position not tested"
