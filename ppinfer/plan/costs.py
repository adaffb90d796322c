"""The allocation cost model read from a GGUF header: bytes per layer, embedding and head.

Only tensor descriptors and a few hyperparameters are read (the tensor data stays
memory-mapped and untouched), so every rank can build the same `LayerCosts` cheaply before
any process group exists. The byte counts mirror what the runtime holds in memory:

- a layer or head weight stored in one of `stored_types` (the types a kernel multiplies in
  place, with `runtime.weights=quantized`) costs its file bytes; any other is dequantized to
  the runtime dtype: `n_elements * dtype_bytes`;
- a Mixture-of-Experts layer's 3-D expert tensors (`ffn_*_exps`) count whole, every expert
  (a stage holds them all, though a step reads only the chosen ones), by the same rule over
  `stored_expert_types`; a layer's expert bytes are also reported on their own, and so are
  the bytes a decode step reads: the layer's other weights and the share of its experts the
  step's `step_tokens` tokens choose, 1 - (1 - used / count) ^ tokens when routing spreads
  tokens evenly (one token: used / count);
- `token_embd` stays in its quantized file form on the first stage (the embedding only
  gathers rows), so it costs its file bytes; a tied model's last stage holds its own copy as
  the output projection, charged like any head weight;
- the KV cache of a layer holds keys and values for `kv_tokens` positions:
  `kv_tokens * head_count_kv * (key_length + value_length) * dtype_bytes`, with the key and
  value lengths defaulting to `embedding_length / head_count` (i.e. 2 * head_dim each token).

Tensors outside the blocks that are neither embedding nor head (e.g. `rope_freqs`) are small
and needed by every stage alike, so they do not change the balance and are not counted.
"""

from __future__ import annotations

import re
from collections.abc import Set as AbstractSet
from typing import Any

from gguf import GGMLQuantizationType

from ppinfer.errors import ModelFileError
from ppinfer.families import AttnKind, decoder_layers, get_spec, per_layer_values
from ppinfer.gguf import GGUFFile
from ppinfer.plan.allocation import LayerCosts

_BLOCK = re.compile(r"^blk\.(\d+)\.")
_EXPERTS = re.compile(r"\.ffn_(gate|up|down)_exps\.")


def layer_costs(
    path: str,
    dtype_bytes: int,
    kv_tokens: int,
    *,
    reader: GGUFFile | None = None,
    step_tokens: int | None = None,
    stored_types: AbstractSet[GGMLQuantizationType] = frozenset(),
    stored_expert_types: AbstractSet[GGMLQuantizationType] | None = None,
    kv_dtype_bytes: float | None = None,
) -> LayerCosts:
    """Per-stage memory costs of the GGUF at `path` for a runtime dtype and KV capacity.

    `dtype_bytes` is the element size of the runtime dtype (2 for bfloat16); `kv_tokens` is
    the number of token positions each stage caches per layer, summed over its lanes;
    `step_tokens` (tokens embedded per decode step, i.e. a lane's sequences), when given,
    sets `embedding_read_bytes`; `stored_types` are the tensor types held in their blocks, and
    `stored_expert_types` those of expert tensors (None: the same); `kv_dtype_bytes` is the KV
    cache's bytes per value (the runtime dtype's element size by default; 34 / 32 for Q8_0).
    A caller that has already opened the file may pass it as `reader` (`path` then only
    names it in errors).
    """
    if reader is None:
        reader = GGUFFile(path)

    arch = reader.architecture
    # Trailing blocks a family skips (glm4moe's next-token prediction layers) are never loaded.
    spec = get_spec(arch, path)
    n_layers, n_blocks = decoder_layers(reader, spec)

    expert_types = stored_types if stored_expert_types is None else stored_expert_types
    layer_weights = [0] * n_layers
    layer_experts = [0] * n_layers
    tensors: dict[str, Any] = {}
    for tensor in reader.tensors.values():
        match = _BLOCK.match(tensor.name)
        if match is None:
            tensors[tensor.name] = tensor
            continue
        layer = int(match.group(1))
        if layer >= n_blocks:
            raise ModelFileError(
                f"{path}: tensor {tensor.name} is past {arch}.block_count={n_blocks}"
            )
        if layer >= n_layers:
            continue
        if _EXPERTS.search(tensor.name):
            held = _held(tensor, dtype_bytes, expert_types)
            layer_experts[layer] += held
        else:
            held = _held(tensor, dtype_bytes, stored_types)
        layer_weights[layer] += held
    empty = [i for i, w in enumerate(layer_weights) if w == 0]
    if empty:
        raise ModelFileError(f"{path}: no tensors for layer(s) {empty} (blk.N.*)")

    embd = tensors.get("token_embd.weight")
    if embd is None:
        raise ModelFileError(f"{path}: missing tensor token_embd.weight")
    # The first stage keeps token_embd quantized but dequantizes any embedding norm.
    embedding = int(embd.n_bytes) + _held_with_prefix(tensors, "token_embd_norm.", dtype_bytes, stored_types)
    head = _held_with_prefix(tensors, "output_norm.", dtype_bytes, stored_types)
    head += _held_with_prefix(tensors, "output.", dtype_bytes, stored_types)
    if "output.weight" not in tensors:
        # Tied embeddings: the last stage holds token_embd again as its output weight.
        head += _held(embd, dtype_bytes, stored_types)

    latent = spec.attention is AttnKind.LATENT
    kv = _kv_bytes_per_layer(reader, path, arch, n_layers, kv_dtype_bytes or dtype_bytes, kv_tokens, latent)
    read = None if step_tokens is None else int(embd.n_bytes) // int(embd.shape[0]) * step_tokens
    layer_read = None
    if any(layer_experts):
        share = _expert_read_share(reader, path, arch, n_layers, step_tokens or 1)
        layer_read = [w - x + round(x * f) for w, x, f in zip(layer_weights, layer_experts, share)]
    return LayerCosts(
        layer_weight_bytes=layer_weights,
        layer_kv_bytes=kv,
        embedding_bytes=embedding,
        head_bytes=head,
        embedding_read_bytes=read,
        layer_expert_bytes=layer_experts,
        layer_read_bytes=layer_read,
    )


