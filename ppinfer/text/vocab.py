"""The tokenizer vocabulary of a GGUF file, interpreted the way llama.cpp does.

Owns: reading `tokenizer.*` metadata (through `ppinfer.gguf.GGUFFile`), token attributes
(the bit flags llama.cpp derives from `tokenizer.ggml.token_type` plus its text-based
fix-ups), the special token ids and their llama.cpp defaults per vocabulary type, `add_bos` /
`add_space_prefix` defaults, and the end-of-generation set. It knows nothing about how
text is split into tokens (`spm.py`, `bpe.py`, `special.py` do that).
"""

from __future__ import annotations

import enum
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ppinfer.errors import ModelFileError
from ppinfer.gguf import GGUFFile
from ppinfer.text.bpe import pre_tokenizer_spec

log = logging.getLogger(__name__)


class TokenAttr(enum.IntFlag):
    """Per-token attribute bits, numbered like llama.cpp's `llama_token_attr`."""

    UNDEFINED = 0
    UNKNOWN = 1 << 0
    UNUSED = 1 << 1
    NORMAL = 1 << 2
    CONTROL = 1 << 3
    USER_DEFINED = 1 << 4
    BYTE = 1 << 5
    NORMALIZED = 1 << 6
    LSTRIP = 1 << 7
    RSTRIP = 1 << 8
    SINGLE_WORD = 1 << 9


# tokenizer.ggml.token_type values (gguf TokenType) -> attribute bit.
_TYPE_TO_ATTR = {
    1: TokenAttr.NORMAL,
    2: TokenAttr.UNKNOWN,
    3: TokenAttr.CONTROL,
    4: TokenAttr.USER_DEFINED,
    5: TokenAttr.UNUSED,
    6: TokenAttr.BYTE,
}

SUPPORTED_MODELS = ("gpt2", "llama")

# Token texts llama.cpp treats as end-of-generation whatever the metadata says (and forces
# to CONTROL), from llama-vocab.cpp's EOG list.
_EOG_TEXTS = frozenset({
    "<|eot_id|>", "<|im_end|>", "<|end|>", "<|return|>", "<|call|>", "<|flush|>", "<|calls|>",
    "<end_of_turn>", "<|endoftext|>", "</s>", "<|eom_id|>", "<EOT>", "_<EOT>", "[EOT]", "[EOS]",
    "<|end_of_text|>", "<end_of_utterance>", "<eos>", "<turn|>", "<|tool_response>",
    "<｜end▁of▁sentence｜>", "[e~[",
})
# Texts that name a role when the metadata leaves its id unset (llama.cpp auto-detection).
# Each found token is forced to CONTROL. The FIM pad/repo/file-separator ids join the EOG set.
_ROLE_TEXTS: dict[str, frozenset[str]] = {
    "eot": frozenset({"<|eot_id|>", "<|im_end|>", "<|end|>", "<end_of_turn>", "<|endoftext|>",
                      "<|end_of_text|>", "<EOT>", "_<EOT>", "[EOT]", "<｜end▁of▁sentence｜>",
                      "<end_of_utterance>"}),
    "eom": frozenset({"<|eom_id|>"}),
    "fim_pre": frozenset({"<|fim_prefix|>", "<fim-prefix>", "<fim_prefix>", "<｜fim▁begin｜>", "<PRE>",
                          "▁<PRE>", "<|code_prefix|>", "<|prefix|>"}),
    "fim_suf": frozenset({"<|fim_suffix|>", "<fim-suffix>", "<fim_suffix>", "<｜fim▁hole｜>", "<SUF>",
                          "▁<SUF>", "<|code_suffix|>", "<|suffix|>"}),
    "fim_mid": frozenset({"<|fim_middle|>", "<fim-middle>", "<fim_middle>", "<｜fim▁end｜>", "<MID>",
                          "▁<MID>", "<|code_middle|>", "<|middle|>"}),
    "fim_pad": frozenset({"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"}),
    "fim_rep": frozenset({"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"}),
    "fim_sep": frozenset({"<|file_sep|>"}),
}
_ID_KEYS: dict[str, tuple[str, ...]] = {
    "bos": ("tokenizer.ggml.bos_token_id",),
    "eos": ("tokenizer.ggml.eos_token_id",),
    "eot": ("tokenizer.ggml.eot_token_id",),
    "eom": ("tokenizer.ggml.eom_token_id",),
    "unk": ("tokenizer.ggml.unknown_token_id",),
    "pad": ("tokenizer.ggml.padding_token_id",),
    "fim_pre": ("tokenizer.ggml.fim_pre_token_id", "tokenizer.ggml.prefix_token_id"),
    "fim_suf": ("tokenizer.ggml.fim_suf_token_id", "tokenizer.ggml.suffix_token_id"),
    "fim_mid": ("tokenizer.ggml.fim_mid_token_id", "tokenizer.ggml.middle_token_id"),
    "fim_pad": ("tokenizer.ggml.fim_pad_token_id",),
    "fim_rep": ("tokenizer.ggml.fim_rep_token_id",),
    "fim_sep": ("tokenizer.ggml.fim_sep_token_id",),
}
# llama.cpp's defaults when a special id key is absent, per vocabulary type (11 is GPT-2's
# historical "<|endoftext|>" slot in llama.cpp's table; real BPE files set the keys).
_DEFAULT_IDS: dict[str, dict[str, int]] = {
    "llama": {"bos": 1, "eos": 2, "unk": 0},
    "gpt2": {"bos": 11, "eos": 11},
}


