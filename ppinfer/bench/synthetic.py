"""Synthetic benchmark models: llama-shaped GGUF files with random Q4_0 weights and a real tokenizer.

Timing a model needs its shapes and storage types, not trained weights, so the 1.1B- and
7B-shaped benchmark models are written here instead of downloaded. Every 2-D tensor (the tied
embedding included) is Q4_0: 32 values per block, an fp16 scale (`block_scale` in every block)
and 16 bytes of random 4-bit values, written directly as bytes (quantizing a billion floats in
numpy would take minutes). With value = (q - 8) x scale the weights have a standard deviation
of about 4.6 x 0.0045 = 0.021, so a 2048-wide projection of a unit-RMS input stays near unit
scale. Norm weights are 1.0 (F32). The tokenizer keys are copied from SmolLM2's file, so the
prompts tokenize exactly as on the default model.

Files are cached under `~/.cache/ppinfer/bench-models/` (or `$XDG_CACHE_HOME/ppinfer/...`),
built once, written to a temporary file and renamed, so a half-written file is never used.

    python -m ppinfer.bench.synthetic                # build (or find) every benchmark model
    python -m ppinfer.bench.synthetic 1.1b-q4_0      # one of them
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as QType

from ppinfer.hub import DEFAULT_MODEL, default_cache_dir, ensure_model

log = logging.getLogger("ppinfer.bench.synthetic")

Q4_0_VALUES = 32
"""Weights per Q4_0 block."""
Q4_0_BYTES = 18
"""Bytes per Q4_0 block: an fp16 scale, then 32 4-bit values packed two to a byte."""
TOKENIZER_PREFIX = "tokenizer."
FORMAT_VERSION = 1
"""Part of the cached file name: bump it when the files' contents change."""


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape of one llama-architecture model (tied output head, no biases)."""

    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    n_ctx: int = 4096
    rope_base: float = 10000.0
    block_scale: float = 0.0045
    """The fp16 scale of every Q4_0 block."""
    seed: int = 0

    def __post_init__(self) -> None:
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        for name in ("n_embd", "n_ff"):
            if getattr(self, name) % Q4_0_VALUES:
                raise ValueError(f"{name}={getattr(self, name)} is not a multiple of {Q4_0_VALUES}")

    @property
    def head_dim(self) -> int:
        return self.n_embd // self.n_head

    @property
    def kv_width(self) -> int:
        return self.n_head_kv * self.head_dim


MODELS: dict[str, SyntheticSpec] = {
    # TinyLlama-1.1B's shape.
    "1.1b-q4_0": SyntheticSpec(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4),
    # Llama-2-7B's shape (multi-head attention: as many KV heads as heads).
    "7b-q4_0": SyntheticSpec(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
}
"""The benchmark's synthetic models by name."""


def bench_models_dir() -> Path:
    """`~/.cache/ppinfer/bench-models` (next to the hub's model cache)."""
    return default_cache_dir().parent / "bench-models"


def cached_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where synthetic model `name` lives (whether or not it is built yet)."""
    if name not in MODELS:
        raise ValueError(f"unknown synthetic model {name!r}; known: {', '.join(MODELS)}")
    return (cache_dir or bench_models_dir()) / f"synthetic-llama-{name}.v{FORMAT_VERSION}.gguf"


def matrix_shapes(spec: SyntheticSpec, n_vocab: int) -> Iterator[tuple[str, int, int]]:
    """(name, rows, row length) of every 2-D tensor, i.e. torch's [out, in]."""
    e = spec.n_embd
    yield "token_embd.weight", n_vocab, e
    for i in range(spec.n_layer):
        p = f"blk.{i}"
        yield f"{p}.attn_q.weight", e, e
        yield f"{p}.attn_k.weight", spec.kv_width, e
        yield f"{p}.attn_v.weight", spec.kv_width, e
        yield f"{p}.attn_output.weight", e, e
        yield f"{p}.ffn_gate.weight", spec.n_ff, e
        yield f"{p}.ffn_up.weight", spec.n_ff, e
        yield f"{p}.ffn_down.weight", e, spec.n_ff


def norm_names(spec: SyntheticSpec) -> Iterator[str]:
    for i in range(spec.n_layer):
        yield f"blk.{i}.attn_norm.weight"
        yield f"blk.{i}.ffn_norm.weight"
    yield "output_norm.weight"


