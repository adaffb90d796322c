"""Tiny random-weight GGUF models that carry a tokenizer, for the end-to-end pipeline tests.

`tests/ggufgen.py` writes the weights and hyperparameters of a family but no tokenizer; the
runtime needs one (prompts are text, results are decoded). This module owns a minimal
byte-level BPE vocabulary written the way llama.cpp's converter writes a GPT-2 style one:

- ids 0..255 are the 256 bytes, each spelt with GPT-2's byte-to-unicode mapping (printable
  Latin-1 bytes stand for themselves, the others are shifted to U+0100 and up, so b" " is "Ġ");
- a few merged tokens and their merges (the `gpt2` model needs at least one merge);
- control tokens `<|startoftext|>` (BOS) and `<|endoftext|>` (EOS).

`write_pipeline_model` writes ggufgen's file, then copies its metadata and tensors into the
final file with the tokenizer keys added, so ggufgen's own metadata is reused unchanged.

It also owns the independent references the pipeline tests hold the runtime to: greedy
continuations by full recompute through the model's one-stage forward (no cache, no padding,
no lanes), their truncation at an end-of-generation id, and the choice of an EOS id that makes
sequences stop at different steps.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import gguf
import numpy as np
import torch
from ggufgen import TinySpec, write_tiny_gguf
from stage_runner import full_logits, whole

from ppinfer.model import PipelineStage


def byte_to_unicode() -> dict[int, str]:
    """GPT-2's reversible byte -> printable character table (256 entries)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {b: chr(b) for b in printable}
    shifted = 0
    for b in range(256):
        if b not in table:
            table[b] = chr(256 + shifted)
            shifted += 1
    return table


MERGES = ("Ġ t", "h e", "i n", "Ġt he")
"""BPE merges in rank order; each adds the token `left + right`."""

BOS_TEXT = "<|startoftext|>"
EOS_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class ByteVocab:
    """The tokenizer every pipeline test model carries."""

    tokens: tuple[str, ...]
    types: tuple[int, ...]  # gguf TokenType per token
    merges: tuple[str, ...]

    @property
    def size(self) -> int:
        return len(self.tokens)

    def id_of(self, text: str) -> int:
        return self.tokens.index(text)


def byte_vocab() -> ByteVocab:
    """256 byte tokens, one token per merge, then BOS and EOS."""
    table = byte_to_unicode()
    tokens = [table[b] for b in range(256)] + [m.replace(" ", "") for m in MERGES] + [BOS_TEXT, EOS_TEXT]
    types = [int(gguf.TokenType.NORMAL)] * (256 + len(MERGES)) + [int(gguf.TokenType.CONTROL)] * 2
    return ByteVocab(tuple(tokens), tuple(types), MERGES)


VOCAB = byte_vocab()
N_VOCAB = VOCAB.size
"""Token count of the vocabulary: the `n_vocab` every pipeline model spec must have."""


@dataclass(frozen=True)
class TokenizerChoice:
    """Per-file tokenizer settings: which id ends generation and whether BOS is added."""

    eos_id: int = VOCAB.id_of(EOS_TEXT)
    add_bos: bool = False


def _copy_with_tokenizer(src: Path, dst: Path, arch: str, choice: TokenizerChoice) -> None:
    reader = gguf.GGUFReader(src)
    writer = gguf.GGUFWriter(dst, arch)
    for fld in reader.fields.values():
        # GGUF.* are the reader's virtual fields; the writer adds the architecture itself.
        if fld.name.startswith("GGUF.") or fld.name == gguf.Keys.General.ARCHITECTURE:
            continue
        main = fld.types[0]
        sub = fld.types[-1] if main == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(fld.name, fld.contents(), main, sub_type=sub)
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(list(VOCAB.tokens))
    writer.add_token_types(list(VOCAB.types))
    writer.add_token_merges(list(VOCAB.merges))
    writer.add_bos_token_id(VOCAB.id_of(BOS_TEXT))
    writer.add_eos_token_id(choice.eos_id)
    writer.add_add_bos_token(choice.add_bos)
    for tensor in reader.tensors:
        writer.add_tensor_info(
            tensor.name, tensor.data.shape, tensor.data.dtype, tensor.data.nbytes, tensor.tensor_type
        )
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for tensor in reader.tensors:
        writer.write_tensor_data(tensor.data)
    writer.close()


