"""SentencePiece-style tokenization (`tokenizer.ggml.model = llama`), as llama.cpp does it.

Owns llama.cpp's SPM algorithm (`llm_tokenizer_spm_session`), written from its
description rather than rebuilt through the sentencepiece library (a rebuilt model
misses Gemma's user-defined whitespace-run tokens):

1. The fragment (spaces already escaped to U+2581 "▁") starts as one symbol per character.
2. Every adjacent pair whose concatenation is a vocabulary token is queued, best score
   first, leftmost first on equal scores.
3. The best pair is merged; pairs that went stale (either side changed since queueing)
   are skipped; the new symbol's pairs with its neighbours are queued. Repeat.
4. Each final symbol is its token, or, if the text is not in the vocabulary (only possible
   for an unmerged single character), its UTF-8 bytes as `<0xXX>` byte tokens.

Symbols are contiguous slices of the fragment, so a symbol is just (start, length) and
its text is a slice: no per-symbol strings are kept.
"""

from __future__ import annotations

import heapq

from ppinfer.errors import ModelFileError


class SpmEncoder:
    """Encodes special-token-free, whitespace-escaped fragments into token ids."""

    def __init__(self, token_to_id: dict[str, int], scores: list[float], unk_id: int | None) -> None:
        self._ids = token_to_id
        self._scores = scores  # per id, as Python floats: float32 values compare exactly
        self._unk = unk_id
        self._byte_ids = [self._byte_token(b) for b in range(256)]

    def _byte_token(self, b: int) -> int | None:
        tid = self._ids.get(f"<0x{b:02X}>")
        if tid is None and b < 0x80:
            tid = self._ids.get(chr(b))  # llama.cpp falls back to the byte as a one-char token
        return tid

    def _bytes_of(self, text: str) -> list[int]:
        out: list[int] = []
        for b in text.encode("utf-8"):
            tid = self._byte_ids[b]
            if tid is None:
                if self._unk is None:
                    raise ModelFileError(f"SPM vocabulary has no byte token <0x{b:02X}> and no unknown token "
                                         f"to encode {text!r}")
                tid = self._unk
            out.append(tid)
        return out

    def encode(self, text: str) -> list[int]:
        n = len(text)
        if n == 0:
            return []
        ids, scores = self._ids, self._scores
        length = [1] * n  # symbol i covers text[i : i + length[i]]; 0 = merged away
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        nxt[-1] = -1

        # Heap entries: (-score, left, right, size); heapq pops the highest score, then
        # the smallest left index: llama.cpp's order. `size` detects stale pairs because
        # symbols only ever grow.
        heap: list[tuple[float, int, int, int]] = []
        for i in range(n - 1):
            tid = ids.get(text[i:i + 2])
            if tid is not None:
                heap.append((-scores[tid], i, i + 1, 2))
        heapq.heapify(heap)
        push, pop = heapq.heappush, heapq.heappop

        while heap:
            _, left, right, size = pop(heap)
            left_len, right_len = length[left], length[right]
            if left_len == 0 or right_len == 0 or left_len + right_len != size:
                continue
            length[left] = size
            length[right] = 0
            after = nxt[right]
            nxt[left] = after
            if after >= 0:
                prev[after] = left
            before = prev[left]
            if before >= 0:
                merged = length[before] + size
                tid = ids.get(text[before:before + merged])
                if tid is not None:
                    push(heap, (-scores[tid], before, left, merged))
            if after >= 0:
                merged = size + length[after]
                tid = ids.get(text[left:left + merged])
                if tid is not None:
                    push(heap, (-scores[tid], left, after, merged))

        out: list[int] = []
        i = 0
        while i != -1:
            piece = text[i:i + length[i]]
            tid = ids.get(piece)
            if tid is not None:
                out.append(tid)
            else:
                out.extend(self._bytes_of(piece))
            i = nxt[i]
        return out
