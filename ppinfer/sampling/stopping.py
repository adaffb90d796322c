"""Per-sequence stop conditions: end-of-generation ids, stop strings and the token budget.

This file owns deciding when a sequence is finished and what its final ``token_ids`` and
``text`` are. It knows nothing of the tokenizer class: it is handed an incremental decoder
(``Tokenizer.stream``), so each token is decoded once, and finding stop strings and the text
that may be streamed looks only at the end of the text: the work per token does not grow with
the answer.

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
from dataclasses import dataclass, field
from typing import Literal, Protocol

FinishReason = Literal["stop", "length", "cancelled", "error"]
"""Why a sequence ended: its own stop conditions ("stop": an end-of-generation token or a stop
string, "length": its token budget; the only two a `StopState` sets), its owner ("cancelled")
or a failure ("error")."""


class TextDecoder(Protocol):
    """Token ids in, text out, one token at a time (``ppinfer.text.IncrementalDecoder``)."""

    def push(self, token_id: int) -> str:
        """The text the token completes (an incomplete character is held back)."""

    def flush(self) -> str:
        """What is held back, at the end (an incomplete character becomes U+FFFD)."""

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
    """The generated tokens of one sequence, its text, and whether (and why) it has finished.

    The text grows one decoded piece per token. A stop string can only complete inside the
    newest piece, so it is looked for in that piece and the `longest stop - 1` characters
    before it. `stable_text` hands out the text that can no longer change (for streaming).
    """

    def __init__(self, conditions: StopConditions, decoder: TextDecoder) -> None:
        self.conditions = conditions
        self._decoder = decoder
        self.token_ids: list[int] = []
        """Generated token ids, the end-of-generation id included when one ended the run."""
        self.finish_reason: FinishReason | None = None
        self.stop_reason: int | str | None = None
        """What stopped it: the end-of-generation id or the stop string (None for "length")."""
        self._pieces: list[str] = []  # the text, piece by piece
        self._length = 0  # characters in `_pieces`
        self._window = ""  # the text's last `longest stop - 1` characters
        self._keep = max((len(stop) for stop in conditions.stop_strings), default=1) - 1
        self._end: int | None = None  # where the final text ends (before a stop string)
        self._stable = 0  # characters handed out by `stable_text`
        self._stable_ids = 0  # token ids handed out with them

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
        match = self._add_text(self._decoder.push(token_id))
        if match is not None:
            self._end, stop = match
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
        """The generated text so far (whole characters only until it finishes): without a final
        end-of-generation token, cut before a stop string."""
        return "".join(self._pieces)[: self._end]

    def stable_text(self) -> tuple[str, tuple[int, ...]]:
        """The text no later token can change, not handed out before, and the token ids since
        the last call: while running, never the start of a possible stop string; once
        finished, the rest of the final text."""
        if self.finished:
            end = self._length if self._end is None else self._end
        else:
            end = self._length - self._held_back()
        if end <= self._stable:
            return "", ()
        text = self._text_between(self._stable, end)
        ids = tuple(self.token_ids[self._stable_ids:])
        self._stable, self._stable_ids = end, len(self.token_ids)
        return text, ids

    def _held_back(self) -> int:
        """Characters at the end of the text that begin some stop string."""
        tail = self._window
        held = 0
        for stop in self.conditions.stop_strings:
            for n in range(min(len(stop) - 1, len(tail)), held, -1):
                if tail.endswith(stop[:n]):
                    held = n
                    break
        return held

    def _add_text(self, piece: str) -> tuple[int, str] | None:
        """Append a decoded piece; the earliest stop string it completes (first listed on a
        tie), as (where it starts in the text, the stop string)."""
        before = self._length
        self._pieces.append(piece)
        self._length += len(piece)
        window = self._window + piece  # the text from `self._length - len(window)`
        start = self._length - len(window)
        best: tuple[int, str] | None = None
        for stop in self.conditions.stop_strings:
            # Only a match that ends in the new piece is new.
            at = window.find(stop, max(0, before - start - len(stop) + 1))
            if at >= 0 and (best is None or start + at < best[0]):
                best = (start + at, stop)
        self._window = window[len(window) - self._keep:] if self._keep else ""
        return best

    def _text_between(self, begin: int, end: int) -> str:
        """Characters [begin, end) of the text, joining only the pieces that hold them."""
        parts, at = [], self._length
        for piece in reversed(self._pieces):
            if at <= begin:
                break
            parts.append(piece)
            at -= len(piece)
        joined = "".join(reversed(parts))
        return joined[begin - at: end - at]

    def _finish(self, reason: FinishReason, stop_reason: int | str | None) -> None:
        held = self._decoder.flush()
        if held and self._end is None:
            self._add_text(held)
        self.finish_reason = reason
        self.stop_reason = stop_reason
