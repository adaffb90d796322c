"""Byte-level BPE (`tokenizer.ggml.model = gpt2`) on Hugging Face `tokenizers`.

Owns: the table of pre-tokenizer regex sets llama.cpp applies per `tokenizer.ggml.pre`
(src/llama-vocab.cpp), and building a `tokenizers.Tokenizer` that reproduces llama.cpp's
BPE on one text fragment: a chain of Split(regex, isolated) pre-tokenizers (each regex
splits the pieces of the previous one; text between matches stays a piece, as in
llama.cpp's `unicode_regex_split`), then ByteLevel without its own regex, then the
BPE(vocab, merges) model, whose rank-ordered merges with leftmost tie-breaking are
llama.cpp's. Special tokens never reach this module: `special.py` cuts them out first.
"""

from __future__ import annotations

from dataclasses import dataclass

from tokenizers import Regex, Tokenizer, models, pre_tokenizers

from ppinfer.errors import ModelFileError


@dataclass(frozen=True)
class PreTokenizerSpec:
    """How llama.cpp pre-tokenizes one `tokenizer.ggml.pre` family."""

    regexes: tuple[str, ...]
    ignore_merges: bool = False  # a word that is itself a token is emitted whole (llama3)
    add_bos: bool = False  # llama.cpp's add_bos default before the file's add_bos_token


# llama.cpp's regexes: the tokenizer.json ones, with (?i:...) contractions spelled out as
# character classes (llama.cpp's regex engine has no inline flags).
_CONTRACTIONS_CI = "(?:'[sS]|'[tT]|'[rR][eE]|'[vV][eE]|'[mM]|'[lL][lL]|'[dD])"
_GPT2 = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)"
_LLAMA3 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
_QWEN2 = (_CONTRACTIONS_CI + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")

_SPEC_DEFAULT = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|]+", _GPT2, r"\p{N}+", "[0-9][0-9][0-9]"))
_SPEC_GPT2 = PreTokenizerSpec((_GPT2,))
_SPEC_LLAMA3 = PreTokenizerSpec((_LLAMA3,), ignore_merges=True, add_bos=True)
_SPEC_LLAMA3_REGEX_ONLY = PreTokenizerSpec((_LLAMA3,))
_SPEC_QWEN2 = PreTokenizerSpec((_QWEN2,))
_SPEC_STARCODER = PreTokenizerSpec((r"\p{N}", _GPT2))
_SPEC_FALCON = PreTokenizerSpec((r"[\p{P}\$\+<=>\^~\|`]+", _GPT2, "[0-9][0-9][0-9]"))

# tokenizer.ggml.pre value -> spec, grouped as llama.cpp groups them.
PRE_TOKENIZERS: dict[str, PreTokenizerSpec] = {
    "default": _SPEC_DEFAULT,
    **dict.fromkeys(("gpt-2", "phi-2", "mpt", "olmo", "jais", "exaone4", "mellum", "trillion",
                     "granite-docling", "a.x-4.0", "gigachat"), _SPEC_GPT2),
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0",
                     "lfm2"), _SPEC_LLAMA3),
    **dict.fromkeys(("dbrx", "smaug-bpe"), _SPEC_LLAMA3_REGEX_ONLY),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "stablelm2", "megrez", "hunyuan", "solar-open"), _SPEC_QWEN2),
    **dict.fromkeys(("starcoder", "refact", "command-r", "smollm", "codeshell", "exaone", "minerva-7b",
                     "mellum2"), _SPEC_STARCODER),
    "falcon": _SPEC_FALCON,
}


def pre_tokenizer_spec(pre: str) -> PreTokenizerSpec:
    """The spec for a `tokenizer.ggml.pre` value; an unknown value is an error, never a fallback."""
    spec = PRE_TOKENIZERS.get(pre)
    if spec is None:
        raise ModelFileError(f"unknown tokenizer.ggml.pre {pre!r} for a gpt2 (BPE) vocabulary; "
                             f"known: {', '.join(sorted(PRE_TOKENIZERS))}")
    return spec


def build_pre_tokenizer(spec: PreTokenizerSpec) -> pre_tokenizers.PreTokenizer:
    """Split-regex chain followed by the GPT-2 byte-to-unicode mapping (ByteLevel, no regex)."""
    steps: list[pre_tokenizers.PreTokenizer] = [
        pre_tokenizers.Split(Regex(rx), behavior="isolated", invert=False) for rx in spec.regexes
    ]
    steps.append(pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False))
    return pre_tokenizers.Sequence(steps)


def _split_merge(line: str) -> tuple[str, str]:
    # llama.cpp splits at the first space after position 0, so a merge of a leading space
    # (never present after ByteLevel, but legal in the format) still parses.
    pos = line.find(" ", 1)
    if pos < 0:
        raise ModelFileError(f"malformed BPE merge {line!r} (expected 'left right')")
    return line[:pos], line[pos + 1:]


class BpeEncoder:
    """Encodes special-token-free text fragments with llama.cpp's byte-level BPE."""

    def __init__(self, token_to_id: dict[str, int], merges: list[str], pre: str) -> None:
        spec = pre_tokenizer_spec(pre)
        model = models.BPE(
            vocab=token_to_id,
            merges=[_split_merge(m) for m in merges],
            ignore_merges=spec.ignore_merges,
        )
        self._tok = Tokenizer(model)
        self._tok.pre_tokenizer = build_pre_tokenizer(spec)

    def encode(self, fragment: str) -> list[int]:
        # Through encode_batch: unlike encode, it releases the GIL while it works, so a long
        # prompt tokenized in a server thread does not stall the ring or the HTTP loop.
        return self._tok.encode_batch([fragment], add_special_tokens=False)[0].ids

    def pre_tokenize(self, text: str) -> list[str]:
        """The byte-level pieces BPE sees (for tests and debugging)."""
        return [piece for piece, _ in self._tok.pre_tokenizer.pre_tokenize_str(text)]
