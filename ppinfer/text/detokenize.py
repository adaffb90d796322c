"""Token ids back to text: per-token byte pieces and the incremental (streaming) decoder.

Owns llama.cpp's `token_to_piece` rules, computed as bytes so multi-byte characters split
over several tokens (byte-fallback `<0xXX>` tokens, byte-level BPE) reassemble exactly:

- control/unknown tokens render their text, or nothing when specials are skipped;
- user-defined tokens always render their text;
- normal tokens: SPM maps "▁" to a space; byte-level BPE maps each character back
  through the GPT-2 byte table;
- byte tokens `<0xXX>` are that byte; unused/undefined tokens render nothing.

Leading space: when the vocabulary has `add_space_prefix`, llama.cpp strips one leading
space from the *first* token's piece only. A leading BOS is that first token, so the
space after BOS is kept (llama.cpp's `detokenize`). Whole-sequence decoding and the
streaming decoder both follow this, so their outputs agree.
"""

from __future__ import annotations

import codecs
from collections.abc import Sequence

from ppinfer.errors import PromptError
from ppinfer.text.vocab import TokenAttr, Vocab

_SPECIAL = int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)
_RAW_TEXT = _SPECIAL | int(TokenAttr.USER_DEFINED)
_NORMAL = int(TokenAttr.NORMAL)
_BYTE = int(TokenAttr.BYTE)


def gpt2_unicode_to_byte() -> dict[str, int]:
    """Inverse of GPT-2's byte-to-unicode table used by byte-level BPE vocabularies.

    Printable Latin-1 bytes stand for themselves; the other 68 bytes (controls, space,
    DEL, NBSP, soft hyphen...) are shifted, in byte order, to U+0100 onwards.
    """
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table = {chr(b): b for b in printable}
    shifted = 0
    for b in range(256):
        if b not in printable:
            table[chr(256 + shifted)] = b
            shifted += 1
    return table


class PieceTable:
    """Lazily computed byte piece of every token, for both special-token modes."""

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab
        self._byte_level = vocab.model == "gpt2"
        self._u2b = gpt2_unicode_to_byte() if self._byte_level else {}
        self._cache: tuple[dict[int, bytes], dict[int, bytes]] = ({}, {})

    def check(self, token_id: int) -> None:
        if not 0 <= token_id < self._vocab.size:
            raise PromptError(f"token id {token_id} is outside the vocabulary (0..{self._vocab.size - 1}) "
                              f"of {self._vocab.path}")

    def piece(self, token_id: int, render_special: bool) -> bytes:
        cache = self._cache[render_special]
        piece = cache.get(token_id)
        if piece is None:
            self.check(token_id)
            piece = self._compute(token_id, render_special)
            cache[token_id] = piece
        return piece

    def _compute(self, token_id: int, render_special: bool) -> bytes:
        attr = int(self._vocab.attrs[token_id])
        text = self._vocab.tokens[token_id]
        if attr & _SPECIAL and not render_special:
            return b""
        if attr & _RAW_TEXT:
            return text.encode("utf-8")
        if attr & _NORMAL:
            if self._byte_level:
                u2b = self._u2b
                # A character outside the byte table (malformed vocabulary) keeps its own UTF-8.
                return b"".join(bytes([u2b[c]]) if c in u2b else c.encode("utf-8") for c in text)
            return text.replace("\u2581", " ").encode("utf-8")
        if attr & _BYTE:
            return bytes([int(text[3:5], 16)])
        return b""


def decode_pieces(table: PieceTable, ids: Sequence[int], skip_special: bool, strip_first_space: bool) -> str:
    """Whole-sequence decode: join byte pieces, strip the first piece's leading space if asked."""
    pieces = [table.piece(int(t), not skip_special) for t in ids]
    if strip_first_space and pieces and pieces[0][:1] == b" ":
        pieces[0] = pieces[0][1:]
    return b"".join(pieces).decode("utf-8", "replace")


class IncrementalDecoder:
    """Streaming decode: `push` returns only completed text, never a broken character.

    Bytes of a character still incomplete (e.g. the first of an emoji's byte tokens) are
    held back until a later token completes it; invalid bytes become U+FFFD exactly where
    whole-sequence decoding would put them. `flush` releases whatever is left.
    """

    def __init__(self, table: PieceTable, skip_special: bool, strip_first_space: bool) -> None:
        self._table = table
        self._render_special = not skip_special
        self._strip_first_space = strip_first_space
        self._first = True
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        """Add one token; return the text it completes (possibly empty)."""
        piece = self._table.piece(int(token_id), self._render_special)
        if self._first:
            self._first = False
            if self._strip_first_space and piece[:1] == b" ":
                piece = piece[1:]
        return self._utf8.decode(piece)

    def flush(self) -> str:
        """End of stream: return held-back bytes (an incomplete character becomes U+FFFD)."""
        return self._utf8.decode(b"", final=True)
