"""Synthetic benchmark models: GGUF files with random Q4_0 weights and a real tokenizer.

Timing a model needs its shapes and storage types, not trained weights, so the 1.1B- and
7B-shaped (llama) and the Qwen3-MoE-shaped benchmark models are written here instead of
downloaded. Every matrix (the tied embedding and the 3-D expert tensors included) is Q4_0: 32
values per block, an fp16 scale (`block_scale` in every block) and 16 bytes of random 4-bit
values, written directly as bytes (quantizing a billion floats in numpy would take minutes).
With value = (q - 8) x scale the weights have a standard deviation of about 4.6 x 0.0045 =
0.021, so a 2048-wide projection of a unit-RMS input stays near unit scale. Norm weights are
1.0 (F32). A MoE model's router (`ffn_gate_inp`, F32 as llama.cpp's quantizer leaves it) is
Gaussian with standard deviation 1/sqrt(n_embd), so its logits on a unit-RMS input have unit
spread and the tokens of a batch scatter over the experts as a trained router's do. The
tokenizer keys are copied from SmolLM2's file, so the prompts tokenize exactly as on the
default model.

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


ARCHES = ("llama", "qwen3moe")
"""The architectures the writer knows: llama (dense SwiGLU) and qwen3moe (routed experts in every
layer, per-head q/k RMS norms)."""


@dataclass(frozen=True)
class SyntheticSpec:
    """The shape of one model (tied output head, no biases).

    `arch="qwen3moe"` gives every layer `n_expert` SwiGLU experts of width `n_ff_exp`, of which
    `n_expert_used` run per token, in place of the dense feed-forward (`n_ff` is then only the
    `feed_forward_length` key, `n_ff_exp x n_expert_used` as Qwen3-MoE files have it)."""

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
    arch: str = "llama"
    key_length: int | None = None
    """The attention head width when it is not n_embd / n_head (Qwen3's 128 with 32 heads of a
    2048-wide model)."""
    n_expert: int = 0
    n_expert_used: int = 0
    n_ff_exp: int = 0

    def __post_init__(self) -> None:
        if self.arch not in ARCHES:
            raise ValueError(f"arch={self.arch!r} is not one of {', '.join(ARCHES)}")
        if self.key_length is None and self.n_embd % self.n_head:
            raise ValueError(f"n_embd={self.n_embd} is not a multiple of n_head={self.n_head}")
        if self.n_head % self.n_head_kv:
            raise ValueError(f"n_head={self.n_head} is not a multiple of n_head_kv={self.n_head_kv}")
        moe = self.arch == "qwen3moe"
        if moe and not 0 < self.n_expert_used <= self.n_expert:
            raise ValueError(f"n_expert_used={self.n_expert_used} must be in 1..n_expert={self.n_expert}")
        if not moe and (self.n_expert or self.n_expert_used or self.n_ff_exp):
            raise ValueError(f"arch={self.arch!r} has no experts, got n_expert={self.n_expert}")
        for name in ("n_embd", "n_ff", *(("n_ff_exp",) if moe else ()), "q_width"):
            value = getattr(self, name)
            if value <= 0 or value % Q4_0_VALUES:
                raise ValueError(f"{name}={value} is not a positive multiple of {Q4_0_VALUES}")

    @property
    def moe(self) -> bool:
        return self.arch == "qwen3moe"

    @property
    def head_dim(self) -> int:
        return self.key_length if self.key_length is not None else self.n_embd // self.n_head

    @property
    def q_width(self) -> int:
        return self.n_head * self.head_dim

    @property
    def kv_width(self) -> int:
        return self.n_head_kv * self.head_dim


MODELS: dict[str, SyntheticSpec] = {
    # TinyLlama-1.1B's shape.
    "1.1b-q4_0": SyntheticSpec(n_layer=22, n_embd=2048, n_ff=5632, n_head=32, n_head_kv=4),
    # Llama-2-7B's shape (multi-head attention: as many KV heads as heads).
    "7b-q4_0": SyntheticSpec(n_layer=32, n_embd=4096, n_ff=11008, n_head=32, n_head_kv=32),
    # Qwen3-30B-A3B's layer (hidden 2048, 32 heads of 128, 4 KV heads, experts of width 768,
    # 8 used) with 16 layers and 64 experts instead of 48 and 128: 2.9 GB.
    "moe-q4_0": SyntheticSpec(n_layer=16, n_embd=2048, n_ff=6144, n_head=32, n_head_kv=4, key_length=128,
                              rope_base=1e6, arch="qwen3moe", n_expert=64, n_expert_used=8, n_ff_exp=768),
}
"""The benchmark's synthetic models by name."""


def bench_models_dir() -> Path:
    """`~/.cache/ppinfer/bench-models` (next to the hub's model cache)."""
    return default_cache_dir().parent / "bench-models"


def cached_path(name: str, cache_dir: Path | None = None) -> Path:
    """Where synthetic model `name` lives (whether or not it is built yet)."""
    if name not in MODELS:
        raise ValueError(f"unknown synthetic model {name!r}; known: {', '.join(MODELS)}")
    spec = MODELS[name]
    return (cache_dir or bench_models_dir()) / f"synthetic-{spec.arch}-{name}.v{FORMAT_VERSION}.gguf"


