"""The real default model, SmolLM2-135M-Instruct Q4_1: ppinfer's fp32 logits equal
transformers' (through its own GGUF loader, which dequantizes with gguf-py as ppinfer does),
cached decode equals recompute, and a two-stage split equals the whole model.

Each model is loaded once per module (module-scoped fixtures).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, load_with_gguf_loader
from stage_runner import arange_positions, build, chained_logits, full_logits, step, whole

from ppinfer.model import PipelineStage

pytestmark = pytest.mark.slow

# llama.cpp's ids for "The year 2024 has 365 days." in SmolLM2's vocabulary
# (tests/fixtures/tokenizer_llamacpp.json).
IDS = np.array([[504, 713, 216, 34, 32, 34, 36, 553, 216, 35, 38, 37, 2009, 30]], dtype=np.int64)
N_LAYER = 30


@pytest.fixture(scope="module")
def reference(smollm2_path: Path) -> np.ndarray:
    """transformers' fp32 logits [1, T, V]."""
    model = load_with_gguf_loader(smollm2_path, None)
    assert model.config.num_hidden_layers == N_LAYER
    return hf_logits(model, IDS)


@pytest.fixture(scope="module")
def stage(smollm2_path: Path) -> PipelineStage:
    return whole(smollm2_path, N_LAYER)


def test_logits_match_transformers(reference: np.ndarray, stage: PipelineStage) -> None:
    got = full_logits(stage, IDS)
    assert got.shape == reference.shape == (1, IDS.shape[1], 49152)
    gap = float(np.abs(got - reference).max())
    assert gap <= 1e-3, f"max |Δlogit| = {gap:.3g} (logits up to {np.abs(reference).max():.1f})"
    assert (got.argmax(-1) == reference.argmax(-1)).all()


def test_cached_decode_equals_recompute(stage: PipelineStage) -> None:
    expected = full_logits(stage, IDS)  # [1, T, V]
    tokens, prompt = torch.from_numpy(IDS), 6
    state = stage.new_cache(batch=1, max_len=32)
    got = [step(stage, tokens[:, :prompt], arange_positions(1, prompt), state)]
    for t in range(prompt, IDS.shape[1]):
        got.append(step(stage, tokens[:, t : t + 1], arange_positions(1, 1, offset=t), state))
    gap = float(np.abs(np.concatenate(got, axis=1) - expected).max())
    assert gap <= 1e-4, f"cached decode differs from recompute by {gap:.3g}"


def test_two_stages_equal_whole(smollm2_path: Path, stage: PipelineStage) -> None:
    stages = [build(smollm2_path, 0, 10, N_LAYER), build(smollm2_path, 10, N_LAYER, N_LAYER)]
    gap = float(np.abs(chained_logits(stages, IDS) - full_logits(stage, IDS)).max())
    assert gap <= 1e-5, f"stages [0,10)+[10,30) differ from the whole model by {gap:.3g}"
