"""Every family, quirk and storage type: ppinfer's whole-model logits equal transformers'.

The reference for each tiny file is built by `hf_reference.reference_model` (transformers'
GGUF loader where it reads the file, hand-mapped transformers modules otherwise); quantized
files are compared with the reference built on the same file, which dequantizes with gguf-py
just as ppinfer does, so the same 1e-4 bound applies to them.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from ggufgen import encoded_tensors, write_gguf
from hf_reference import hf_logits, reference_model
from stage_runner import arange_positions, full_logits, step, whole
from tiny_cases import ALL_CASES, FAMILY_CASES, QUANT_CASES, QUIRK_CASES, TinyFiles, token_batch

from ppinfer.errors import ModelFileError
from ppinfer.families import get_spec
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


@pytest.mark.parametrize(
    "case", [*FAMILY_CASES, "qwen3_rope_yarn", "llama_rope_yarn_attn_factor", "phi3_longrope_long"]
)
def test_token_by_token_decode_matches_transformers(tiny_files: TinyFiles, case: str) -> None:
    """Every step a single token: on float32 CPU stages each layer's rotation, cache write and
    attention run as one fused op (ppinfer.kernels.fused); the reference is transformers' whole
    sequence."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)  # [2, 20, V]
    stage = whole(path, spec.n_layer)
    assert any(getattr(m, "_attend_op", None) for m in stage.modules()) == fused.available(stage.device, stage.dtype)
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
    assert not any(getattr(m, "_attend_op", None) or getattr(m, "_fused", None) for m in stage.modules())
    expected = hf_logits(reference_model(path, spec), ids)
    got = _decoded_one_token_at_a_time(stage, ids)
    assert float(np.abs(got - expected).max()) <= TOLERANCE


def test_longrope_factors_are_chosen_by_the_context_as_llama_cpp_does(tiny_files: TinyFiles) -> None:
    """A file whose context (128) exceeds longrope's original one (16) takes the long factors
    for every sequence, as llama.cpp does (it decides by the context per sequence);
    transformers decides by the longest position of each forward, so on 16 tokens it takes the
    short ones and the two differ there, while on 20 tokens they agree (the test above)."""
    case = "phi3_longrope_long"
    spec, path = ALL_CASES[case], tiny_files.path(case)
    stage = whole(path, spec.n_layer)
    factor = (1 + np.log(8) / np.log(16)) ** 0.5  # the converter's attention factor, in the file
    assert [layer.attn.rope.mscale for layer in stage.layers] == pytest.approx([factor] * spec.n_layer)
    ids = token_batch(spec)  # [2, 20]
    short = ids[:, :16]
    assert float(np.abs(full_logits(stage, short) - full_logits(stage, ids)[:, :16]).max()) <= 1e-5
    reference = reference_model(path, spec)
    assert float(np.abs(full_logits(stage, short) - hf_logits(reference, short)).max()) > 0.1


def test_granite_rope_switch(tiny_files: TinyFiles, tmp_path: Path) -> None:
    """`granite.rope.scaling.finetuned`: false leaves every layer without rope, true (granitemoe's
    file) or absent (granite's) ropes every layer, as llama.cpp reads it; any other type is one
    error line naming the key and the value. Without rope, decoding one token at a time (the
    unfused attention: the fused decode op rotates) matches transformers too."""
    for case, roped in (("granite_nope", False), ("granitemoe", True), ("granite", True)):
        stage = whole(tiny_files.path(case), ALL_CASES[case].n_layer)
        assert [layer.attn.rope is not None for layer in stage.layers] == [roped] * ALL_CASES[case].n_layer, case
    spec, path = ALL_CASES["granite_nope"], tiny_files.path("granite_nope")
    ids = token_batch(spec)  # [2, 20]
    expected = hf_logits(reference_model(path, spec), ids)  # [2, 20, V]
    assert float(np.abs(_decoded_one_token_at_a_time(whole(path, spec.n_layer), ids) - expected).max()) <= TOLERANCE
    spec = ALL_CASES["granite"]
    path = write_gguf(
        tmp_path / "bad.gguf", spec, encoded_tensors(spec), extra={"granite.rope.scaling.finetuned": "false"}
    )
    with pytest.raises(ModelFileError, match=r"granite\.rope\.scaling\.finetuned='false' must be a boolean$"):
        whole(path, spec.n_layer)


def test_unsupported_architecture_lists_the_supported_ones() -> None:
    with pytest.raises(ModelFileError) as err:
        get_spec("alienlm", "x.gguf")
    message = str(err.value)
    assert "unsupported architecture 'alienlm'" in message and "\n" not in message
    for arch in ("llama", "qwen3moe", "deepseek2", "gpt-oss", "granite", "granitemoe", "llama4", "phi3"):
        assert f" {arch}," in message or message.endswith(f" {arch}")
