"""OpenAI's request and response bodies: a request's JSON to a prompt and the overrides of
`GenerationParams`, and a request's events back to response, chunk and error bodies.

Every check raises `ApiError`, whose message names the field as the client spelled it
("n=2: only n=1 is supported"); `app` turns it into OpenAI's error JSON.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

from ppinfer.sampling.params import GenerationParams

MAX_STOP_STRINGS = 4

SETTINGS = tuple(f.name for f in dataclasses.fields(GenerationParams) if f.name != "max_new_tokens")
"""Request fields that are `GenerationParams` settings under their own name (OpenAI's
`temperature`, `top_p`, `seed`, `stop`, and the extensions `top_k`, `min_p`, ...);
`max_tokens` is `max_new_tokens`."""

UNSUPPORTED = {
    "presence_penalty": (0,), "frequency_penalty": (0,), "logprobs": (False,), "top_logprobs": (0,),
    "echo": (False,), "best_of": (1,), "tools": ([],), "functions": ([],), "logit_bias": ({},),
    "suffix": ("",),
}
"""OpenAI fields this server cannot honour: the values that mean "off" (anything else is a 400)."""

Endpoint = Literal["completion", "chat"]


class ApiError(Exception):
    """An HTTP error with OpenAI's body: {"error": {"message", "type", "param", "code"}}."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.status, self.param, self.code)


def error_body(message: str, status: int, param: str | None = None, code: str | None = None) -> dict[str, Any]:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    # A message may quote the client's text, which JSON lets hold lone surrogates: escape them
    # so the body can be written as UTF-8.
    message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def bad_request(message: str, param: str | None = None, code: str | None = None) -> ApiError:
    return ApiError(400, message, param=param, code=code)


@dataclass(frozen=True)
class ParsedRequest:
    """What a request asks for, before tokenization."""

    kind: Endpoint
    prompt: str | list[dict[str, str]]
    """The completion prompt, or the chat's messages as `Engine.encode_chat` takes them."""
    max_tokens: int | None
    overrides: dict[str, Any] = field(default_factory=dict)
    """`GenerationParams` fields the request sets (max_new_tokens aside)."""
    stream: bool = False
    include_usage: bool = False

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def params(self, defaults: GenerationParams, prompt_tokens: int, context_length: int) -> GenerationParams:
        """The request's parameters: an absent max_tokens fills the context up to the
        default; an absent seed draws a fresh random stream (as OpenAI's API does), where the
        batch command's `generation.seed` would make every such request sample alike."""
        if prompt_tokens >= context_length:
            raise ApiError(400, f"the prompt has {prompt_tokens} tokens; the context length is {context_length}",
                           param=self.prompt_field, code="context_length_exceeded")
        max_new = self.max_tokens
        if max_new is None:
            max_new = min(defaults.max_new_tokens, context_length - prompt_tokens)
        try:
            return defaults.updated({"seed": None, **self.overrides, "max_new_tokens": max_new})
        except ValueError as exc:  # "key=value: why", the key being the request's field
            raise bad_request(str(exc), param=str(exc).split("=", 1)[0].split("[", 1)[0]) from exc


def parse_request(kind: Endpoint, body: Any, model_id: str) -> ParsedRequest:
    """A completion or chat request's body; raises ApiError (400, or 404 for another model)."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    body = {key: value for key, value in body.items() if value is not None}
    _check_model(body.get("model", model_id), model_id)
    _check_unsupported(body)
    if "n" in body and not _is_value(body["n"], 1):
        raise bad_request(f"n={body['n']!r}: only n=1 is supported", param="n")
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})", param="stop")
    return ParsedRequest(
        kind=kind,
        prompt=_chat_messages(body) if kind == "chat" else _completion_prompt(body),
        max_tokens=_max_tokens(kind, body),
        overrides={key: body[key] for key in SETTINGS if key in body},
        stream=_flag("stream", body.get("stream", False)),
        include_usage=_include_usage(body),
    )


def _check_model(model: Any, model_id: str) -> None:
    if model != model_id:
        raise ApiError(404, f"model={model!r}: no such model (this server serves {model_id!r})",
                       param="model", code="model_not_found")


def _is_value(value: Any, expected: Any) -> bool:
    """`value == expected` of the same kind: JSON's `true` is not the number 1, nor `0` false."""
    if isinstance(expected, bool) or isinstance(value, bool):
        return value is expected
    if isinstance(expected, (int, float)):
        return isinstance(value, (int, float)) and value == expected
    return type(value) is type(expected) and value == expected


