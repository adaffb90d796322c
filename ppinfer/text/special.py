"""Cutting special tokens out of raw text before tokenization (llama.cpp's `tokenizer_st_partition`).

llama.cpp's rule: take the special tokens (control, user-defined, unknown; control and
unknown only when special parsing is on) in order of decreasing byte length; for each,
split every remaining raw-text fragment at each of its occurrences, left to right. Tokens
flagged LSTRIP/RSTRIP also eat the whitespace on that side.

Done literally, that is one substring search per special token per prompt: 6,400 of
them for gemma-3. So a single overlapping regex scan first finds which special tokens occur
at all (at each position, the longest special starting there; every shorter special
starting there is one of its prefixes), and the literal rule then runs over that handful.
The scan regex is a trie, so each text position costs a few character tests, not one per
special token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# A fragment is either a token id (already resolved) or a raw text slice [start, end).
Fragment = int | tuple[int, int]

_C_ISSPACE = " \t\n\v\f\r"  # llama.cpp strips with C isspace()


@dataclass(frozen=True)
class SpecialToken:
    text: str
    token_id: int
    lstrip: bool = False
    rstrip: bool = False


def _trie_regex(texts: list[str]) -> str:
    """A regex matching the longest of `texts` at a position (nested groups by shared prefix)."""
    trie: dict = {}
    for text in texts:
        node = trie
        for ch in text:
            node = node.setdefault(ch, {})
        node[""] = True  # end-of-token marker

    def emit(node: dict) -> str:
        terminal = "" in node
        branches = []
        for ch in sorted(k for k in node if k):
            # Collapse single-child chains into one literal so nesting depth stays small.
            literal, child = ch, node[ch]
            while len(child) == 1 and "" not in child:
                (nch, nchild), = child.items()
                literal, child = literal + nch, nchild
            branches.append(re.escape(literal) + emit(child))
        if not branches:
            return ""
        body = branches[0] if len(branches) == 1 else "(?:" + "|".join(branches) + ")"
        # Greedy optional: prefer the longer token when this node also ends one.
        return f"(?:{body})?" if terminal else body

    return emit(trie)


class SpecialMatcher:
    """Partitions text into token ids and raw fragments for one set of special tokens."""

    def __init__(self, specials: list[SpecialToken]) -> None:
        # Longest (in UTF-8 bytes, like llama.cpp) first; ids break ties deterministically.
        self._order = sorted(specials, key=lambda s: (-len(s.text.encode("utf-8")), s.token_id))
        self._by_text = {s.text: s for s in specials}
        self._rank = {s.text: i for i, s in enumerate(self._order)}
        self._scan: re.Pattern[str] | None = None
        if specials:
            self._scan = re.compile("(?=(" + _trie_regex([s.text for s in specials]) + "))")

    def _present(self, text: str) -> list[SpecialToken]:
        """Special tokens occurring anywhere in `text`, in llama.cpp's processing order."""
        if self._scan is None:
            return []
        longest = {m.group(1) for m in self._scan.finditer(text)}
        found = set(longest)
        for s in longest:
            found.update(s[:k] for k in range(1, len(s)) if s[:k] in self._by_text)
        return sorted((self._by_text[t] for t in found), key=lambda s: self._rank[s.text])

    def partition(self, text: str) -> list[Fragment]:
        """Split `text` into special token ids and raw (start, end) slices, in order."""
        fragments: list[Fragment] = [(0, len(text))] if text else []
        for special in self._present(text):
            fragments = _split_on(text, fragments, special)
        return fragments


def _split_on(text: str, fragments: list[Fragment], special: SpecialToken) -> list[Fragment]:
    out: list[Fragment] = []
    needle, width = special.text, len(special.text)
    for frag in fragments:
        if isinstance(frag, int):
            out.append(frag)
            continue
        start, end = frag
        while True:
            pos = text.find(needle, start, end)
            if pos < 0:
                if start < end:
                    out.append((start, end))
                break
            left_end = pos
            if special.lstrip:
                while left_end > start and text[left_end - 1] in _C_ISSPACE:
                    left_end -= 1
            if left_end > start:
                out.append((start, left_end))
            out.append(special.token_id)
            start = pos + width
            if special.rstrip:
                while start < end and text[start] in _C_ISSPACE:
                    start += 1
    return out
