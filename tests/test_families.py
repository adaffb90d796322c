"""Every family, quirk and storage type: ppinfer's whole-model logits equal transformers'.

The reference for each tiny file is built by `hf_reference.reference_model` (transformers'
GGUF loader where it reads the file, hand-mapped transformers modules otherwise); quantized
files are compared with the reference built on the same file, which dequantizes with gguf-py
just as ppinfer does, so the same 1e-4 bound applies to them.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hf_reference import hf_logits, reference_model
from stage_runner import arange_positions, full_logits, step, whole
from tiny_cases import ALL_CASES, FAMILY_CASES, QUANT_CASES, QUIRK_CASES, TinyFiles, token_batch

from ppinfer.kernels import fused
from ppinfer.model import build_stage
from ppinfer.plan import StagePlan

TOLERANCE = 1e-4
"""Max |Δlogit| in fp32 (both sides compute the same float32 forward; ~1e-6 is typical)."""


def _check(tiny_files: TinyFiles, case: str, packed: bool | None = None) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)  # [2, 20, V]
    if packed is None:
        stage = whole(path, spec.n_layer)
    else:
        stage = build_stage(
            path, StagePlan.whole(spec.n_layer), torch.float32, "cpu", packed=packed, weights="dequantized"
        )
    got = full_logits(stage, ids)
    assert got.dtype == np.float32
    assert got.shape == expected.shape
    gap = float(np.abs(got - expected).max())
    argmax_agree = float((got.argmax(-1) == expected.argmax(-1)).mean())
    assert gap <= TOLERANCE, f"{case}: max |Δlogit| = {gap:.3g} (argmax agreement {argmax_agree:.0%})"


@pytest.mark.parametrize("case", list(FAMILY_CASES))
def test_family_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    _check(tiny_files, case)


@pytest.mark.parametrize("case", list(QUIRK_CASES))
def test_quirk_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    _check(tiny_files, case)


@pytest.mark.parametrize("case", list(QUANT_CASES))
def test_storage_type_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    _check(tiny_files, case)


@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("case", ["llama", "phi2", "gemma2"])
def test_plain_and_onednn_linear_layers_both_match(tiny_files: TinyFiles, case: str, packed: bool) -> None:
    """The default CPU path prepacks weights for oneDNN; the plain `F.linear` path (other
    devices and dtypes) must match the reference just the same."""
    _check(tiny_files, case, packed=packed)


def _decoded_one_token_at_a_time(stage, ids: np.ndarray) -> np.ndarray:
    """Logits [B, T, V] from T forwards of one token each (the decode step's path)."""
    batch, length = ids.shape
    state = stage.new_cache(batch=batch, max_len=length)
    tokens = torch.from_numpy(ids)
    return np.concatenate(
        [step(stage, tokens[:, i : i + 1], arange_positions(batch, 1, i), state) for i in range(length)], axis=1
    )


@pytest.mark.parametrize("case", [*FAMILY_CASES, "qwen3_rope_yarn", "llama_rope_yarn_attn_factor"])
def test_token_by_token_decode_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    """Every step a single token: on float32 CPU stages each layer's rotation, cache write and
    attention run as one fused op (ppinfer.kernels.fused); the reference is transformers' whole
    sequence."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)  # [2, 20, V]
    stage = whole(path, spec.n_layer)
    assert any(getattr(m, "_attend", None) for m in stage.modules()) == fused.available(stage.device, stage.dtype)
    got = _decoded_one_token_at_a_time(stage, ids)
    assert float(np.abs(got - expected).max()) <= TOLERANCE


@pytest.mark.parametrize("case", ["llama", "phi2", "gemma2", "gemma3", "qwen3_rope_yarn"])
def test_decode_without_the_fused_ops_matches_transformers(
    tiny_files: TinyFiles, case: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Where the kernel library cannot be built (or on other dtypes and devices) the same steps
    run as torch ops."""
    monkeypatch.setattr(fused, "available", lambda device, dtype: False)
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)
    stage = whole(path, spec.n_layer)
    assert not any(getattr(m, "_attend", None) or getattr(m, "_fused", None) for m in stage.modules())
    expected = hf_logits(reference_model(path, spec), ids)
    got = _decoded_one_token_at_a_time(stage, ids)
    assert float(np.abs(got - expected).max()) <= TOLERANCE
