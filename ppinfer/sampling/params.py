"""Generation parameters: the one definition shared by the config (`generation.*`), the
per-request keys of a `.jsonl` prompts line and the HTTP requests of the server.

`GenerationParams` is the Hydra schema of the `generation` group (so its field types are the
ones OmegaConf accepts) and the validated value the scheduler carries per request. Values
come from three places, each with its own spelling of strings:

- the config: stop strings typed on a command line keep backslash escapes (`from_config`
  decodes them, see `ppinfer.sampling.stopping.unescape_stop_string`);
- a `.jsonl` line or an HTTP body: JSON already decoded every escape (`updated` takes the
  strings as they are).

Every check raises `ValueError("key=value: why")`; callers prefix the key with where it came
from (`generation.`, `prompts_file=F: line 3: `, an HTTP 400).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ppinfer.sampling.grammar import grammar_of, lark_grammar
from ppinfer.sampling.stopping import StopConditions, unescape_stop_string

SEED_RANGE = (0, 2**63 - 1)
TOP_K_MAX = 2**31 - 1
"""Largest `top_k` (any k at least the vocabulary keeps every token; the bound keeps the value
inside the int64 fields that carry it to the last stage)."""
REPETITION_PENALTY_RANGE = (1e-3, 1e3)
"""Allowed `repetition_penalty`: logits divided (or multiplied) by a value outside this range
overflow float32 or underflow to zero, and the sampler would see inf or NaN."""
PENALTY_RANGE = (-2.0, 2.0)
"""Allowed `presence_penalty` and `frequency_penalty` (OpenAI's range)."""
LOGIT_BIAS_RANGE = (-100.0, 100.0)
"""Allowed `logit_bias` values (OpenAI's range)."""
MAX_LOGPROBS = 20
"""Most alternatives `logprobs` and `prompt_logprobs` may ask for per position."""


SAMPLER = {"sampler": True}
"""Field metadata of the settings that shape the next-token distribution (`sampler_key`)."""


@dataclass(kw_only=True)
class GenerationParams:
    """Sampling and stopping of one sequence (or, as the `generation` config group, of every
    sequence that does not say otherwise). The one declaration of the generation settings:
    the config, `.jsonl` lines, HTTP requests, the scheduler and the sampler all use it."""

    max_new_tokens: int = 64
    """Tokens to generate per prompt at most."""
    temperature: float = field(default=0.0, metadata=SAMPLER)
    """Softmax temperature; 0 means greedy (argmax)."""
    top_k: int = field(default=0, metadata=SAMPLER)
    """Keep only the k most likely tokens (ties with the k-th kept too); 0 disables the filter."""
    top_p: float = field(default=1.0, metadata=SAMPLER)
    """Keep the smallest set of tokens whose probability reaches p; 1 disables the filter."""
    min_p: float = field(default=0.0, metadata=SAMPLER)
    """Drop tokens less likely than min_p times the most likely one; 0 disables the filter."""
    repetition_penalty: float = field(default=1.0, metadata=SAMPLER)
    """Divide positive (multiply negative) logits of already seen tokens by this; 1 disables."""
    presence_penalty: float = field(default=0.0, metadata=SAMPLER)
    """Subtract this from the logit of every token already generated (OpenAI's; in [-2, 2])."""
    frequency_penalty: float = field(default=0.0, metadata=SAMPLER)
    """Subtract this times its count so far from the logit of every generated token (OpenAI's;
    in [-2, 2]). Both penalties count the generated tokens only, as vLLM does: the logit of
    token t becomes logit - count(t) * frequency_penalty - (count(t) > 0) * presence_penalty."""
    logit_bias: dict[str, float] = field(default_factory=dict, metadata=SAMPLER)
    """Added to the logits of these token ids (keys: ids as decimal strings, as JSON writes
    them; values in [-100, 100]) before every other step of sampling."""
    logprobs: int | None = None
    """Report each generated token's log-probability and this many most likely alternatives
    (0: the token's own only); null: none. Log-probabilities are those of the model's
    distribution (log-softmax of the logits), before any bias, penalty or filter."""
    prompt_logprobs: int | None = None
    """The same for every prompt token after the first (null: none)."""
    response_format: dict[str, Any] | None = None
    """OpenAI's `response_format`: `{"type": "json_object"}` or `{"type": "json_schema",
    "json_schema": {"schema": {...}}}` constrain every sampled token to the grammar (see
    `ppinfer.sampling.grammar`); null or `{"type": "text"}`: free text."""
    grammar: str | None = None
    """A grammar in llguidance's Lark syntax (docs: llguidance's `syntax.md`) that every sampled
    token must keep the text within; the server sets it for tool calls. Null: none. Not
    together with `response_format`."""
    seed: int | None = 0
    """Seed of the sampler, so sampled runs are reproducible; each sequence's random stream is
    derived from (seed, its index). Null (server requests without a seed) draws a fresh one."""
    ignore_eos: bool = False
    """Keep generating past end-of-generation tokens (useful for benchmarks)."""
    stop: list[str] = field(default_factory=list)
    r"""Strings that end a sequence when they appear in its generated text. Each must be
    non-empty. On the command line, since Hydra passes backslashes through, these escapes are
    decoded, and only these: `\n` newline, `\r` carriage return, `\t` tab, `\\` a backslash,
    `\uXXXX` the character with that hex code point; any other backslash sequence is an
    error. So `generation.stop='["\n\n"]'` stops at a blank line."""

    @property
    def greedy(self) -> bool:
        """True when the next token is the argmax (temperature 0)."""
        return self.temperature == 0.0

    def sampler_key(self) -> tuple[Any, ...]:
        """The settings that shape the next-token distribution: rows whose keys are equal
        are sampled in one call (their random streams still differ)."""
        return tuple(_hashable(getattr(self, f.name)) for f in dataclasses.fields(self) if f.metadata.get("sampler"))

    @property
    def penalized(self) -> bool:
        """True when presence or frequency penalties apply (they need the generated tokens)."""
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0

    def bias(self) -> tuple[list[int], list[float]]:
        """`logit_bias` as token ids and the values added to their logits."""
        return [int(k) for k in self.logit_bias], list(self.logit_bias.values())

    def check_vocabulary(self, vocab_size: int) -> None:
        """Raises ValueError naming the first `logit_bias` id outside [0, vocab_size)."""
        for key in self.logit_bias:
            if int(key) >= vocab_size:
                _bad("logit_bias", key, f"token id outside the vocabulary (0..{vocab_size - 1})")

    @classmethod
    def from_config(cls, node: Any) -> GenerationParams:
        """The validated parameters of a `generation` config node (stop escapes decoded)."""
        values = {f.name: getattr(node, f.name) for f in dataclasses.fields(cls)}
        stops = []
        for i, raw in enumerate(str(s) for s in values["stop"]):
            try:
                stops.append(unescape_stop_string(raw))
            except ValueError as exc:
                # Shown as typed: repr would double every backslash (but keeps a newline on one line).
                shown = f'"{raw}"' if raw.isprintable() else repr(raw)
                raise ValueError(f"stop[{i}]={shown}: {exc}") from exc
        values["stop"] = stops
        values["logit_bias"] = {str(k): float(v) for k, v in values["logit_bias"].items()}
        values["response_format"] = _plain(values["response_format"])
        return cls(**values).checked()

    def updated(self, overrides: Mapping[str, Any]) -> GenerationParams:
        """A copy with `overrides` (JSON values: a `.jsonl` line, an HTTP body) applied and
        checked; unknown keys and values of the wrong type are errors."""
        known = {f.name: f for f in dataclasses.fields(self)}
        values = dataclasses.asdict(self)
        for key, value in overrides.items():
            if key not in known:
                raise ValueError(f"{key}={value!r}: unknown generation setting (known: {', '.join(known)})")
            values[key] = _typed(key, value, known[key].type)
        return GenerationParams(**values).checked()

    def checked(self) -> GenerationParams:
        """Self, after checking every value; raises ValueError("key=value: why")."""
        if not isinstance(self.max_new_tokens, int) or self.max_new_tokens < 1:
            _bad("max_new_tokens", self.max_new_tokens, "must be an integer >= 1")
        # `not (x >= 0)` rather than `x < 0` so that NaN is rejected too; infinity is a value no
        # filter or softmax can use, so every float must also be finite.
        if not (self.temperature >= 0.0 and math.isfinite(self.temperature)):
            _bad("temperature", self.temperature, "must be a finite number >= 0 (0 = greedy)")
        if not isinstance(self.top_k, int) or not 0 <= self.top_k <= TOP_K_MAX:
            _bad("top_k", self.top_k, f"must be an integer in [0, {TOP_K_MAX}] (0 = off)")
        if not 0.0 < self.top_p <= 1.0:
            _bad("top_p", self.top_p, "must be in (0, 1]")
        if not 0.0 <= self.min_p <= 1.0:
            _bad("min_p", self.min_p, "must be in [0, 1]")
        low, high = REPETITION_PENALTY_RANGE
        if not low <= self.repetition_penalty <= high:  # NaN fails too
            _bad("repetition_penalty", self.repetition_penalty, f"must be in [{low:g}, {high:g}] (1 = off)")
        if self.seed is not None and (
            not isinstance(self.seed, int) or not SEED_RANGE[0] <= self.seed <= SEED_RANGE[1]
        ):
            _bad("seed", self.seed, "must be an integer in [0, 2**63 - 1]")
        for i, stop in enumerate(self.stop):
            if not isinstance(stop, str) or not stop:
                _bad(f"stop[{i}]", stop, "a stop string needs at least one character")
        low, high = PENALTY_RANGE
        for key in ("presence_penalty", "frequency_penalty"):
            if not low <= getattr(self, key) <= high:
                _bad(key, getattr(self, key), f"must be in [{low:g}, {high:g}] (0 = off)")
        low, high = LOGIT_BIAS_RANGE
        for key, value in self.logit_bias.items():
            if not (isinstance(key, str) and key.isdecimal() and key.isascii() and len(key) < 12):
                _bad("logit_bias", key, "keys must be token ids (non-negative integers)")
            if not (isinstance(value, (int, float)) and not isinstance(value, bool) and low <= value <= high):
                _bad(f"logit_bias[{key}]", value, f"must be a number in [{low:g}, {high:g}]")
        self.constraint_grammar()  # raises ValueError("response_format...: why") or ("grammar: why")
        for key in ("logprobs", "prompt_logprobs"):
            value = getattr(self, key)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)
                                      or not 0 <= value <= MAX_LOGPROBS):
                _bad(key, value, f"must be an integer in [0, {MAX_LOGPROBS}] or null")
        return self

    def constraint_grammar(self) -> str | None:
        """The llguidance grammar that constrains the sampled tokens (None: free text); raises
        ValueError naming the field."""
        if self.grammar is not None:
            if not isinstance(self.grammar, str):
                _bad("grammar", self.grammar, "must be a string")
            if grammar_of(self.response_format) is not None:
                _bad("grammar", "...", "cannot be combined with a response_format other than text")
            return lark_grammar(self.grammar)
        return grammar_of(self.response_format)

    def stop_conditions(self, eog_ids: frozenset[int]) -> StopConditions:
        """When a sequence with these parameters ends."""
        return StopConditions(
            max_new_tokens=self.max_new_tokens, eog_ids=eog_ids, stop_strings=tuple(self.stop),
            ignore_eos=self.ignore_eos,
        )


