"""Stop conditions: end-of-generation ids, stop strings, the token budget and ignore_eos.

A toy byte-level vocabulary stands in for the tokenizer; expected texts are written by hand.
"""

from __future__ import annotations

import codecs

import pytest

from ppinfer.sampling.stopping import StopConditions, StopState, unescape_stop_string

EOS, EOT = 0, 1
PIECES: dict[int, bytes] = {
    EOS: b"<eos>",
    EOT: b"<eot>",
    2: b"Hel",
    3: b"lo",
    4: b" wor",
    5: b"ld",
    6: b"caf",
    7: b"\xc3",  # first byte of "é"
    8: b"\xa9",  # second byte of "é"
}


class ToyDecoder:
    """Byte pieces decoded as UTF-8 one token at a time (an incomplete character held back),
    counting the tokens it is given."""

    def __init__(self, pieces: dict[int, bytes] = PIECES) -> None:
        self.pieces, self.pushed = pieces, 0
        self._utf8 = codecs.getincrementaldecoder("utf-8")("replace")

    def push(self, token_id: int) -> str:
        self.pushed += 1
        return self._utf8.decode(self.pieces[token_id])

    def flush(self) -> str:
        return self._utf8.decode(b"", final=True)


def _state(**kwargs: object) -> StopState:
    conditions = StopConditions(**{"max_new_tokens": 16, "eog_ids": {EOS, EOT}, **kwargs})
    return StopState(conditions, ToyDecoder())


def _feed(state: StopState, ids: list[int]) -> list[bool]:
    return [state.append(i) for i in ids]


@pytest.mark.parametrize("eog", [EOS, EOT])
def test_end_of_generation_token_stops_and_is_kept_in_ids_only(eog: int) -> None:
    state = _state()
    assert _feed(state, [2, 3, eog]) == [False, False, True]
    assert state.finish_reason == "stop"
    assert state.stop_reason == eog
    assert state.token_ids == [2, 3, eog]
    assert state.text == "Hello"


def test_stop_string_spanning_two_tokens_cuts_the_text() -> None:
    state = _state(stop_strings=["o wo"])  # "lo" + " wor"
    assert _feed(state, [2, 3, 4]) == [False, False, True]
    assert state.finish_reason == "stop"
    assert state.stop_reason == "o wo"
    assert state.token_ids == [2, 3, 4]
    assert state.text == "Hell"


def test_earliest_stop_string_wins() -> None:
    # "Hello wor": "lo w" starts at 3, "wor" at 6; both complete on the third token.
    state = _state(stop_strings=("wor", "lo w"))
    _feed(state, [2, 3, 4])
    assert state.stop_reason == "lo w"
    assert state.text == "Hel"


def test_stop_string_split_inside_a_utf8_character() -> None:
    state = _state(stop_strings="é")  # a lone string is one stop string
    assert _feed(state, [6, 7, 8]) == [False, False, True]
    assert state.text == "caf"


def test_max_new_tokens_finishes_with_length() -> None:
    state = _state(max_new_tokens=3)
    assert _feed(state, [2, 3, 4]) == [False, False, True]
    assert state.finish_reason == "length"
    assert state.stop_reason is None
    assert state.text == "Hello wor"
    with pytest.raises(RuntimeError, match="after the sequence finished"):
        state.append(5)


def test_eos_on_the_last_allowed_token_is_stop_not_length() -> None:
    state = _state(max_new_tokens=2)
    _feed(state, [2, EOS])
    assert state.finish_reason == "stop"
    assert state.text == "Hel"


def test_ignore_eos_treats_eos_as_an_ordinary_token() -> None:
    state = _state(max_new_tokens=4, ignore_eos=True)
    assert _feed(state, [2, EOS, 3, EOT]) == [False, False, False, True]
    assert state.finish_reason == "length"
    assert state.token_ids == [2, EOS, 3, EOT]
    assert state.text == "Hel<eos>lo<eot>"