def matrix_shapes(spec: SyntheticSpec, n_vocab: int) -> Iterator[tuple[str, tuple[int, ...]]]:
    """(name, shape) of every Q4_0 tensor in torch's order, [out, in] or [n_expert, out, in]
    (the row length last), in the order they are written."""
    e, q, kv = spec.n_embd, spec.q_width, spec.kv_width
    yield "token_embd.weight", (n_vocab, e)
    for i in range(spec.n_layer):
        p = f"blk.{i}"
        yield f"{p}.attn_q.weight", (q, e)
        yield f"{p}.attn_k.weight", (kv, e)
        yield f"{p}.attn_v.weight", (kv, e)
        yield f"{p}.attn_output.weight", (e, q)
        if spec.moe:
            n, f = spec.n_expert, spec.n_ff_exp
            yield f"{p}.ffn_gate_exps.weight", (n, f, e)
            yield f"{p}.ffn_up_exps.weight", (n, f, e)
            yield f"{p}.ffn_down_exps.weight", (n, e, f)
        else:
            yield f"{p}.ffn_gate.weight", (spec.n_ff, e)
            yield f"{p}.ffn_up.weight", (spec.n_ff, e)
            yield f"{p}.ffn_down.weight", (e, spec.n_ff)


def norm_shapes(spec: SyntheticSpec) -> Iterator[tuple[str, int]]:
    """(name, width) of every F32 norm weight, all ones."""
    for i in range(spec.n_layer):
        yield f"blk.{i}.attn_norm.weight", spec.n_embd
        yield f"blk.{i}.ffn_norm.weight", spec.n_embd
    if spec.moe:
        for i in range(spec.n_layer):
            yield f"blk.{i}.attn_q_norm.weight", spec.head_dim
            yield f"blk.{i}.attn_k_norm.weight", spec.head_dim
    yield "output_norm.weight", spec.n_embd


def router_names(spec: SyntheticSpec) -> Iterator[str]:
    """The F32 routers ([n_expert, n_embd]) of a MoE model."""
    if spec.moe:
        for i in range(spec.n_layer):
            yield f"blk.{i}.ffn_gate_inp.weight"


def random_q4_0(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """[*shape[:-1], shape[-1] / 32 * 18] bytes: Q4_0 blocks with fp16 `scale` and random 4-bit values."""
    *rows, cols = shape
    blocks = rng.integers(0, 256, size=(*rows, cols // Q4_0_VALUES, Q4_0_BYTES), dtype=np.uint8)
    blocks[..., :2] = np.array([scale], dtype="<f2").view(np.uint8)  # the block's scale d
    return blocks.reshape(*rows, -1)


def random_router(rng: np.random.Generator, spec: SyntheticSpec) -> np.ndarray:
    """[n_expert, n_embd] float32, N(0, 1 / n_embd): unit-spread logits on a unit-RMS input."""
    return (rng.standard_normal((spec.n_expert, spec.n_embd)) / np.sqrt(spec.n_embd)).astype(np.float32)


def tokenizer_fields(source: gguf.GGUFReader) -> list[gguf.ReaderField]:
    fields = [f for f in source.fields.values() if f.name.startswith(TOKENIZER_PREFIX)]
    if not any(f.name == gguf.Keys.Tokenizer.LIST for f in fields):
        raise ValueError(f"{source.data.filename}: no {gguf.Keys.Tokenizer.LIST} to copy")
    return fields


def _write_metadata(w: gguf.GGUFWriter, spec: SyntheticSpec, name: str, n_vocab: int) -> None:
    w.add_name(f"synthetic {name}")
    if spec.moe:
        w.add_expert_count(spec.n_expert)
        w.add_expert_used_count(spec.n_expert_used)
        w.add_expert_feed_forward_length(spec.n_ff_exp)
    if spec.key_length is not None:
        w.add_key_length(spec.key_length)
        w.add_value_length(spec.key_length)
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
    w = gguf.GGUFWriter(path, spec.arch)
    _write_metadata(w, spec, name, n_vocab)
    for f in fields:
        main = f.types[0]
        w.add_key_value(f.name, f.contents(), main, sub_type=f.types[-1] if main == gguf.GGUFValueType.ARRAY else None)
    matrices = list(matrix_shapes(spec, n_vocab))
    norms = list(norm_shapes(spec))
    routers = list(router_names(spec))
    for tensor, (*rows, cols) in matrices:
        stored = (*rows, cols // Q4_0_VALUES * Q4_0_BYTES)
        w.add_tensor_info(tensor, stored, np.dtype(np.uint8), int(np.prod(stored)), raw_dtype=QType.Q4_0)
    for tensor, width in norms:
        w.add_tensor_info(tensor, (width,), np.dtype(np.float32), width * 4)
    for tensor in routers:
        w.add_tensor_info(tensor, (spec.n_expert, spec.n_embd), np.dtype(np.float32), spec.n_expert * spec.n_embd * 4)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_ti_data_to_file()
    rng = np.random.default_rng(spec.seed)
    for _, shape in matrices:
        w.write_tensor_data(random_q4_0(rng, shape, spec.block_scale))
    for _, width in norms:
        w.write_tensor_data(np.ones(width, dtype=np.float32))
    router_rng = np.random.default_rng(spec.seed + 1)  # apart, so the Q4_0 stream is the dense models'
    for _ in routers:
        w.write_tensor_data(random_router(router_rng, spec))
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
