"""Structured output: a request's `response_format` as a grammar that constrains sampling
token by token (llguidance; see docs/benchmarks.md for why llguidance over xgrammar).

- `grammar_of(response_format)`: the grammar text of a `response_format` (None for plain
  text), or ValueError naming what is wrong with it (the HTTP 400, the `.jsonl` line's error);
  `lark_grammar(text)` the same for a grammar written in llguidance's Lark syntax (the
  server's tool calls).
- `GrammarVocab`: the model's vocabulary as llguidance needs it, built once per process from
  a `VocabSource` (the last stage's tokenizer).
- `Constraint`: one sequence's matcher: the mask of the tokens allowed next, and the token
  sampled. It lives on the last stage, next to the sequence's random stream, because that is
  where the logits are and the token is drawn: the mask needs no trip round the ring.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import llguidance
import torch

RESPONSE_FORMATS = ("text", "json_object", "json_schema")


def grammar_of(response_format: dict[str, Any] | None) -> str | None:
    """The llguidance grammar of an OpenAI `response_format`, or None for `text`; raises
    ValueError("response_format...: why")."""
    if response_format is None:
        return None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind not in RESPONSE_FORMATS:
        raise ValueError(f"response_format.type={kind!r}: must be one of {', '.join(RESPONSE_FORMATS)}")
    if kind == "text":
        return None
    if kind == "json_object":
        schema: Any = {"type": "object"}
    else:
        spec = response_format.get("json_schema")
        if not isinstance(spec, dict) or not isinstance(spec.get("schema", {}), dict):
            raise ValueError("response_format.json_schema: must be an object with a `schema` object")
        schema = spec.get("schema", {})
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(
            schema, defaults={"whitespace_flexible": False, "coerce_one_of": False})
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"response_format.json_schema: {exc}") from exc
    return _valid(grammar, "response_format.json_schema")


def lark_grammar(text: str) -> str:
    """The llguidance grammar of `text` in llguidance's Lark syntax; raises ValueError("grammar: why")."""
    try:
        grammar = llguidance.LLMatcher.grammar_from_lark(text)
    except (ValueError, TypeError, RuntimeError) as exc:
        raise ValueError(f"grammar: {exc}") from exc
    return _valid(grammar, "grammar")


def _valid(grammar: str, field: str) -> str:
    error = llguidance.LLMatcher.validate_grammar(grammar)
    if error and not error.startswith("WARNING"):
        raise ValueError(f"{field}: {error}")
    return grammar


@dataclass(frozen=True)
class VocabSource:
    """What llguidance needs of a tokenizer: every token's bytes, which ids are special
    (control tokens, never produced by text), the end-of-generation ids, and a tokenizer of
    plain text (no BOS, special tokens not parsed)."""

    pieces: Sequence[bytes]
    special_ids: Sequence[int]
    eos_ids: Sequence[int]
    bos_id: int | None
    encode: Callable[[str], list[int]]


class _Wrapped:
    """The object `llguidance.TokenizerWrapper` reads."""

    def __init__(self, source: VocabSource) -> None:
        special = set(source.special_ids)
        # llguidance marks special tokens with a leading 0xff byte, which no text can produce.
        self.tokens = [b"\xff" + p if i in special else p for i, p in enumerate(source.pieces)]
        self.special_token_ids = list(special)
        self.eos_token_id = source.eos_ids[0]
        self.bos_token_id = source.bos_id
        self._encode = source.encode

    def __call__(self, text: str) -> list[int]:
        return self._encode(text)


class GrammarVocab:
    """The vocabulary as llguidance needs it (building it takes a fraction of a second for a
    49k vocabulary: done once, on the first constrained sequence)."""

    def __init__(self, source: VocabSource) -> None:
        self.size = len(source.pieces)
        self.tokenizer = llguidance.LLTokenizer(llguidance.TokenizerWrapper(_Wrapped(source)),
                                                eos_token=list(source.eos_ids))

    def constraint(self, grammar: str, consumed: Sequence[int] = ()) -> Constraint:
        """A matcher for `grammar` (from `grammar_of` or `lark_grammar`) that has consumed the
        tokens `consumed` (a sequence resumed after a preemption: those it had drawn)."""
        matcher = llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)
        if consumed and not matcher.consume_tokens(list(consumed)):
            raise RuntimeError(f"the grammar refused the tokens it had allowed: {matcher.get_error()}")
        return Constraint(matcher, self.size)


_MASKS = ThreadPoolExecutor(max_workers=1, thread_name_prefix="grammar-mask")
"""Where the next masks are computed, while the ring carries the sampled tokens round."""


class Constraint:
    """One sequence's grammar state: which tokens may come next, advanced by each token drawn.

    The mask of the next token is computed in a background thread as soon as the token before
    is known (`advance`): the last stage then has it ready when the next logits arrive, instead
    of computing it between the output head and the sampler."""

    def __init__(self, matcher: llguidance.LLMatcher, vocab: int) -> None:
        # Imported with the first constraint: llguidance.torch pulls in torch's compiler stack
        # (about 115 MB of resident memory on every rank that imports it).
        import llguidance.torch

        self.matcher, self.vocab = matcher, vocab
        self._bitmask = llguidance.torch.allocate_token_bitmask(1, vocab)  # [1, ceil(V / 32)] int32
        self._next: Future[torch.Tensor] = _MASKS.submit(self._mask)

    def _mask(self) -> torch.Tensor:
        llguidance.torch.fill_next_token_bitmask(self.matcher, self._bitmask, 0)
        words = self._bitmask[0]  # [W] int32, bit j of word w = token 32 w + j
        bits = (words[:, None] >> torch.arange(32, dtype=torch.int32)) & 1  # [W, 32]
        return bits.reshape(-1)[: self.vocab].bool()

    def allowed(self) -> torch.Tensor:
        """Bool [V]: the tokens the grammar allows next (end-of-generation once it is complete)."""
        return self._next.result()

    def advance(self, token: int) -> None:
        self._next.result()  # the matcher is not shared with a mask still being computed
        if not self.matcher.consume_token(token):
            raise RuntimeError(f"the grammar refused token {token}: {self.matcher.get_error()}")
        # Also once the document is complete: the matcher then stops, and its mask is the end
        # tokens only.
        self._next = _MASKS.submit(self._mask)
