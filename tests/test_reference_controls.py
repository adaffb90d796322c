"""Controls on the test side itself: the transformers references are right, and each quirk
file is sensitive to its quirk (switching it off in the reference moves the logits a lot).

These never import ppinfer. They make the family tests meaningful: a reference that agrees
with transformers' own GGUF loader, and a quirk whose omission a 1e-4 tolerance would catch.
"""

from __future__ import annotations

import numpy as np
import pytest
from ggufgen import TinySpec, with_changes
from hf_reference import hf_logits, load_by_hand, load_with_gguf_loader, loader_reads, reference_model
from tiny_cases import ALL_CASES, TinyFiles, token_batch
from transformers import PreTrainedModel

BITES = 0.05
"""A quirk 'bites' when ignoring it moves some logit by more than this (500x the tolerance)."""


def _max_gap(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).max())


def _logits(model: PreTrainedModel, spec: TinySpec) -> np.ndarray:
    return hf_logits(model, token_batch(spec))


LOADER_CASES = [c for c, s in ALL_CASES.items() if loader_reads(s)]


@pytest.mark.parametrize("case", LOADER_CASES)
def test_hand_mapping_equals_gguf_loader(tiny_files: TinyFiles, case: str) -> None:
    """Our GGUF -> transformers mapping (un-permute, Gemma -1, fused splits) is the loader's:
    this validates the hand route used for phi2, gemma, mistral3 and fused llama qkv."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    gap = _max_gap(_logits(load_by_hand(path, spec), spec), _logits(load_with_gguf_loader(path, spec), spec))
    assert gap <= 1e-6, f"{case}: hand-mapped vs GGUF loader differ by {gap}"


@pytest.mark.parametrize("case", ["llama", "llama_tied", "qwen2", "llama_q4_1"])
def test_our_config_equals_loader_config(tiny_files: TinyFiles, case: str) -> None:
    """On files whose settings the loader reads fully, its own config gives our reference."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    gap = _max_gap(_logits(load_with_gguf_loader(path, None), spec), _logits(reference_model(path, spec), spec))
    assert gap <= 1e-6, f"{case}: loader's own config vs ours differ by {gap}"


QUIRK_OFF: list[tuple[str, dict[str, object]]] = [
    ("starcoder2", {"rope_base": 10000.0}),
    ("phi2", {"rope_dims": None}),
    ("phi3", {"rope_dims": None}),
    ("gemma2", {"sliding_window": 1000}),  # window wider than the sequence
    ("gemma2", {"sliding_window": 7}),  # off by one
    ("gemma2", {"attn_softcap": None}),
    ("gemma2", {"final_softcap": None}),
    ("gemma3", {"sliding_window": 1000}),
    ("gemma3", {"rope_base_swa": 1e6}),  # sliding layers wrongly on freq_base
    ("gemma3_swa_base_linear", {"rope_base_swa": None}),
    ("gemma3_swa_base_linear", {"rope_linear_factor": None}),
    ("gemma3_final_softcap", {"final_softcap": None}),
    ("llama_rope_linear", {"rope_linear_factor": None}),
    ("llama_rope_freqs", {"rope_freqs": False}),
    ("qwen3_rope_yarn", {"rope_yarn": None}),
    ("qwen3_rope_yarn", {"rope_yarn": None, "rope_linear_factor": 4.0}),  # the ramp and mscale matter
    ("llama_rope_yarn_attn_factor", {"rope_attn_factor": None}),
]


@pytest.mark.parametrize(("case", "change"), QUIRK_OFF, ids=[f"{c}-{next(iter(d))}" for c, d in QUIRK_OFF])
def test_quirk_bites(tiny_files: TinyFiles, case: str, change: dict[str, object]) -> None:
    """The reference with the quirk switched off differs clearly from the right one."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    right = _logits(reference_model(path, spec), spec)
    wrong = _logits(load_by_hand(path, with_changes(spec, **change)), spec)
    assert _max_gap(right, wrong) > BITES, f"{case}: {change} does not change the logits"


@pytest.mark.parametrize("case", ["llama", "llama_fused_qkv", "mistral3"])
def test_rope_mode_bites(tiny_files: TinyFiles, case: str) -> None:
    """NEOX rope on the raw (still permuted) llama q/k rows is badly wrong."""
    spec, path = ALL_CASES[case], tiny_files.path(case)
    right = _logits(load_by_hand(path, spec), spec)
    wrong = _logits(load_by_hand(path, spec, unpermute_qk=False), spec)
    assert _max_gap(right, wrong) > BITES


def test_quantization_changes_weights(tiny_files: TinyFiles) -> None:
    """The quantized variants really hold different (dequantized) weights than F32."""
    spec = ALL_CASES["llama"]
    f32 = _logits(reference_model(tiny_files.path("llama"), spec), spec)
    q4 = _logits(reference_model(tiny_files.path("llama_q4_0"), ALL_CASES["llama_q4_0"]), spec)
    assert _max_gap(f32, q4) > BITES


def test_phi3_window_would_bite(tiny_files: TinyFiles) -> None:
    """The phi3 file's sliding_window key (which llama.cpp ignores) would matter if applied."""
    case = "phi3_sliding_window_key"
    spec, path = ALL_CASES[case], tiny_files.path(case)
    model = reference_model(path, spec)
    right = _logits(model, spec)
    model.config.sliding_window = spec.sliding_window
    assert _max_gap(right, _logits(model, spec)) > BITES
