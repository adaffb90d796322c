"""Tokenizer tests against independent references.

References: llama.cpp's own token ids (`tokenizer_llamacpp.json`), the source texts
themselves (round trips), hand-derived results on tiny hand-written GGUF vocabularies,
and hand-derived pre-tokenizer splits per llama.cpp regex set.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from pathlib import Path

import gguf
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from ppinfer.errors import ModelFileError, PromptError
from ppinfer.text.bpe import PRE_TOKENIZERS, build_pre_tokenizer
from ppinfer.text.detokenize import gpt2_unicode_to_byte
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

FIXTURES = Path(__file__).parent / "fixtures"  # copies of shared/fixtures (llama.cpp ids)
LLAMACPP_IDS = json.loads((FIXTURES / "tokenizer_llamacpp.json").read_text())
GEMMA3_VOCAB = FIXTURES / "gemma3-270m-vocab-only.gguf"


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


@pytest.fixture(scope="module")
def gemma3() -> Tokenizer:
    return load_tokenizer(GEMMA3_VOCAB)


def _encode_mode(tok: Tokenizer, text: str, mode: str) -> list[int]:
    # Modes as the fixture defines them.
    if mode == "plain":
        return tok.encode(text, add_bos=False, parse_special=False)
    if mode == "special":
        return tok.encode(text, add_bos=False, parse_special=True)
    assert mode == "bos"
    return tok.encode(text)


CASES = [(case["text"], mode) for case in LLAMACPP_IDS["cases"] for mode in ("plain", "special", "bos")]


# -- llama.cpp ids -------------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(("text", "mode"), CASES)
def test_smollm2_matches_llamacpp(smollm2: Tokenizer, text: str, mode: str) -> None:
    expected = next(c for c in LLAMACPP_IDS["cases"] if c["text"] == text)["smollm2"][mode]
    assert _encode_mode(smollm2, text, mode) == expected


@pytest.mark.parametrize(("text", "mode"), CASES)
def test_gemma3_matches_llamacpp(gemma3: Tokenizer, text: str, mode: str) -> None:
    expected = next(c for c in LLAMACPP_IDS["cases"] if c["text"] == text)["gemma3"][mode]
    assert _encode_mode(gemma3, text, mode) == expected


@pytest.mark.slow
def test_smollm2_attributes(smollm2: Tokenizer) -> None:
    assert smollm2.vocab_size == 49152
    assert (smollm2.bos_id, smollm2.eos_id, smollm2.add_bos) == (1, 2, False)
    # llama.cpp's EOG rule on this vocabulary: eos 2 '<|im_end|>', the EOG-listed text
    # '<|endoftext|>' (0), and '<reponame>' (4), which llama.cpp auto-detects as FIM-repo.
    assert smollm2.eog_ids == frozenset({0, 2, 4})
    assert smollm2.token_text(4) == "<reponame>"
    assert smollm2.encode("Hi", add_bos=True) == [1, *smollm2.encode("Hi")]
    assert smollm2.chat_template is not None and "<|im_start|>" in smollm2.chat_template


def test_gemma3_attributes(gemma3: Tokenizer) -> None:
    assert gemma3.vocab_size == 262144
    assert (gemma3.bos_id, gemma3.eos_id, gemma3.add_bos) == (2, 1, True)
    # eos '<eos>' (1) plus the EOG-listed texts '<end_of_turn>' (106) and '</s>' (212).
    assert gemma3.eog_ids == frozenset({1, 106, 212})
    assert [gemma3.token_text(i) for i in (1, 106, 212)] == ["<eos>", "<end_of_turn>", "</s>"]
    assert gemma3.chat_template is None


# -- round trips -----------------------------------------------------------------------

CORPUS = [
    "Hello, world! How's it going?",
    "naïve café – “quotes” — ellipsis… ½ ± §",
    "日本語のテキストと中文文本，还有한국어 문장.",
    "Emoji: 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷 and ✈︎",
    "def f(x):\n\treturn {'a': [1, 2, 3]}  # comment\n",
    "    four spaces, then\t\ttabs\tand   runs     of      spaces   ",
    "\n\n\nleading newlines\r\nCRLF\rCR\n\n\n\n",
    "Math: ∀x∈ℝ, x² ≥ 0; ∫₀¹ f(x) dx ≈ 0.5",
    "Zalgo: Z̤͔ͧ̑̓ä͖̭̈̇lͮ̒ͫǧ̗͚̚o̙̔ͮ̇͐̇",
    "<|im_start|>user\nplain text that looks special<|im_end|>\n",
    "<start_of_turn>model\nok<end_of_turn>\n<b>bold</b> <s>x</s>",
    "\x00\x01\x7f control bytes and \u200b zero width \ufeff BOM",
    "مرحبا بالعالم — שלום עולם — Привет, мир — Γειά σου",
]


@pytest.mark.slow
@pytest.mark.parametrize("parse_special", [False, True])
def test_smollm2_round_trip(smollm2: Tokenizer, parse_special: bool) -> None:
    for text in CORPUS:
        ids = smollm2.encode(text, add_bos=False, parse_special=parse_special)
        assert smollm2.decode(ids) == text


@pytest.mark.parametrize("parse_special", [False, True])
def test_gemma3_round_trip(gemma3: Tokenizer, parse_special: bool) -> None:
    for text in CORPUS:
        ids = gemma3.encode(text, add_bos=False, parse_special=parse_special)
        assert gemma3.decode(ids) == text


def test_gemma3_bos_is_skipped_or_rendered(gemma3: Tokenizer) -> None:
    ids = gemma3.encode("Hi<end_of_turn>")
    assert ids[0] == 2 and ids[-1] == 106
    assert gemma3.decode(ids) == "<bos>Hi<end_of_turn>"
    assert gemma3.decode(ids, skip_special=True) == "Hi"


# Text without U+2581: SentencePiece vocabularies decode "▁" as a space by design.
_TEXT = st.text(st.characters(exclude_categories=("Cs",), exclude_characters="\u2581"), max_size=40)
# SmolLM2's byte-level vocabulary lacks the byte symbols for 0x04 0x06 0x13 0x14 0x16 0x1D and
# the UTF-8 lead bytes F1/F2 (U+40000..U+BFFFF), so llama.cpp (and HF) drop those bytes.
_SMOLLM2_TEXT = st.text(
    st.characters(max_codepoint=0x3FFFF, exclude_categories=("Cs",), exclude_characters="\x04\x06\x13\x14\x16\x1d"),
    max_size=40,
)


@pytest.mark.slow
@settings(max_examples=150, deadline=None)
@given(text=_SMOLLM2_TEXT)
def test_smollm2_round_trip_property(smollm2: Tokenizer, text: str) -> None:
    assert smollm2.decode(smollm2.encode(text, add_bos=False, parse_special=False)) == text


@settings(max_examples=150, deadline=None)
@given(text=_TEXT)
def test_gemma3_round_trip_property(gemma3: Tokenizer, text: str) -> None:
    assert gemma3.decode(gemma3.encode(text, add_bos=False, parse_special=False)) == text


# -- streaming ---------------------------------------------------------------------------

# Each text has characters split over several tokens in both vocabularies (byte-level BPE
# pieces, SPM byte fallback for the hieroglyphs), so some pushes must hold bytes back.
STREAM_TEXTS = ["😀 👨‍👩‍👧‍👦 🇫🇷 日本語 naïve 𓀀𓁐 ꙮ", "a😀b🎉c\n🤖🦜 end 𓃰"]


def _stream_all(tok: Tokenizer, ids: list[int], skip_special: bool = False) -> list[str]:
    dec = tok.stream(skip_special=skip_special)
    return [dec.push(i) for i in ids] + [dec.flush()]


@pytest.mark.slow
@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_smollm2_stream_equals_decode(smollm2: Tokenizer, text: str) -> None:
    ids = smollm2.encode(text, add_bos=False)
    chunks = _stream_all(smollm2, ids)
    assert "".join(chunks) == smollm2.decode(ids) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks[:-1]


@pytest.mark.parametrize("text", STREAM_TEXTS)
def test_gemma3_stream_equals_decode(gemma3: Tokenizer, text: str) -> None:
    ids = gemma3.encode(text)
    chunks = _stream_all(gemma3, ids, skip_special=True)
    assert "".join(chunks) == gemma3.decode(ids, skip_special=True) == text
    assert not any("\ufffd" in c for c in chunks)
    assert "" in chunks[1:-1]  # chunks[0] is the skipped BOS


def test_gemma3_stream_holds_back_partial_bytes(gemma3: Tokenizer) -> None:
    # 😀 is F0 9F 98 80: as byte tokens, nothing may come out before the fourth byte.
    byte_ids = [238 + b for b in "😀".encode()]
    assert [gemma3.token_text(i) for i in byte_ids] == ["<0xF0>", "<0x9F>", "<0x98>", "<0x80>"]
    dec = gemma3.stream()
    assert [dec.push(i) for i in byte_ids] == ["", "", "", "😀"]
    dec.push(byte_ids[0])
    assert dec.flush() == "\ufffd"  # an unfinished character at the very end


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.one_of(st.integers(238, 238 + 255), st.integers(0, 262143)), max_size=30))
def test_gemma3_stream_equals_decode_on_any_ids(gemma3: Tokenizer, data: list[int]) -> None:
    # Mostly byte tokens (ids 238..493 are <0x00>..<0xFF>), so invalid UTF-8 is common.
    assert "".join(_stream_all(gemma3, data)) == gemma3.decode(data)


# -- errors -------------------------------------------------------------------------------


def test_encode_rejects_lone_surrogate(gemma3: Tokenizer) -> None:
    with pytest.raises(PromptError, match="surrogate"):
        gemma3.encode("ok \ud800")


def test_decode_rejects_out_of_range_id(gemma3: Tokenizer) -> None:
    with pytest.raises(PromptError, match="262144"):
        gemma3.decode([5, 262144])


def test_missing_and_non_gguf_files(tmp_path: Path) -> None:
    with pytest.raises(ModelFileError, match="not found"):
        load_tokenizer(tmp_path / "nope.gguf")
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"NOTGGUF" + bytes(100))
    with pytest.raises(ModelFileError, match="not a GGUF file"):
        load_tokenizer(junk)


# -- tiny hand-written vocabularies -------------------------------------------------------

Writer = Callable[..., Path]


@pytest.fixture()
def write_vocab(tmp_path: Path) -> Writer:
    def write(model: str, tokens: list[str], types: list[int], *, scores: list[float] | None = None,
              merges: list[str] | None = None, pre: str | None = None, add_space_prefix: bool | None = None,
              add_bos: bool | None = None) -> Path:
        path = tmp_path / f"{model}-{len(tokens)}.gguf"
        w = gguf.GGUFWriter(path, arch="llama")
        w.add_tokenizer_model(model)
        if pre is not None:
            w.add_tokenizer_pre(pre)
        w.add_token_list(tokens)
        w.add_token_types(types)
        if scores is not None:
            w.add_token_scores(scores)
        if merges is not None:
            w.add_token_merges(merges)
        w.add_bos_token_id(1)
        w.add_eos_token_id(2)
        if add_space_prefix is not None:
            w.add_add_space_prefix(add_space_prefix)
        if add_bos is not None:
            w.add_add_bos_token(add_bos)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        return path

    return write


def _tiny_spm(write_vocab: Writer) -> Tokenizer:
    # ids: 0 <unk>, 1 <s>, 2 </s>, 3..258 <0x00>..<0xFF>, then normal pieces, then <u> (user-defined).
    pieces = {"▁": -5.0, "a": -5.0, "b": -5.0, "c": -5.0, "ab": -1.0, "bc": -0.5, "▁a": -2.0, "▁c": -3.0}
    tokens = ["<unk>", "<s>", "</s>", *(f"<0x{b:02X}>" for b in range(256)), *pieces, "<u>"]
    types = [2, 3, 3, *([6] * 256), *([1] * len(pieces)), 4]
    scores = [0.0] * 259 + list(pieces.values()) + [0.0]
    # No add_bos / add_space_prefix keys: llama.cpp's SPM defaults (both true) apply.
    return load_tokenizer(write_vocab("llama", tokens, types, scores=scores))


def test_tiny_spm_merges_by_score(write_vocab: Writer) -> None:
    tok = _tiny_spm(write_vocab)
    ids = {tok.token_text(i): i for i in range(tok.vocab_size)}
    assert tok.add_bos
    # "abc" -> "▁abc": bigrams ▁a(-2), ab(-1), bc(-0.5): bc merges first, then ▁a; "▁abc" and
    # "▁a"+"bc" are not pieces. A left-to-right or longest-match tokenizer would give ▁ ab c.
    assert tok.encode("abc") == [1, ids["▁a"], ids["bc"]]
    # "ab c" -> "▁ab▁c": ab(-1) beats ▁a(-2); then ▁c(-3); "▁"+"ab" is not a piece.
    assert tok.encode("ab c", add_bos=False) == [ids["▁"], ids["ab"], ids["▁c"]]
    # "é" is not in the vocabulary: byte fallback C3 A9 after the "▁" prefix.
    assert tok.encode("é", add_bos=False) == [ids["▁"], 3 + 0xC3, 3 + 0xA9]
    # A raw fragment after a special token gets the space prefix again (llama.cpp).
    assert tok.encode("</s>ab", add_bos=False) == [2, ids["▁"], ids["ab"]]
    # User-defined tokens are cut out even without special parsing; control tokens are not.
    assert tok.encode("a<u>c", add_bos=False, parse_special=False) == [ids["▁a"], ids["<u>"], ids["▁c"]]
    assert 2 not in tok.encode("</s>", add_bos=False, parse_special=False)


def test_tiny_spm_leading_space_rule(write_vocab: Writer) -> None:
    tok = _tiny_spm(write_vocab)
    ids = {tok.token_text(i): i for i in range(tok.vocab_size)}
    seq = [ids["▁"], ids["ab"], ids["▁c"]]
    # The first token loses one leading space; BOS as first token keeps the next one's space.
    assert tok.decode(seq) == "ab c"
    assert tok.decode([1, *seq]) == "<s> ab c"
    assert tok.decode([1, *seq], skip_special=True) == " ab c"
    assert tok.decode([ids["<u>"], 1], skip_special=True) == "<u>"
    dec = tok.stream()
    assert "".join([*(dec.push(i) for i in seq), dec.flush()]) == "ab c"


def test_unknown_pre_tokenizer_is_an_error(write_vocab: Writer) -> None:
    path = write_vocab("gpt2", ["a", "b", "ab"], [1, 1, 1], merges=["a b"], pre="made-up-pre")
    with pytest.raises(ModelFileError, match=r"made-up-pre.*known: .*llama-bpe.*smollm"):
        load_tokenizer(path)


def test_tiny_bpe_defaults(write_vocab: Writer) -> None:
    # llama-bpe: add_bos defaults to true (llama.cpp) when the file does not say.
    tokens = ["a", "b", "ab", "Ġ", "Ġab"]
    tok = load_tokenizer(write_vocab("gpt2", tokens, [1] * 5, merges=["a b", "Ġ ab"], pre="llama-bpe"))
    assert tok.add_bos and tok.bos_id == 1
    assert tok.encode("ab ab", add_bos=False) == [2, 4]
    assert tok.decode([2, 4]) == "ab ab"


# -- pre-tokenizer regex sets (expected splits derived by hand from llama.cpp's regexes) ----

_SAMPLE = "Hello world 12345 I'M don't"


@pytest.mark.parametrize(
    ("pre", "pieces"),
    [
        ("gpt-2", ["Hello", " world", " 12345", " I", "'", "M", " don", "'t"]),
        ("phi-2", ["Hello", " world", " 12345", " I", "'", "M", " don", "'t"]),
        ("llama-bpe", ["Hello", " world", " ", "123", "45", " I", "'M", " don", "'t"]),
        ("qwen2", ["Hello", " world", " ", "1", "2", "3", "4", "5", " I", "'M", " don", "'t"]),
        ("smollm", ["Hello", " world", " ", "1", "2", "3", "4", "5", " I", "'", "M", " don", "'t"]),
        ("starcoder", ["Hello", " world", " ", "1", "2", "3", "4", "5", " I", "'", "M", " don", "'t"]),
        ("default", ["Hello", " world", " ", "123", "45", " I", "'", "M", " don", "'", "t"]),
    ],
)
def test_pre_tokenizer_splits(pre: str, pieces: list[str]) -> None:
    pre_tok = build_pre_tokenizer(PRE_TOKENIZERS[pre])
    got = [piece for piece, _ in pre_tok.pre_tokenize_str(_SAMPLE)]
    assert got == [p.replace(" ", "Ġ") for p in pieces]


def test_byte_table_matches_hf_byte_level() -> None:
    # Every byte reachable from valid UTF-8 maps like HF's ByteLevel pre-tokenizer maps it.
    table = {b: c for c, b in gpt2_unicode_to_byte().items()}
    assert sorted(table) == list(range(256))
    byte_level = build_pre_tokenizer(PRE_TOKENIZERS["gpt-2"])
    for ch in ["\x00", " ", "~", "\x7f", "é", "\u00ad", "€", "😀"]:
        mapped = "".join(piece for piece, _ in byte_level.pre_tokenize_str(ch))
        assert mapped == "".join(table[b] for b in ch.encode())


# -- concurrency ---------------------------------------------------------------------


def test_a_long_byte_level_encode_lets_other_threads_run(smollm2: Tokenizer) -> None:
    """A server tokenizes in a worker thread while its main thread drives the ring: the BPE
    step must release the GIL, or a long prompt stops the ring for as long as it takes."""
    text = "The lighthouse keeper climbed the stairs, " * 12_000  # about 500 KB
    done = threading.Event()
    worker = threading.Thread(target=lambda: (smollm2.encode(text), done.set()))
    worker.start()
    turns = 0
    while not done.is_set():
        time.sleep(0.001)  # each wake-up needs the GIL
        turns += 1
    worker.join()
    assert turns >= 50, f"the main thread ran {turns} times while the prompt was tokenized"
