"""The second real model, gemma-3-270m Q4_K_M (K-quants, 262k-token SPM vocabulary, sliding
layers): ppinfer's fp32 logits equal transformers' (its own GGUF loader), and the greedy
continuation of a simple English prompt is the same as transformers' and says the obvious.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, load_with_gguf_loader
from stage_runner import full_logits, whole

import ppinfer

pytestmark = pytest.mark.slow

N_LAYER = 18
PROMPT = "The Eiffel Tower is located in the city of"
NEW_TOKENS = 8


@pytest.fixture(scope="module")
def models(gemma3_path: Path) -> tuple[object, object]:
    return load_with_gguf_loader(gemma3_path, None), whole(gemma3_path, N_LAYER)


def test_logits_match_transformers(gemma3_path: Path, models: tuple[object, object]) -> None:
    hf, stage = models
    ids = np.array([ppinfer.load_tokenizer(gemma3_path).encode(PROMPT)], dtype=np.int64)
    assert ids[0, 0] == 2  # gemma adds BOS, as llama.cpp does
    reference, got = hf_logits(hf, ids), full_logits(stage, ids)
    gap = float(np.abs(got - reference).max())
    assert gap <= 1e-3, f"max |Δlogit| = {gap:.3g}"


def test_greedy_continuation_is_fluent(gemma3_path: Path, models: tuple[object, object]) -> None:
    hf, stage = models
    tok = ppinfer.load_tokenizer(gemma3_path)
    ids = tok.encode(PROMPT)
    ours, theirs = list(ids), list(ids)
    for _ in range(NEW_TOKENS):
        ours.append(int(full_logits(stage, np.array([ours]))[0, -1].argmax()))
        with torch.no_grad():
            theirs.append(int(hf(torch.tensor([theirs])).logits[0, -1].argmax()))
    assert ours == theirs
    text = tok.decode(ours[len(ids):], skip_special=True)
    assert "Paris" in text, text