def _expert_read_share(reader: GGUFFile, path: str, arch: str, n_layers: int, tokens: int) -> list[float]:
    """Per layer, the expected share of its experts that `tokens` tokens choose between them
    when each picks `expert_used_count` of `expert_count` evenly."""
    meta = reader.metadata
    count_key, used_key = f"{arch}.expert_count", f"{arch}.expert_used_count"
    if count_key not in meta or used_key not in meta:
        raise ModelFileError(f"{path}: expert tensors without {count_key} and {used_key}")
    counts = per_layer_values(meta[count_key], n_layers, count_key, path)
    used = per_layer_values(meta[used_key], n_layers, used_key, path)
    return [1.0 - (1.0 - k / n) ** tokens if n > 0 else 0.0 for n, k in zip(counts, used)]


def _held(tensor: Any, dtype_bytes: int, stored_types: AbstractSet[GGMLQuantizationType]) -> int:
    """Bytes a stage holds for `tensor`: its blocks if they stay stored, else its floats."""
    if tensor.qtype in stored_types:
        return int(tensor.n_bytes)
    return int(tensor.n_elements) * dtype_bytes


def _held_with_prefix(
    tensors: dict[str, Any], prefix: str, dtype_bytes: int, stored_types: AbstractSet[GGMLQuantizationType]
) -> int:
    """Held bytes of every non-block tensor whose name starts with `prefix`."""
    return sum(_held(t, dtype_bytes, stored_types) for name, t in tensors.items() if name.startswith(prefix))


def _kv_bytes_per_layer(
    reader: GGUFFile, path: str, arch: str, n_layers: int, dtype_bytes: float, kv_tokens: int, latent: bool
) -> list[int]:
    """Cached bytes per layer. Latent attention caches every query head's decompressed key and
    value, of the per-head sizes `*_length_mla` where the file gives them."""
    heads_key, kv_key = f"{arch}.attention.head_count", f"{arch}.attention.head_count_kv"
    n_heads = per_layer_values(reader.require(heads_key), n_layers, heads_key, path)
    n_kv_heads = (
        per_layer_values(reader.metadata[kv_key], n_layers, kv_key, path)
        if kv_key in reader.metadata
        else n_heads  # no GQA key means one KV head per query head
    )
    embedding_length = int(reader.require(f"{arch}.embedding_length"))
    key_length = reader.get(f"{arch}.attention.key_length")
    value_length = reader.get(f"{arch}.attention.value_length")
    if latent:
        n_kv_heads = n_heads
        key_length = reader.get(f"{arch}.attention.key_length_mla", key_length)
        value_length = reader.get(f"{arch}.attention.value_length_mla", value_length)

    per_layer = []
    for layer in range(n_layers):
        # A layer with no KV heads (some hybrid models) has no cache and no head_dim.
        if n_kv_heads[layer] == 0:
            per_layer.append(0)
            continue
        head_dim = embedding_length // n_heads[layer]
        k_len = int(key_length) if key_length is not None else head_dim
        v_len = int(value_length) if value_length is not None else head_dim
        per_layer.append(int(kv_tokens * n_kv_heads[layer] * (k_len + v_len) * dtype_bytes))
    return per_layer