@dataclass
class Vocab:
    """Everything the encoders and decoders need, read once from the GGUF header."""

    path: Path
    model: str  # tokenizer.ggml.model: "gpt2" (byte-level BPE) or "llama" (SPM)
    pre: str  # tokenizer.ggml.pre ("default" when absent)
    tokens: list[str]
    attrs: np.ndarray  # [V] int32 TokenAttr bits
    scores: np.ndarray  # [V] float32 (zeros when the file has none)
    merges: list[str]
    token_to_id: dict[str, int]
    special_ids: dict[str, int | None]  # bos, eos, eot, eom, unk, pad, fim_*
    add_bos: bool
    add_eos: bool
    add_space_prefix: bool
    chat_template: str | None
    eog_ids: frozenset[int]

    @property
    def size(self) -> int:
        return len(self.tokens)


def _opt_bool(meta: dict[str, Any], key: str) -> bool | None:
    value = meta.get(key)
    return None if value is None else bool(value)


def _token_attrs(meta: dict[str, Any], n: int, path: Path) -> np.ndarray:
    types = meta.get("tokenizer.ggml.token_type")
    if types is None:
        return np.full(n, int(TokenAttr.NORMAL), dtype=np.int32)
    if not isinstance(types, np.ndarray) or len(types) < n:
        raise ModelFileError(f"{path}: tokenizer.ggml.token_type must be an int array of >= {n} entries")
    lut = np.zeros(len(_TYPE_TO_ATTR) + 1, dtype=np.int32)  # 0 and unknown values: UNDEFINED
    for type_id, attr in _TYPE_TO_ATTR.items():
        lut[type_id] = int(attr)
    t = types[:n].astype(np.int64)
    known = (t >= 0) & (t < len(lut))
    return np.where(known, lut[np.where(known, t, 0)], 0).astype(np.int32)


def _special_ids(meta: dict[str, Any], model: str, n: int, path: Path) -> dict[str, int | None]:
    ids: dict[str, int | None] = dict.fromkeys(_ID_KEYS)
    for role, default in _DEFAULT_IDS[model].items():
        ids[role] = default if default < n else None
    for role, keys in _ID_KEYS.items():
        for key in keys:
            value = meta.get(key)
            if value is None:
                continue
            if 0 <= int(value) < n:
                ids[role] = int(value)
            else:
                log.warning("%s: %s = %s is outside the vocabulary (%d); keeping %s", path, key, value, n, ids[role])
            break
    return ids


