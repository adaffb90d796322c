"""Log-probabilities of tokens: computed on the last stage from the logits, carried to the first
rank, reported to clients (OpenAI's `logprobs`, `top_logprobs` and `echo`).

A log-probability is the log-softmax of the model's logits at that position, before any
logit bias, penalty, filter or temperature: the same numbers `task=score` gives (its
`logits.npy` rows, log-softmaxed), so that a prompt's echoed log-likelihood is the model's.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch


@dataclass(frozen=True)
class TokenLogprob:
    """One position: the token there, its log-probability, and the `k` most likely tokens
    with theirs (most likely first)."""

    token: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


@dataclass(frozen=True)
class RowLogprobs:
    """What the last stage reports for one row after a sampling item: the sampled token's
    entry and, once (with the sequence's first token), its prompt's (None for the first
    prompt token, which nothing predicts)."""

    token: TokenLogprob | None
    prompt: tuple[TokenLogprob | None, ...] = ()

    def to_json(self) -> list[Any]:
        return [_entry_json(self.token), [_entry_json(e) for e in self.prompt]]

    @classmethod
    def from_json(cls, raw: list[Any]) -> RowLogprobs:
        return cls(_entry(raw[0]), tuple(_entry(e) for e in raw[1]))


def _entry_json(entry: TokenLogprob | None) -> list[Any] | None:
    if entry is None:
        return None
    return [entry.token, entry.logprob, [list(pair) for pair in entry.top]]


def _entry(raw: list[Any] | None) -> TokenLogprob | None:
    if raw is None:
        return None
    return TokenLogprob(int(raw[0]), float(raw[1]), tuple((int(i), float(v)) for i, v in raw[2]))


def token_logprobs(logits: torch.Tensor, tokens: torch.Tensor, k: int) -> list[TokenLogprob]:
    """Entries for `tokens` ``[N]`` at positions whose logits are ``[N, V]``, each with the
    `k` most likely tokens."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # [N, V]
    chosen = logp.gather(1, tokens.to(logp.device).view(-1, 1))[:, 0].tolist()  # [N]
    if k == 0:
        return [TokenLogprob(int(t), lp) for t, lp in zip(tokens.tolist(), chosen)]
    values, ids = torch.topk(logp, k, dim=-1)  # [N, k], most likely first
    values, ids = values.tolist(), ids.tolist()
    return [
        TokenLogprob(int(t), lp, tuple(zip(i, v)))
        for t, lp, i, v in zip(tokens.tolist(), chosen, ids, values)
    ]