def _bad(key: str, value: object, why: str) -> None:
    raise ValueError(f"{key}={value!r}: {why}")


def _plain(value: Any) -> Any:
    """A config node's value as plain dicts and lists."""
    if hasattr(value, "items"):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)) or (hasattr(value, "__iter__") and not isinstance(value, str)):
        return [_plain(v) for v in value]
    return value


def _hashable(value: Any) -> Any:
    if isinstance(value, dict):
        return tuple(sorted(value.items()))
    return tuple(value) if isinstance(value, list) else value


def _typed(key: str, value: Any, annotation: Any) -> Any:
    """`value` (from JSON) as the field's type: an int is a float where a float is wanted, but
    a bool is never a number and a float never an int."""
    kind = str(annotation)
    if kind == "dict[str, Any] | None":
        if value is not None and not isinstance(value, dict):
            _bad(key, value, "must be an object")
        return value
    if kind == "str | None":
        if value is not None and not isinstance(value, str):
            _bad(key, value, "must be a string")
        return value
    if kind == "dict[str, float]":
        if not isinstance(value, dict):
            _bad(key, value, "must be an object of token ids to numbers")
        out = {}
        for k, v in value.items():
            out[str(k)] = _typed(f"{key}[{k}]", v, "float")
        return out
    if kind == "list[str]":
        stops = [value] if isinstance(value, str) else value
        if not isinstance(stops, list) or not all(isinstance(s, str) for s in stops):
            _bad(key, value, "must be a string or a list of strings")
        return list(stops)
    if kind == "bool":
        if not isinstance(value, bool):
            _bad(key, value, "must be true or false")
        return value
    if kind == "float":
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            _bad(key, value, "must be a number")
        try:
            return float(value)
        except OverflowError:  # an integer beyond any float (JSON allows 1e999 digits)
            _bad(key, value, "is out of range")
    if isinstance(value, bool) or not isinstance(value, int):
        if kind.endswith("| None") and value is None:
            return None
        _bad(key, value, "must be an integer")
    return value
