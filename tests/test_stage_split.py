"""Splitting a model into stages changes nothing: stages [0,k) then [k,L) chained in one
process equal the whole model, for every cut, on tied and untied files; and stage-only
methods refuse to run on the wrong stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stage_runner import arange_positions, build, chained_logits, full_logits, whole
from tiny_cases import ALL_CASES, TinyFiles, token_batch

TOLERANCE = 1e-6

SPLIT_CASES = [
    "llama_tied",  # 4 layers, tied: the last stage must load token_embd as its output head
    "gemma2",  # 4 layers, tied, sliding layers 0 and 2, softcaps
    "phi2",  # never tied, output bias, parallel block
    "qwen3",  # key_length != E/H
    "llama_q4_1",  # quantized storage (the first stage may keep its embedding quantized)
]


def _splits(n_layer: int) -> list[list[tuple[int, int]]]:
    """Every two-stage cut, plus one-layer-per-stage when there are more than two layers."""
    out = [[(0, k), (k, n_layer)] for k in range(1, n_layer)]
    if n_layer > 2:
        out.append([(i, i + 1) for i in range(n_layer)])
    return out


@pytest.mark.parametrize("case", SPLIT_CASES)
def test_chained_stages_equal_whole_model(tiny_files: TinyFiles, case: str) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec, seed=1)
    expected = full_logits(whole(path, spec.n_layer), ids)
    for bounds in _splits(spec.n_layer):
        stages = [build(path, a, b, spec.n_layer) for a, b in bounds]
        gap = float(np.abs(chained_logits(stages, ids) - expected).max())
        assert gap <= TOLERANCE, f"{case} split {bounds}: max |Δlogit| = {gap:.3g}"


def test_stage_only_methods_refuse_wrong_stage(tiny_files: TinyFiles) -> None:
    spec, path = ALL_CASES["llama_tied"], tiny_files.path("llama_tied")
    first, middle, last = (build(path, a, b, spec.n_layer) for a, b in ((0, 1), (1, 3), (3, 4)))
    ids = torch.from_numpy(token_batch(spec, length=3))  # [2, 3]
    hidden = first.embed(ids)  # [2, 3, E]
    for stage in (middle, last):
        with pytest.raises(RuntimeError):
            stage.embed(ids)
    for stage in (first, middle):
        with pytest.raises(RuntimeError):
            stage.lm_head(hidden)


@pytest.mark.parametrize("case", ["llama_tied", "gemma2"])
def test_chained_stages_decode_with_own_states(tiny_files: TinyFiles, case: str) -> None:
    """Prefill then token-by-token decode through stages [0,1) [1,3) [3,4), each holding its
    own KV state, equals the whole model's full recompute."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec, seed=5)  # [2, 20]
    expected = full_logits(whole(path, spec.n_layer), ids)
    stages = [build(path, a, b, spec.n_layer) for a, b in ((0, 1), (1, 3), (3, 4))]
    states = [s.new_cache(batch=2, max_len=24) for s in stages]
    tokens, prompt = torch.from_numpy(ids), 7
    chunks = [(0, prompt)] + [(t, t + 1) for t in range(prompt, ids.shape[1])]
    got = []
    with torch.no_grad():
        for a, b in chunks:
            hidden = stages[0].embed(tokens[:, a:b])
            for stage, state in zip(stages, states):
                hidden = stage.forward(hidden, arange_positions(2, b - a, offset=a), state)
            got.append(stages[-1].lm_head(hidden).numpy())
    gap = float(np.abs(np.concatenate(got, axis=1) - expected).max())
    assert gap <= 1e-5, f"{case}: pipelined decode differs from recompute by {gap:.3g}"
