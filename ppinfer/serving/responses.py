"""OpenAI's response bodies: a request's choices, whole or as stream chunks, with their usage
and, when asked for, their log-probabilities in the shape of each endpoint (completions: the
legacy `tokens` / `token_logprobs` / `top_logprobs` / `text_offset` lists; chat: `content`
entries with `token`, `logprob`, `bytes` and `top_logprobs`)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ppinfer.pipeline.sequence import Finished, TokenDelta
from ppinfer.sampling.logprobs import TokenLogprob
from ppinfer.serving.protocol import Endpoint
from ppinfer.serving.tools import ToolDeltas, message
from ppinfer.text.tools import ToolSyntax

TokenBytes = Callable[[int], bytes]
"""A token's bytes (special tokens spelled out), from the engine."""

Position = tuple[int, TokenLogprob | None]
"""A token id and its entry (None: the first prompt token, which nothing predicts)."""


def token_string(data: bytes) -> str:
    """A token's text; bytes that are not whole UTF-8 characters are written as OpenAI does
    (`bytes:\\xe2\\x80`), so that different partial tokens keep different strings."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError:
        return "bytes:" + "".join(f"\\x{b:02x}" for b in data)


@dataclass
class Choice:
    """One choice (a prompt's continuation) as its events arrive."""

    index: int
    prompt_text: str = ""
    """The prompt, when echoed."""
    prompt_ids: tuple[int, ...] = ()
    parts: list[str] = field(default_factory=list)
    positions: list[Position] = field(default_factory=list)
    prompt_positions: list[Position] = field(default_factory=list)
    """The echoed prompt's ids and entries, once they arrive (with the first event)."""
    end: Finished | None = None

    def add(self, event: TokenDelta | Finished) -> None:
        if event.prompt_logprobs:
            self.prompt_positions = list(zip(self.prompt_ids, event.prompt_logprobs))
        self.parts.append(event.text)
        self.positions += zip(event.token_ids, event.logprobs)
        if isinstance(event, Finished):
            self.end = event

    @property
    def text(self) -> str:
        return self.prompt_text + "".join(self.parts)


@dataclass(frozen=True)
class Reply:
    """The bodies of one request's response: whole, or as stream chunks."""

    kind: Endpoint
    id: str
    created: int
    model: str
    token_bytes: TokenBytes
    logprobs: bool = False
    """The request asked for log-probabilities."""
    tools: ToolSyntax | None = None
    """The syntax to read tool calls in (None: the request offers no tools)."""
    most_calls: int | None = None
    """Tool calls read back at most (None: all)."""

    def body(self, choices: list[Choice], prompt_tokens: int) -> dict[str, Any]:
        out = []
        for choice in choices:
            assert choice.end is not None
            positions = choice.prompt_positions + choice.positions
            body = self._choice(choice.index, choice.text, positions, 0)
            reason = choice.end.reason
            if self.tools is not None:
                body["message"], called = message(self.tools, choice.text, self.most_calls, reason == "length")
                reason = "tool_calls" if called and reason == "stop" else reason
            out.append(body | {"finish_reason": reason})
        completion = sum(c.end.completion_tokens for c in choices if c.end is not None)
        return self._head(final=True) | {"choices": out, "usage": usage(prompt_tokens, completion)}

    def chunk(self, index: int, text: str = "", positions: list[Position] | None = None, offset: int = 0,
              finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        """One chunk of choice `index` with `text` (chat: a role-only chunk when `role`)."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice: dict[str, Any] = {"index": index, "delta": delta}
            choice["logprobs"] = self._chat_logprobs(positions) if positions else None
        else:
            choice = {"index": index, "text": text}
            choice["logprobs"] = self._completion_logprobs(positions, offset) if positions else None
        return self._head(final=False) | {"choices": [choice | {"finish_reason": finish_reason}]}

    def tool_chunks(self, index: int, deltas: ToolDeltas, text: str, end: Finished | None,
                    positions: list[Position]) -> list[dict[str, Any]]:
        """The chat chunks of choice `index`'s new `text` (`end`: its last) when it may hold tool calls: one per
        delta (content, a call's start, a fragment of its arguments), the log-probabilities of
        the event's tokens on the first (or alone)."""
        logprobs = self._chat_logprobs(positions) if positions and self.logprobs else None
        chunks = []
        for delta in deltas.push(text, end is not None, end is not None and end.reason == "length"):
            chunks.append(self._head(final=False) | {"choices": [
                {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": None}]})
            logprobs = None
        if logprobs is not None:
            chunks.append(self.chunk(index, "", positions))
        return chunks

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._head(final=False) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def _choice(self, index: int, text: str, positions: list[Position], offset: int) -> dict[str, Any]:
        if self.kind == "chat":
            logprobs = self._chat_logprobs(positions) if self.logprobs else None
            return {"index": index, "message": {"role": "assistant", "content": text}, "logprobs": logprobs}
        logprobs = self._completion_logprobs(positions, offset) if self.logprobs else None
        return {"index": index, "text": text, "logprobs": logprobs}

    def _completion_logprobs(self, positions: list[Position], offset: int) -> dict[str, Any]:
        """The legacy shape; `offset`: where the first token's text starts in the choice's text.
        `top_logprobs` holds the most likely tokens and the chosen one (as OpenAI's does)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for token, entry in positions:
            name = token_string(self.token_bytes(token))
            tokens.append(name)
            offsets.append(offset)
            offset += len(name)
            if entry is None:
                logprobs.append(None)
                tops.append(None)
                continue
            logprobs.append(entry.logprob)
            top = {token_string(self.token_bytes(t)): lp for t, lp in entry.top}
            top.setdefault(name, entry.logprob)
            tops.append(top)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _chat_logprobs(self, positions: list[Position]) -> dict[str, Any]:
        content = []
        for token, entry in positions:
            assert entry is not None  # chat has no echoed prompt
            content.append(self._chat_entry(token, entry.logprob)
                           | {"top_logprobs": [self._chat_entry(t, lp) for t, lp in entry.top]})
        return {"content": content, "refusal": None}

    def _chat_entry(self, token: int, logprob: float) -> dict[str, Any]:
        data = self.token_bytes(token)
        return {"token": token_string(data), "logprob": logprob, "bytes": list(data)}

    def _head(self, final: bool) -> dict[str, Any]:
        if self.kind == "completion":
            kind = "text_completion"
        else:
            kind = "chat.completion" if final else "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
