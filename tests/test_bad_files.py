"""Bad model files fail with `ModelFileError` naming the file (and the tensor where one is
to blame): missing, not GGUF, truncated, missing tensor, wrong shape, unsupported tensor
types, unknown architecture and rope scaling (whose messages list the supported ones)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as QType
from ggufgen import RawTensor, TinySpec, encoded_tensors, with_changes, write_gguf, write_tiny_gguf
from stage_runner import whole

from ppinfer.errors import ModelFileError

SPEC = TinySpec("llama", seed=20)
FAMILIES = (
    "llama", "mistral3", "qwen2", "qwen3", "phi2", "phi3", "starcoder2", "gemma", "gemma2", "gemma3",
    "qwen2moe", "qwen3moe", "olmoe",
)


def _fails(path: Path, *names: str) -> str:
    """Building the whole model of `path` raises ModelFileError naming the path and `names`."""
    with pytest.raises(ModelFileError) as info:
        whole(path, SPEC.n_layer)
    message = str(info.value)
    for name in (str(path), *names):
        assert name in message, f"{name!r} not in the error message {message!r}"
    return message


def test_missing_file(tmp_path: Path) -> None:
    _fails(tmp_path / "nowhere.gguf")


def test_not_gguf(tmp_path: Path) -> None:
    path = tmp_path / "random.gguf"
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _fails(path)


@pytest.mark.parametrize("keep", [200_000, 1_000, 100, 10])
def test_truncated(tmp_path: Path, keep: int) -> None:
    """Cut inside the tensor data (the file is ~380 kB, data from byte ~1.7 k), the tensor
    infos, the key-value section and the fixed header."""
    path = write_tiny_gguf(tmp_path / "whole.gguf", SPEC)
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(path.read_bytes()[:keep])
    _fails(cut)


def test_missing_tensor(tmp_path: Path) -> None:
    tensors = encoded_tensors(SPEC)
    del tensors["blk.1.ffn_up.weight"]
    _fails(write_gguf(tmp_path / "missing.gguf", SPEC, tensors), "blk.1.ffn_up.weight")


def test_wrong_shape(tmp_path: Path) -> None:
    tensors = encoded_tensors(SPEC)
    tensors["blk.0.attn_k.weight"] = np.zeros((SPEC.kv_width + 16, SPEC.n_embd), np.float32)
    _fails(write_gguf(tmp_path / "shape.gguf", SPEC, tensors), "blk.0.attn_k.weight")


@pytest.mark.parametrize("head_dim", [24, 1 << 28])
def test_head_size_that_does_not_match_the_tensors(tmp_path: Path, head_dim: int) -> None:
    """A corrupt attention.key_length fails before anything is sized by it (a 2^28 head once
    sized a 512 MB rotary table before any shape was checked)."""
    header = with_changes(SPEC, head_dim=head_dim)
    path = write_gguf(tmp_path / "heads.gguf", header, encoded_tensors(SPEC))
    _fails(path, f"llama.attention.key_length={head_dim}", "blk.0.attn_q.weight")


def test_q8_1_tensor_unsupported(tmp_path: Path) -> None:
    """Q8_1 is a valid ggml type that gguf-py cannot dequantize."""
    block, type_size = GGML_QUANT_SIZES[QType.Q8_1]
    rows, cols = SPEC.n_embd, SPEC.n_ff  # ffn_down [E, F]
    raw = np.random.default_rng(1).integers(0, 256, (rows, cols // block * type_size), dtype=np.uint8)
    tensors = encoded_tensors(SPEC)
    tensors["blk.0.ffn_down.weight"] = RawTensor(raw, QType.Q8_1)
    _fails(write_gguf(tmp_path / "q8_1.gguf", SPEC, tensors), "blk.0.ffn_down.weight")


def test_integer_tensor_unsupported(tmp_path: Path) -> None:
    tensors = encoded_tensors(SPEC)
    tensors["blk.1.ffn_gate.weight"] = np.ones((SPEC.n_ff, SPEC.n_embd), np.int32)
    _fails(write_gguf(tmp_path / "int.gguf", SPEC, tensors), "blk.1.ffn_gate.weight")


def test_unknown_architecture_lists_supported(tmp_path: Path) -> None:
    path = write_gguf(tmp_path / "alien.gguf", SPEC, encoded_tensors(SPEC), arch_name="alienlm")
    message = _fails(path, "alienlm")
    missing = [f for f in FAMILIES if f not in message]
    assert not missing, f"supported families {missing} not listed in {message!r}"


def test_unsupported_rope_scaling_lists_supported(tmp_path: Path) -> None:
    extra = {"llama.rope.scaling.type": "longrope", "llama.rope.scaling.factor": 4.0}
    path = write_gguf(tmp_path / "longrope.gguf", SPEC, encoded_tensors(SPEC), extra=extra)
    message = _fails(path, "'longrope'", "linear", "yarn")
    assert "\n" not in message