def _force_control(attrs: np.ndarray, token_id: int) -> None:
    # llama.cpp: a token whose text marks it as a role/EOG token is control whatever its type says.
    attrs[token_id] |= int(TokenAttr.CONTROL)


def _detect_roles(ids: dict[str, int | None], attrs: np.ndarray, token_to_id: dict[str, int]) -> None:
    """Fill unset eot/eom/fim ids from well-known token texts, as llama.cpp does."""
    for role, texts in _ROLE_TEXTS.items():
        if ids[role] is not None:
            continue
        found = sorted(token_to_id[t] for t in texts if t in token_to_id)
        if found:
            # llama.cpp takes whichever its hash map yields first; the lowest id is a stable choice.
            ids[role] = found[0]
            _force_control(attrs, found[0])


def _eog_set(tokens: list[str], ids: dict[str, int | None], attrs: np.ndarray,
             token_to_id: dict[str, int]) -> frozenset[int]:
    """llama.cpp's end-of-generation ids: FIM pad/repo/sep, EOG-listed texts, eos/eot/eom."""
    roles = ("fim_pad", "fim_rep", "fim_sep", "eos", "eot", "eom")
    eog = {tid for tid in (ids[r] for r in roles) if tid is not None}
    for text in _EOG_TEXTS:
        tid = token_to_id.get(text)
        if tid is not None:
            eog.add(tid)
            _force_control(attrs, tid)

    by_text = {tokens[i]: i for i in eog}
    # Harmony / solar-open vocabularies: "<|end|>" ends a message, not the generation.
    if "<|end|>" in by_text and ({"<|return|>", "<|call|>"} <= by_text.keys()
                                 or {"<|calls|>", "<|flush|>"} <= by_text.keys()):
        eog.discard(by_text["<|end|>"])
        attrs[by_text["<|end|>"]] = int(TokenAttr.USER_DEFINED)
    # Gemma-4 style vocabularies use "</s>" as ordinary text.
    if {"<|tool_response>", "</s>"} <= by_text.keys():
        eog.discard(by_text["</s>"])
        attrs[by_text["</s>"]] = int(TokenAttr.NORMAL)
    return frozenset(eog)


def _name_overrides(attrs: np.ndarray, token_to_id: dict[str, int], model_name: str) -> None:
    """The attribute changes llama.cpp keys on token texts or general.name."""
    # gpt-oss: these structural tokens always render, so llama.cpp makes them user-defined.
    for text in ("<|channel|>", "<|message|>", "<|start|>", "<|constrain|>"):
        if text in token_to_id:
            attrs[token_to_id[text]] = int(TokenAttr.USER_DEFINED)
    # Phi-3: special tokens swallow the whitespace to their right (changes prompt ids).
    lowered = model_name.lower()
    if "phi-3" in lowered or "phi3" in lowered:
        special = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN)
        attrs[(attrs & special) != 0] |= int(TokenAttr.RSTRIP)
        if "</s>" in token_to_id:
            attrs[token_to_id["</s>"]] |= int(TokenAttr.RSTRIP)
        for text in ("<unk>", "<s>", "<|endoftext|>"):
            if text in token_to_id:
                attrs[token_to_id[text]] &= ~int(TokenAttr.RSTRIP)


def _pre_defaults(model: str, pre: str) -> tuple[bool, bool]:
    """(add_bos, add_space_prefix) llama.cpp assumes before reading the file's own flags."""
    if model == "llama":
        return True, True
    return pre_tokenizer_spec(pre).add_bos, False