def test_stop_strings_still_apply_with_ignore_eos() -> None:
    state = _state(ignore_eos=True, stop_strings=["ld"])
    _feed(state, [EOS, 4, 5])
    assert state.finish_reason == "stop"
    assert state.text == "<eos> wor"


def test_each_token_is_decoded_once_and_the_work_per_token_stays_flat() -> None:
    """The text grows piece by piece: every token passes through the decoder exactly once,
    whatever the answer's length (the whole answer used to be decoded again for every token),
    and each step streams no more than its own piece and a held-back stop-string start."""
    decoder = ToyDecoder()
    state = StopState(StopConditions(max_new_tokens=4000, eog_ids={EOS}, stop_strings=("xyz",)), decoder)
    ids = [[2, 3, 4, 5][n % 4] for n in range(3999)]
    streamed = []
    for n, token in enumerate(ids, start=1):
        state.append(token)
        assert decoder.pushed == n
        piece = state.stable_text()[0]
        assert len(piece) <= len(PIECES[token]) + len("xyz") - 1
        streamed.append(piece)
    expected = "".join(PIECES[i].decode() for i in ids)  # "Hello world" repeated
    assert state.text == expected
    assert "".join(streamed) == expected


def test_external_finish_for_a_full_context() -> None:
    state = _state()
    _feed(state, [2, 3])
    state.finish("length")
    assert state.finished and state.finish_reason == "length"
    assert state.text == "Hello"


@pytest.mark.parametrize(
    ("kwargs", "named"),
    [({"max_new_tokens": 0}, "0"), ({"max_new_tokens": 4, "stop_strings": ["ok", ""]}, "''")],
)
def test_invalid_conditions_name_the_value(kwargs: dict[str, object], named: str) -> None:
    with pytest.raises(ValueError) as info:
        StopConditions(**kwargs)  # type: ignore[arg-type]
    assert named in str(info.value)


def test_conditions_store_immutable_values() -> None:
    conditions = StopConditions(max_new_tokens=4, eog_ids=[2, 2, 5], stop_strings=["a"])
    assert conditions.eog_ids == frozenset({2, 5})
    assert conditions.stop_strings == ("a",)
    assert hash(conditions) == hash(StopConditions(4, {5, 2}, ("a",)))


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (r"\n\n", "\n\n"),
        (r"a\tb\r\n", "a\tb\r\n"),
        (r"back\\slash", "back\\slash"),
        (r"\\n", "\\n"),  # an escaped backslash, then a plain n
        (r"\u2028|\u00e9\u00E9", "\u2028|éé"),
        ("already\nreal", "already\nreal"),
        ("plain", "plain"),
    ],
)
def test_stop_string_escapes(raw: str, expected: str) -> None:
    assert unescape_stop_string(raw) == expected


@pytest.mark.parametrize(
    ("raw", "named"),
    [
        (r"a\q", r"\q"),
        (r"a\x41", r"\x"),
        ("tail\\", "lone backslash"),
        (r"\u12g4", r"\u"),
        (r"\ud800", "surrogate"),
        ("a\\\nb", r"\'\n'"),  # a backslash, then a real newline: shown as '\n', on one line
    ],
)
def test_stop_string_bad_escapes_name_the_escape(raw: str, named: str) -> None:
    with pytest.raises(ValueError) as info:
        unescape_stop_string(raw)
    assert named in str(info.value)
    assert "\n" not in str(info.value)


def test_decoded_newline_stop_string_stops_at_a_blank_line() -> None:
    pieces = {2: b"Hel", 3: b"lo\n", 4: b"\nwor", 5: b"ld"}
    conditions = StopConditions(max_new_tokens=8, stop_strings=(unescape_stop_string(r"\n\n"),))
    state = StopState(conditions, ToyDecoder(pieces))
    assert _feed(state, [2, 3, 4]) == [False, False, True]
    assert state.text == "Hello"