def random_q4_0(rng: np.random.Generator, rows: int, cols: int, scale: float) -> np.ndarray:
    """[rows, cols / 32 * 18] bytes: Q4_0 blocks with fp16 `scale` and random 4-bit values."""
    blocks = rng.integers(0, 256, size=(rows, cols // Q4_0_VALUES, Q4_0_BYTES), dtype=np.uint8)
    blocks[:, :, :2] = np.array([scale], dtype="<f2").view(np.uint8)  # the block's scale d
    return blocks.reshape(rows, -1)


def tokenizer_fields(source: gguf.GGUFReader) -> list[gguf.ReaderField]:
    fields = [f for f in source.fields.values() if f.name.startswith(TOKENIZER_PREFIX)]
    if not any(f.name == gguf.Keys.Tokenizer.LIST for f in fields):
        raise ValueError(f"{source.data.filename}: no {gguf.Keys.Tokenizer.LIST} to copy")
    return fields


def _write_metadata(w: gguf.GGUFWriter, spec: SyntheticSpec, name: str, n_vocab: int) -> None:
    w.add_name(f"synthetic {name}")
    w.add_file_type(gguf.LlamaFileType.MOSTLY_Q4_0)
    w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    w.add_block_count(spec.n_layer)
    w.add_context_length(spec.n_ctx)
    w.add_embedding_length(spec.n_embd)
    w.add_feed_forward_length(spec.n_ff)
    w.add_head_count(spec.n_head)
    w.add_head_count_kv(spec.n_head_kv)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_rope_dimension_count(spec.head_dim)
    w.add_rope_freq_base(spec.rope_base)
    w.add_vocab_size(n_vocab)


def write_synthetic(path: Path, spec: SyntheticSpec, tokenizer_source: Path, name: str = "model") -> Path:
    """Write `spec`'s model with `tokenizer_source`'s tokenizer to `path` (overwriting it).

    Tensors are generated and written one at a time, so memory stays at one tensor however
    large the model.
    """
    source = gguf.GGUFReader(tokenizer_source)
    fields = tokenizer_fields(source)
    n_vocab = len(source.fields[gguf.Keys.Tokenizer.LIST].data)
    w = gguf.GGUFWriter(path, "llama")
    _write_metadata(w, spec, name, n_vocab)
    for f in fields:
        main = f.types[0]
        w.add_key_value(f.name, f.contents(), main, sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    matrices = list(matrix_shapes(spec, n_vocab))
    norms = list(norm_names(spec))
    for tensor, rows, cols in matrices:
        row_bytes = cols // Q4_0_VALUES * Q4_0_BYTES
        w.add_tensor_info(tensor, (rows, row_bytes), np.dtype(np.uint8), rows * row_bytes, raw_dtype=QType.Q4_0)
    for tensor in norms:
        w.add_tensor_info(tensor, (spec.n_embd,), np.dtype(np.float32), spec.n_embd * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(spec.seed)
    for _, rows, cols in matrices:
        w.write_tensor_data(random_q4_0(rng, rows, cols, spec.block_scale))
    ones = np.ones(spec.n_embd, dtype=np.float32)
    for _ in norms:
        w.write_tensor_data(ones)
    w.close()
    return path


def ensure_synthetic(name: str, tokenizer_source: Path | None = None, cache_dir: Path | None = None) -> Path:
    """The cached file of synthetic model `name`, built first when missing (SmolLM2's
    tokenizer, the default model's, unless `tokenizer_source` names another GGUF file)."""
    target = cached_path(name, cache_dir)
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    source = tokenizer_source or ensure_model(DEFAULT_MODEL)
    partial = target.with_name(f".{target.name}.{os.getpid()}.partial")
    log.info("building %s (random Q4_0 weights, tokenizer of %s)", target, source.name)
    started = time.perf_counter()
    try:
        write_synthetic(partial, MODELS[name], source, name)
        os.replace(partial, target)
    finally:
        partial.unlink(missing_ok=True)
    log.info("built %s: %.0f MB in %.0f s", target.name, target.stat().st_size / 1e6, time.perf_counter() - started)
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ppinfer.bench.synthetic",
                                     description="Build (once) and print the paths of the synthetic benchmark models.")
    parser.add_argument("names", nargs="*", metavar="NAME",
                        help=f"models to build (default: all of {', '.join(MODELS)})")
    args = parser.parse_args(argv)
    unknown = [n for n in args.names if n not in MODELS]
    if unknown:
        parser.error(f"unknown model {unknown[0]!r}; choose from {', '.join(MODELS)}")
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stderr)
    for name in args.names or MODELS:
        print(ensure_synthetic(name))
    return 0


if __name__ == "__main__":
    sys.exit(main())