def load_vocab(path: str | Path) -> Vocab:
    """Read and interpret the tokenizer metadata of a GGUF file.

    Raises `ModelFileError` naming the file for a missing file, a missing/unsupported
    `tokenizer.ggml.model`, an unknown `tokenizer.ggml.pre`, or a malformed token list.
    """
    p = Path(path).expanduser()
    gguf_file = GGUFFile(p)
    try:
        meta = gguf_file.metadata  # parsed eagerly into Python objects and array copies
    finally:
        gguf_file.close()  # the tokenizer never needs the tensor data
    model = meta.get("tokenizer.ggml.model")
    if model is None:
        raise ModelFileError(f"{p}: no tokenizer.ggml.model key; this file carries no tokenizer")
    if model not in SUPPORTED_MODELS:
        raise ModelFileError(f"{p}: tokenizer.ggml.model={model!r} is not supported "
                             f"(supported: {', '.join(SUPPORTED_MODELS)})")
    model = str(model)
    pre = str(meta.get("tokenizer.ggml.pre") or "default")
    if model == "gpt2" and not meta.get("tokenizer.ggml.pre"):
        log.warning("%s: no tokenizer.ggml.pre; using the 'default' pre-tokenizer as llama.cpp does "
                    "(token ids may differ from the original tokenizer)", p)

    tokens = meta.get("tokenizer.ggml.tokens")
    if not isinstance(tokens, list) or not tokens:
        raise ModelFileError(f"{p}: tokenizer.ggml.tokens is missing or not a string array")
    for i, text in enumerate(tokens):
        if not text:
            tokens[i] = f"[EMPTY_{i}]"  # llama.cpp's placeholder, keeps ids unique
    n = len(tokens)
    token_to_id = dict(zip(tokens, range(n)))
    if len(token_to_id) != n:
        seen: dict[str, int] = {}
        for i, text in enumerate(tokens):
            if text in seen:
                raise ModelFileError(f"{p}: duplicate token {text!r} in the vocabulary (ids {seen[text]} and {i})")
            seen[text] = i

    scores_raw = meta.get("tokenizer.ggml.scores")
    if scores_raw is None:
        scores = np.zeros(n, dtype=np.float32)
    elif isinstance(scores_raw, np.ndarray) and len(scores_raw) >= n:
        scores = scores_raw[:n].astype(np.float32)
    else:
        raise ModelFileError(f"{p}: tokenizer.ggml.scores must be a numeric array of >= {n} entries")

    merges = meta.get("tokenizer.ggml.merges", [])
    if model == "gpt2" and not merges:
        raise ModelFileError(f"{p}: tokenizer.ggml.model='gpt2' but tokenizer.ggml.merges is missing")

    attrs = _token_attrs(meta, n, p)
    ids = _special_ids(meta, model, n, p)
    try:
        add_bos_default, add_space_default = _pre_defaults(model, pre)
    except ModelFileError as exc:
        raise ModelFileError(f"{p}: {exc}") from exc
    add_bos = _opt_bool(meta, "tokenizer.ggml.add_bos_token")
    add_space = _opt_bool(meta, "tokenizer.ggml.add_space_prefix")
    add_eos = _opt_bool(meta, "tokenizer.ggml.add_eos_token")
    _detect_roles(ids, attrs, token_to_id)
    eog = _eog_set(tokens, ids, attrs, token_to_id)
    _name_overrides(attrs, token_to_id, str(meta.get("general.name", "")))
    template = meta.get("tokenizer.chat_template")

    vocab = Vocab(
        path=p,
        model=model,
        pre=pre,
        tokens=tokens,
        attrs=attrs,
        scores=scores,
        merges=list(merges),
        token_to_id=token_to_id,
        special_ids=ids,
        add_bos=add_bos_default if add_bos is None else add_bos,
        add_eos=bool(add_eos),
        add_space_prefix=add_space_default if add_space is None else add_space,
        chat_template=str(template) if template else None,
        eog_ids=eog,
    )
    if vocab.add_bos and ids["bos"] is None:
        raise ModelFileError(f"{p}: tokenizer.ggml.add_bos_token is true but the file has no BOS token id")
    return vocab
