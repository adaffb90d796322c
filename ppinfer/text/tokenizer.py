"""The public tokenizer: `load_tokenizer(path) -> Tokenizer`, matching llama.cpp's token ids.

Owns the encode pipeline (special-token partition, then SPM or byte-level BPE per raw
fragment, BOS and the SPM space prefix), decoding, streaming and chat templates, each
delegated to its module: `vocab` (metadata), `special` (partition), `spm` / `bpe`
(fragment encoders), `detokenize` (pieces, streaming) and `chat` (Jinja).
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ppinfer.errors import ModelFileError, PromptError
from ppinfer.text.bpe import BpeEncoder
from ppinfer.text.chat import render_chat_template
from ppinfer.text.detokenize import IncrementalDecoder, PieceTable, decode_pieces
from ppinfer.text.special import Fragment, SpecialMatcher, SpecialToken
from ppinfer.text.spm import SpmEncoder
from ppinfer.text.vocab import TokenAttr, Vocab, load_vocab

log = logging.getLogger(__name__)

_SPACE_ESCAPE = "\u2581"  # SentencePiece's visible space "▁"


class Tokenizer:
    """Tokenizer of one GGUF file.

    Attributes: `vocab_size`, `bos_id`, `eos_id` (None when absent), `eog_ids` (every id
    that ends generation, as llama.cpp computes it), `add_bos` (the file's, or llama.cpp's
    default for the vocabulary type), `chat_template` (None when the file has none).
    """

    def __init__(self, vocab: Vocab) -> None:
        self._vocab = vocab
        self.path: Path = vocab.path
        self.vocab_size: int = vocab.size
        self.bos_id: int | None = vocab.special_ids["bos"]
        self.eos_id: int | None = vocab.special_ids["eos"]
        self.eog_ids: frozenset[int] = vocab.eog_ids
        self.add_bos: bool = vocab.add_bos
        self.chat_template: str | None = vocab.chat_template
        self._pieces = PieceTable(vocab)
        self._matchers: dict[bool, SpecialMatcher] = {}
        self._spm: SpmEncoder | None = None
        self._bpe: BpeEncoder | None = None
        if vocab.model == "llama":
            self._spm = SpmEncoder(vocab.token_to_id, vocab.scores.tolist(), vocab.special_ids["unk"])
        else:
            self._bpe = BpeEncoder(vocab.token_to_id, vocab.merges, vocab.pre)
        if vocab.add_eos:
            log.info("%s: add_eos_token is set; encode() never appends EOS to a prompt", vocab.path)

    def __repr__(self) -> str:
        return (f"Tokenizer({str(self.path)!r}, model={self._vocab.model!r}, pre={self._vocab.pre!r}, "
                f"vocab_size={self.vocab_size})")

    # -- special tokens ---------------------------------------------------------------

    def _matcher(self, parse_special: bool) -> SpecialMatcher:
        """Built on first use: compiling gemma's 6,400-token scan regex is not free."""
        matcher = self._matchers.get(parse_special)
        if matcher is None:
            v = self._vocab
            if parse_special:
                wanted, blocked = int(TokenAttr.CONTROL | TokenAttr.USER_DEFINED | TokenAttr.UNKNOWN), 0
            else:
                # Only user-defined tokens are cut out (llama.cpp, like HF's added tokens); one
                # that llama.cpp forced to CONTROL (e.g. gemma's "</s>") counts as control.
                wanted, blocked = int(TokenAttr.USER_DEFINED), int(TokenAttr.CONTROL | TokenAttr.UNKNOWN)
            specials = [
                SpecialToken(v.tokens[i], i, bool(a & TokenAttr.LSTRIP), bool(a & TokenAttr.RSTRIP))
                for i, a in enumerate(v.attrs.tolist())
                if a & wanted and not a & blocked
            ]
            matcher = SpecialMatcher(specials)
            self._matchers[parse_special] = matcher
        return matcher

    # -- encode -----------------------------------------------------------------------

    def encode(self, text: str, add_bos: bool | None = None, parse_special: bool = True) -> list[int]:
        """Token ids of `text`, as llama.cpp's `llama_tokenize` gives them.

        add_bos: None follows the file (`tokenizer.ggml.add_bos_token`, else llama.cpp's
        default for the vocabulary type); True/False force it. parse_special: match control
        tokens such as `<|im_start|>` in the text (user-defined tokens always match).
        EOS is never appended, whatever `add_eos_token` says: these ids are prompts.
        """
        if not isinstance(text, str):
            raise PromptError(f"text to encode must be a str, got {type(text).__name__}: {text!r}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise PromptError(f"text has a lone surrogate {text[exc.start]!r} at index {exc.start}; "
                              "only valid Unicode can be tokenized") from exc
        with_bos = self.add_bos if add_bos is None else bool(add_bos)
        if with_bos and self.bos_id is None:
            raise PromptError(f"add_bos=True but {self.path} defines no BOS token")
        fragments = self._matcher(parse_special).partition(text)
        out: list[int] = [self.bos_id] if with_bos and self.bos_id is not None else []
        if self._spm is not None:
            self._encode_spm(self._spm, text, fragments, out)
        elif self._bpe is not None:
            for frag in fragments:
                if isinstance(frag, int):
                    out.append(frag)
                else:
                    out.extend(self._bpe.encode(text[frag[0]:frag[1]]))
        return out

    def _encode_spm(self, spm: SpmEncoder, text: str, fragments: list[Fragment], out: list[int]) -> None:
        space_prefix = self._vocab.add_space_prefix
        # llama.cpp prefixes a space to the first raw fragment and to every raw fragment
        # that follows a special token (a BOS counts as one).
        prev_special = True
        for frag in fragments:
            if isinstance(frag, int):
                out.append(frag)
                prev_special = True
                continue
            raw = text[frag[0]:frag[1]]
            if space_prefix and prev_special:
                raw = " " + raw
            out.extend(spm.encode(raw.replace(" ", _SPACE_ESCAPE)))
            prev_special = False

    # -- decode -----------------------------------------------------------------------

    def decode(self, ids: Sequence[int], skip_special: bool = False) -> str:
        """Text of `ids`. skip_special drops control/unknown tokens (user-defined ones stay).

        Bytes that do not form valid UTF-8 become U+FFFD. With `add_space_prefix`, one
        leading space of the first token is removed (llama.cpp's detokenize rule).
        """
        return decode_pieces(self._pieces, ids, skip_special, self._vocab.add_space_prefix)

    def stream(self, skip_special: bool = False) -> IncrementalDecoder:
        """A decoder fed one token at a time; its outputs concatenate to `decode(ids)`."""
        return IncrementalDecoder(self._pieces, skip_special, self._vocab.add_space_prefix)

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """UTF-8 bytes of the longest vocabulary entry as stored: no token stands for more
        bytes of text (a stored entry spells a space as "▁", a byte as "<0xXX>" or a byte-level
        character of at least one byte)."""
        return max(len(token.encode("utf-8")) for token in self._vocab.tokens)

    def token_bytes(self, token_id: int) -> bytes:
        """The bytes `token_id` stands for when decoded, special tokens spelled out."""
        return self._pieces.piece(token_id, True)

    def token_text(self, token_id: int) -> str:
        """The vocabulary entry of `token_id` as stored in the file (e.g. 'Ġthe', '▁the', '<0x0A>')."""
        self._pieces.check(token_id)
        return self._vocab.tokens[token_id]

    # -- chat -------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: list[dict[str, Any]],
        add_generation_prompt: bool = True,
        template: str | None = None,
        tools: list[dict[str, Any]] | None = None,
    ) -> str:
        """Render `messages` (and `tools`, OpenAI's function definitions) with `template`, else
        the file's `tokenizer.chat_template`.

        The result is a prompt string to `encode(..., parse_special=True)`. Raises
        `ModelFileError` when there is no template at all.
        """
        source = "the chat_template argument" if template is not None else str(self.path)
        tmpl = template if template is not None else self.chat_template
        if tmpl is None:
            raise ModelFileError(
                f"{self.path} has no tokenizer.chat_template; give one to use chat mode "
                "(model.chat_template=<jinja template> on the command line, template= in Python)"
            )
        return render_chat_template(
            tmpl,
            messages,
            add_generation_prompt=add_generation_prompt,
            bos_token=self._vocab.tokens[self.bos_id] if self.bos_id is not None else "",
            eos_token=self._vocab.tokens[self.eos_id] if self.eos_id is not None else "",
            source=source,
            tools=tools,
        )

    def control_token(self, text: str) -> int | None:
        """The id of the control token spelled `text` (e.g. `[TOOL_CALLS]`), None if there is
        none: such a token is never produced by plain text."""
        ids = self.encode(text, add_bos=False, parse_special=True)
        if len(ids) == 1 and int(self._vocab.attrs[ids[0]]) & int(TokenAttr.CONTROL):
            return ids[0]
        return None


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Read the tokenizer of the GGUF file at `path` (only its metadata is read)."""
    vocab = load_vocab(path)
    try:
        return Tokenizer(vocab)
    except ModelFileError as exc:
        raise ModelFileError(f"{vocab.path}: {exc}") from exc
