"""ppinfer against llama.cpp itself on tiny family files (`ppinfer.bench.family_logits`).

The fast tests check the comparison's own pieces: the tokenizer section it adds for llama.cpp
leaves every tensor and key as it was, and the gap and KL figures on hand-computed logits. The
slow ones run a few representative families through llama.cpp when llama-cpp-python is
installed (the `bench` extra; CI has none) and hold ppinfer's exact path to 1e-3 of llama.cpp's
logit range.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
from ggufgen import write_tiny_gguf
from llamacpp_cases import VARIANTS
from tiny_cases import ALL_CASES, TinyFiles

from ppinfer.bench import family_logits as fl
from ppinfer.gguf.reader import GGUFFile

HAVE_LLAMA_CPP = importlib.util.find_spec("llama_cpp") is not None
needs_llama_cpp = pytest.mark.skipif(not HAVE_LLAMA_CPP, reason="llama-cpp-python is not installed (the bench extra)")

EXACT_TOLERANCE = 1e-3
"""max |Δlogit| / logit range between ppinfer's float32 path and llama.cpp on an F32 file (F32
KV cache): ~1e-6 for the SiLU families; the GELU ones (gemma*, phi2, starcoder2) sit near
1e-4 to 5e-4 because ggml's CPU GELU reads an fp16 table."""


def test_added_tokenizer_keeps_every_tensor_and_key(tiny_files: TinyFiles, tmp_path: Path) -> None:
    src = tiny_files.path("gemma2")
    dst = fl.add_tokenizer(src, tmp_path / "tok.gguf")
    before, after = GGUFFile(src), GGUFFile(dst)
    assert set(after.tensors) == set(before.tensors)
    for name in before.tensors:
        np.testing.assert_array_equal(after.load(name), before.load(name))
    for key, value in before.metadata.items():
        assert key.startswith("GGUF.") or after.metadata[key] == value, key
    tokens = after.metadata["tokenizer.ggml.tokens"]
    assert len(tokens) == ALL_CASES["gemma2"].n_vocab == before.tensors["token_embd.weight"].shape[0]
    assert tokens[:3] == ["<unk>", "<s>", "</s>"] and tokens[-1] == f"t{len(tokens) - 1}"
    assert after.metadata["tokenizer.ggml.add_bos_token"] is False


def test_added_tokenizer_refuses_a_file_that_has_one(tiny_files: TinyFiles, tmp_path: Path) -> None:
    once = fl.add_tokenizer(tiny_files.path("llama"), tmp_path / "once.gguf")
    with pytest.raises(ValueError, match="already has tokenizer"):
        fl.add_tokenizer(once, tmp_path / "twice.gguf")


def test_gap_and_kl_on_hand_computed_logits() -> None:
    exact = np.array([[[0.0, 0.0]], [[2.0, -2.0]]])  # [S=2, T=1, V=2]
    other = np.array([[[np.log(3.0), 0.0]], [[2.0, -2.0]]])
    # Position 0: p = (1/2, 1/2), q = (3/4, 1/4): KL = 1/2 ln(2/3) + 1/2 ln 2 = 1/2 ln(4/3).
    np.testing.assert_allclose(fl.kl_per_position(exact, other), [0.5 * np.log(4 / 3), 0.0], rtol=1e-12)
    # max |Δ| = ln 3 over other's range 2 - (-2) = 4.
    assert fl.relative_gap(exact, other) == pytest.approx(np.log(3.0) / 4)


def test_failure_reason_prefers_llamacpps_loading_error() -> None:
    log = ("llama_model_loader: - kv 8: phi3.vocab_size u32 = 160\n"
           "llama_model_load: error loading model: check_tensor_dims: tensor 'x' has wrong shape\n"
           "llama_model_load_from_file_impl: failed to load model\n"
           "ValueError: Failed to load model from file: /tmp/x.gguf\n")
    assert fl.failure_reason(log, 1) == (
        "exit 1: llama_model_load: error loading model: check_tensor_dims: tensor 'x' has wrong shape")
    assert fl.failure_reason("GGML_ASSERT(x != 0.0f) failed\n", -6) == "exit -6: GGML_ASSERT(x != 0.0f) failed"


def _row(case: str, path: Path, tmp_path: Path) -> fl.Row:
    spec = {**ALL_CASES, **VARIANTS}[case]
    ids = np.random.default_rng(0).integers(0, spec.n_vocab, (2, fl.TOKENS))  # [2, 20]
    return fl.compare(case, path, spec.arch, spec.qtype.name, ids, threads=1, workdir=tmp_path)


@pytest.mark.slow
@needs_llama_cpp
@pytest.mark.parametrize("case", ["llama_rope_yarn_attn_factor", "gemma2", "phi3_longrope_long", "deepseek3",
                                  "gpt_oss"])
def test_exact_path_matches_llamacpp(tiny_files: TinyFiles, tmp_path: Path, case: str) -> None:
    row = _row(case, tiny_files.path(case), tmp_path)
    assert row.error == "" and row.gap is not None, row.error
    assert row.gap <= EXACT_TOLERANCE, f"{case}: max gap {row.gap:.2e} of the logit range"
    assert row.top1_llamacpp == 1.0


@pytest.mark.slow
@needs_llama_cpp
def test_olmoe_matches_llamacpp_with_as_many_kv_heads_as_heads(tmp_path: Path) -> None:
    """llama.cpp sizes OLMoE's k norm by n_embd: it refuses the GQA test file, loads this one."""
    row = _row("olmoe_mha", write_tiny_gguf(tmp_path / "olmoe_mha.gguf", VARIANTS["olmoe_mha"]), tmp_path)
    assert row.gap is not None and row.gap <= EXACT_TOLERANCE, row


@pytest.mark.slow
@needs_llama_cpp
def test_quantized_kl_is_llamacpps_on_a_dense_q8_0_file(tiny_files: TinyFiles, tmp_path: Path) -> None:
    """Both quantize activations to 8 bits for Q8_0 products, so their distances from the exact
    path are alike (a wrong scale or block layout would be orders of magnitude off)."""
    row = _row("llama_q8_0", tiny_files.path("llama_q8_0"), tmp_path)
    assert row.kl_ppinfer is not None and row.kl_llamacpp is not None, row.error
    assert 0 < row.kl_ppinfer <= 1.5 * row.kl_llamacpp, row