def _check_unsupported(body: dict[str, Any]) -> None:
    for key, off in UNSUPPORTED.items():
        if key in body and not any(_is_value(body[key], value) for value in off):
            value = body[key]
            shown = f"={value!r}" if isinstance(value, (bool, int, float, str)) else ""
            raise bad_request(f"{key}{shown}: not supported by this server", param=key)


def _flag(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise bad_request(f"{key}={value!r}: must be true or false", param=key)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options", {})
    if not isinstance(options, dict):
        raise bad_request(f"stream_options={options!r}: must be an object", param="stream_options")
    include = options.get("include_usage")
    return False if include is None else _flag("stream_options.include_usage", include)


def _max_tokens(kind: Endpoint, body: dict[str, Any]) -> int | None:
    key = "max_completion_tokens" if kind == "chat" and "max_completion_tokens" in body else "max_tokens"
    value = body.get(key)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise bad_request(f"{key}={value!r}: must be an integer >= 1", param=key)
    return value


def _completion_prompt(body: dict[str, Any]) -> str:
    prompt = body.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], str):
        prompt = prompt[0]
    if not isinstance(prompt, str):
        shown = "a missing prompt" if prompt is None else f"prompt={_short(prompt)}"
        raise bad_request(f"{shown}: the prompt must be one string (or a list of one string)", param="prompt")
    return prompt


def _chat_messages(body: dict[str, Any]) -> list[dict[str, str]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list of {role, content} objects", param="messages")
    return [_chat_message(i, message) for i, message in enumerate(messages)]


def _chat_message(i: int, message: Any) -> dict[str, str]:
    where = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"{where}: must be an object with a string role", param="messages")
    content = message.get("content") or ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"{where}.content: only text parts are supported", param="messages")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise bad_request(f"{where}.content={_short(content)}: must be a string or a list of text parts",
                          param="messages")
    return {"role": message["role"], "content": content}


def _short(value: Any, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."


@dataclass(frozen=True)
class Reply:
    """The bodies of one request's response: whole, or as stream chunks."""

    kind: Endpoint
    id: str
    created: int
    model: str

    def body(self, text: str, finish_reason: str, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        if self.kind == "chat":
            choice = {"index": 0, "message": {"role": "assistant", "content": text}}
        else:
            choice = {"index": 0, "text": text}
        choice |= {"finish_reason": finish_reason, "logprobs": None}
        return self._head(final=True) | {"choices": [choice], "usage": usage(prompt_tokens, completion_tokens)}

    def chunk(self, text: str | None = None, finish_reason: str | None = None, role: bool = False) -> dict[str, Any]:
        """One chunk with `text` (chat: a role-only chunk when `role`), or the final empty one."""
        if self.kind == "chat":
            delta = {"role": "assistant", "content": ""} if role else ({"content": text} if text else {})
            choice = {"index": 0, "delta": delta}
        else:
            choice = {"index": 0, "text": text or ""}
        choice |= {"finish_reason": finish_reason, "logprobs": None}
        return self._head(final=False) | {"choices": [choice]}

    def usage_chunk(self, prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
        return self._head(final=False) | {"choices": [], "usage": usage(prompt_tokens, completion_tokens)}

    def _head(self, final: bool) -> dict[str, Any]:
        if self.kind == "completion":
            kind = "text_completion"
        else:
            kind = "chat.completion" if final else "chat.completion.chunk"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}
