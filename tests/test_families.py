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
from ppinfer.model import StagePlan, build_stage
from stage_runner import full_logits, whole
from tiny_cases import ALL_CASES, FAMILY_CASES, QUANT_CASES, QUIRK_CASES, TinyFiles, tiny_files, token_batch  # noqa: F401

TOLERANCE = 1e-4
"""Max |Δlogit| in fp32 (both sides compute the same float32 forward; ~1e-6 is typical)."""


def _check(tiny_files: TinyFiles, case: str, packed: bool | None = None) -> None:
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)  # [2, 20, V]
    if packed is None:
        stage = whole(path, spec.n_layer)
    else:
        stage = build_stage(path, StagePlan.whole(spec.n_layer), torch.float32, "cpu", packed=packed, weights="dequantized")
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