def write_pipeline_model(path: Path, spec: TinySpec, choice: TokenizerChoice = TokenizerChoice()) -> Path:
    """Write `spec`'s tiny model with the byte-level tokenizer to `path`."""
    if spec.n_vocab != N_VOCAB:
        raise ValueError(f"spec.n_vocab={spec.n_vocab} must equal the tokenizer's {N_VOCAB} tokens")
    weights = path.with_name(path.stem + ".weights.gguf")
    write_tiny_gguf(weights, spec)
    _copy_with_tokenizer(weights, path, spec.arch, choice)
    weights.unlink()
    return path


PIPELINE_SPECS: dict[str, TinySpec] = {
    # Six layers so four stages can each hold at least one, and explicit lists can be uneven.
    "llama": TinySpec("llama", n_layer=6, n_vocab=N_VOCAB, seed=21),
    # Head dim 24 != E/H, q/k norms.
    "qwen3": TinySpec("qwen3", n_layer=6, head_dim=24, n_vocab=N_VOCAB, seed=22),
    # Sliding window of 4 on layers 0, 2, 4 (prompts are longer), both softcaps. The head is
    # untied: with random weights a tied head makes every token predict itself (the residual
    # stream is dominated by the scaled embedding), so greedy runs would just repeat a token.
    "gemma2": TinySpec(
        "gemma2", n_layer=6, tied=False, sliding_window=4, attn_softcap=5.0, final_softcap=3.0,
        qk_gain=3.0, n_vocab=N_VOCAB, seed=23,
    ),
}
"""The tiny families the pipeline tests run, by name."""

ADD_BOS: dict[str, bool] = {"llama": False, "qwen3": False, "gemma2": True}
"""Gemma files add BOS, like the real ones; the others do not (like GPT-2 style files)."""


@contextmanager
def one_thread() -> Iterator[None]:
    """Torch on one thread for a while: on a shared 2-core machine, intra-op threads that
    wait for each other make small forwards tens of times slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def one_forward(stage: PipelineStage, ids: list[int]) -> np.ndarray:
    """Logits [T, V] of unpadded `ids` in one forward of the whole-model `stage`."""
    with one_thread():
        return full_logits(stage, np.array([ids], dtype=np.int64))[0]


def greedy_recompute(path: Path, n_layer: int, prompts: list[list[int]], n_new: int) -> list[list[int]]:
    """Greedy continuations by full recompute of each unpadded sequence, eos ignored."""
    out = []
    with one_thread():
        stage = whole(path, n_layer)
        for ids in prompts:
            seq = list(ids)
            for _ in range(n_new):
                seq.append(int(full_logits(stage, np.array([seq], dtype=np.int64))[0, -1].argmax()))
            out.append(seq[len(ids):])
    return out


def truncate_at(tokens: list[int], eog: set[int]) -> tuple[list[int], str]:
    """What generation keeps: up to and including the first end-of-generation id."""
    for i, t in enumerate(tokens):
        if t in eog:
            return tokens[: i + 1], "stop"
    return tokens, "length"


def pick_eos(continuations: list[list[int]], always_eog: int) -> int:
    """A token to declare EOS so that sequences stop at as many different steps as possible,
    with at least one running to the length limit when that can be had."""
    def quality(token: int) -> tuple[int, bool, int]:
        ends = [truncate_at(c, {token, always_eog}) for c in continuations]
        steps = {len(kept) for kept, why in ends if why == "stop"}
        return len(steps), any(why == "length" for _, why in ends), -token

    return max({t for c in continuations for t in c} - {always_eog}, key=quality)
