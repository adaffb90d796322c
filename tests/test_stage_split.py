"""Splitting a model into stages changes nothing: stages [0,k) then [k,L) chained in one
process equal the whole model, for every cut, on tied and untied files; and stage-only
methods refuse to run on the wrong stage."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from stage_runner import build, chained_logits, full_logits, whole
from tiny_cases import ALL_CASES, TinyFiles, tiny_files, token_batch  # noqa: F401  (fixture)

TOLERANCE = 1e-6

SPLIT_CASES = [
    "llama_tied",  # 4 layers, tied: the last stage must load token_embd as its output head
    "gemma2",  # 4 layers, tied, sliding layers 0 and 2, softcaps
    "phi2",  # never tied, output bias, parallel block
    "qwen3",  # key_length != E/H
    "llama_q4_1",  # quantized: each stage dequantizes only its own tensors
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
