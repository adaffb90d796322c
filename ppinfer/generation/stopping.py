"""Per-sequence stop conditions: end-of-generation ids, stop strings and the token budget.

This file owns deciding when a sequence is finished and what its final ``token_ids`` and
``text`` are. It knows nothing of the tokenizer class: it is handed a ``decode`` callable.

Conventions (those of vLLM; llama.cpp's server agrees on the text):
- An end-of-generation token (any id in ``eog_ids``: eos, eot, <|im_end|>, ...) finishes the
  sequence with ``finish_reason="stop"``. Its id is kept as the last entry of ``token_ids``
  (so callers can see which one ended it) but is excluded from ``text``.
- A stop string is looked for in the decoded generated text (never in the prompt); when one
  appears, ``text`` is cut just before it, ``finish_reason="stop"``, and ``token_ids`` keeps
  every token generated up to the one that completed it.
- Reaching ``max_new_tokens`` finishes with ``finish_reason="length"``. When the last allowed
  token is also an end-of-generation token or completes a stop string, "stop" wins.
- ``ignore_eos=True`` (for benchmarks) makes end-of-generation ids ordinary tokens: they
  neither stop the sequence nor get removed from the text. Stop strings still apply.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

FinishReason = Literal["stop", "length"]

STOP_ESCAPES = {"n": "\n", "r": "\r", "t": "\t", "\\": "\\"}
r"""The one-character escapes ``unescape_stop_string`` knows (besides ``\uXXXX``)."""

_ESCAPE = re.compile(r"\\(u[0-9A-Fa-f]{4}|.?)", re.DOTALL)


def unescape_stop_string(raw: str) -> str:
    r"""Interpret the escapes of a stop string typed on a command line or in a config file.

    Hydra hands ``generation.stop='["\n\n"]'`` over with a literal backslash-n, so the usual
    escapes are decoded here, and only these: ``\n`` (newline), ``\r`` (carriage return),
    ``\t`` (tab), ``\\`` (one backslash) and ``\uXXXX`` (the character with that 4-digit hex
    code point). Any other backslash sequence, a lone trailing backslash, or a ``\u`` code
    that is a surrogate raises ``ValueError`` naming it, rather than guessing what was meant.
    Text that is already decoded (a real newline, e.g. from a YAML double-quoted string)
    passes through unchanged.
    """
    return _ESCAPE.sub(_decode_escape, raw)


def _decode_escape(match: re.Match[str]) -> str:
    code = match.group(1)
    if code in STOP_ESCAPES:
        return STOP_ESCAPES[code]
    if len(code) == 5:  # u + 4 hex digits
        point = int(code[1:], 16)
        if 0xD800 <= point <= 0xDFFF:
            raise ValueError(f"\\{code} is a surrogate, not a character")
        return chr(point)
    if not code:
        raise ValueError("ends with a lone backslash (write \\\\ for a backslash)")
    shown = code if code.isprintable() else repr(code)  # a real newline would split the message
    raise ValueError(
        f"unknown escape \\{shown} (known: \\n \\r \\t \\\\ \\uXXXX; write \\\\ for a backslash)"
    )


@dataclass(frozen=True)
class StopConditions:
    """When sequences of a run stop; shared by all of them."""

    max_new_tokens: int
    """Most tokens generated per sequence (end-of-generation token included)."""
    eog_ids: frozenset[int] = field(default_factory=frozenset)
    """End-of-generation token ids, as given by the tokenizer's ``eog_ids``."""
    stop_strings: tuple[str, ...] = ()
    """Strings that end generation when they appear in the generated text."""
    ignore_eos: bool = False
    """Treat end-of-generation ids as ordinary tokens (benchmarks)."""

    def __post_init__(self) -> None:
        # Accept any iterable (a list from Hydra, the tokenizer's set) but store hashable,
        # immutable values so the conditions can be shared by every sequence.
        object.__setattr__(self, "eog_ids", frozenset(self.eog_ids))
        stops = self.stop_strings
        # A lone string is one stop string, not a sequence of one-character stop strings.
        stops = (stops,) if isinstance(stops, str) else tuple(stops)
        object.__setattr__(self, "stop_strings", stops)
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {self.max_new_tokens!r}")
        for stop in self.stop_strings:
            if not isinstance(stop, str) or not stop:
                raise ValueError(f"stop strings must be non-empty strings, got {stop!r}")


class StopState:
    """The generated tokens of one sequence and whether (and why) it has finished."""

    def __init__(self, conditions: StopConditions, decode: Callable[[list[int]], str]) -> None:
        self.conditions = conditions
        self._decode = decode
        self.token_ids: list[int] = []
        """Generated token ids, the end-of-generation id included when one ended the run."""
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        """What stopped it: the end-of-generation id or the stop string (None for "length")."""
        self._stop_text: str | None = None
        self._text_cache: tuple[int, str] = (0, "")

    @property
    def finished(self) -> bool:
        """True once a stop condition has been met; no more tokens may be appended."""
        return self.finish_reason is not None

    def append(self, token_id: int) -> bool:
        """Record the next generated token; returns True if the sequence is now finished."""
        if self.finished:
            raise RuntimeError(
                f"append({token_id}) after the sequence finished ({self.finish_reason})"
            )
        self.token_ids.append(token_id)
        conditions = self.conditions
        # Checked in vLLM's order, so "stop" wins over "length" on the last allowed token.
        if not conditions.ignore_eos and token_id in conditions.eog_ids:
            self._finish("stop", token_id)
            return True
        match = self._find_stop_string()
        if match is not None:
            at, stop = match
            self._stop_text = self._decoded(self.token_ids)[:at]
            self._finish("stop", stop)
            return True
        if len(self.token_ids) >= conditions.max_new_tokens:
            self._finish("length", None)
        return self.finished

    def finish(self, reason: FinishReason) -> None:
        """End the sequence for a reason found outside (e.g. "length" when the context is full)."""
        if not self.finished:
            self._finish(reason, None)

    @property
    def text(self) -> str:
        """The generated text: without a final end-of-generation token, cut before a stop string."""
        if self._stop_text is not None:
            return self._stop_text
        ended_by_eog = isinstance(self.stop_reason, int)
        return self._decoded(self.token_ids[:-1] if ended_by_eog else self.token_ids)

    def _find_stop_string(self) -> tuple[int, str] | None:
        """The earliest stop string in the text so far (first listed on a tie) and its offset."""
        if not self.conditions.stop_strings:
            return None
        text = self._decoded(self.token_ids)
        best: tuple[int, str] | None = None
        for stop in self.conditions.stop_strings:
            at = text.find(stop)
            if at >= 0 and (best is None or at < best[0]):
                best = (at, stop)
        return best

    def _decoded(self, ids: list[int]) -> str:
        # The whole generated sequence is decoded, not just the new token: detokenizers merge
        # across token boundaries (byte fallback, leading-space rules), so increments lie.
        # Cached by length: `ids` is always a prefix of the growing token_ids list.
        if self._text_cache[0] != len(ids):
            self._text_cache = (len(ids), self._decode(list(ids)))
        return self._text_cache[1]

    def _finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        self.finish_reason = reason
        self.stop_reason = stop_reason
