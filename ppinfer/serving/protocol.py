"""OpenAI's request and response bodies: a request's JSON to a prompt and the overrides of
`GenerationParams`, and a request's events back to response, chunk and error bodies.

Every check raises `ApiError`, whose message names the field as the client spelled it
("n=2: only n=1 is supported"); `app` turns it into OpenAI's error JSON.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ppinfer.sampling.params import MAX_LOGPROBS, GenerationParams
from ppinfer.serving.tools import ToolRequest, parse_tools

MAX_STOP_STRINGS = 4
MAX_CHOICES = 128
"""Most choices one request may ask for (prompts times `n`; OpenAI's bound on `n`)."""
MAX_COMPLETION_LOGPROBS = 5
"""Largest `logprobs` of a completion (OpenAI's); chat's `top_logprobs` goes to 20."""

SETTINGS = ("temperature", "top_p", "seed", "stop", "presence_penalty", "frequency_penalty", "logit_bias",
            "top_k", "min_p", "repetition_penalty", "ignore_eos")
"""Request fields that are `GenerationParams` settings under their own name (OpenAI's and the
extensions); `max_tokens` is `max_new_tokens`, and `logprobs`, `top_logprobs` and `echo`
become `logprobs` and `prompt_logprobs`."""

COMMON_FIELDS = {"model", "max_tokens", "stream", "stream_options", "n", "user", *SETTINGS}
FIELDS: dict[str, set[str]] = {
    "completion": COMMON_FIELDS | {"prompt", "logprobs", "echo", "best_of", "suffix"},
    "chat": COMMON_FIELDS | {"messages", "max_completion_tokens", "logprobs", "top_logprobs", "response_format",
                                 "tools", "tool_choice", "parallel_tool_calls"},
}
"""The fields each endpoint honours; any other is a 400 naming it. `user` has no effect on
the answer in OpenAI's API either (an end-user identifier for abuse monitoring)."""

NEUTRAL_ONLY = {"suffix": ("",)}
"""Fields honoured only with the value that asks for nothing beyond plain generation."""

Endpoint = Literal["completion", "chat"]
Prompt = str | list[int]
"""A completion prompt: text, or token ids used as they are."""


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
    prompts: list[Prompt] | list[list[dict[str, Any]]]
    """The completion prompts (text or token ids), or the chat's messages (one conversation)
    as `Engine.encode_chat` takes them."""
    max_tokens: int | None
    overrides: dict[str, Any] = field(default_factory=dict)
    """`GenerationParams` fields the request sets (max_new_tokens aside)."""
    n: int = 1
    """Choices per prompt."""
    echo: bool = False
    stream: bool = False
    include_usage: bool = False
    tools: ToolRequest | None = None
    """The chat's tools and tool choice (None: no tools)."""

    @property
    def prompt_field(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    @property
    def logprobs(self) -> int | None:
        """Alternatives reported per generated token (None: no log-probabilities)."""
        return self.overrides.get("logprobs")

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
    _check_fields(kind, body)
    stop = body.get("stop")
    if isinstance(stop, list) and len(stop) > MAX_STOP_STRINGS:
        raise bad_request(f"stop: at most {MAX_STOP_STRINGS} stop strings (got {len(stop)})", param="stop")
    n = _count("n", body.get("n", 1), MAX_CHOICES)
    if "best_of" in body and not _is_value(body["best_of"], n):
        raise bad_request(f"best_of={body['best_of']!r}: only best_of equal to n ({n}) is supported", param="best_of")
    prompts = [_chat_messages(body)] if kind == "chat" else _completion_prompts(body)
    if len(prompts) * n > MAX_CHOICES:
        raise bad_request(f"n={n}: {len(prompts)} prompts x n = {len(prompts) * n} choices, more than "
                          f"{MAX_CHOICES}", param="n")
    overrides = {key: body[key] for key in SETTINGS if key in body}
    if "response_format" in body:
        overrides["response_format"] = body["response_format"]
    echo = _flag("echo", body.get("echo", False))
    overrides |= _logprobs(kind, body, echo)
    try:
        tools = parse_tools(body) if kind == "chat" else None
    except ValueError as exc:
        field_name = re.match(r"[a-z_]*", str(exc)).group()  # "tools[2].function...: why" -> tools
        raise bad_request(str(exc), param=field_name) from exc
    return ParsedRequest(
        kind=kind,
        prompts=prompts,
        max_tokens=_max_tokens(kind, body),
        overrides=overrides,
        n=n,
        echo=echo,
        stream=_flag("stream", body.get("stream", False)),
        include_usage=_include_usage(body),
        tools=tools,
    )


def _check_fields(kind: Endpoint, body: dict[str, Any]) -> None:
    for key, value in body.items():
        if key not in FIELDS[kind]:
            where = "a chat completion" if kind == "chat" else "a completion"
            raise bad_request(f"{key}: not supported by this server for {where}", param=key)
        if key in NEUTRAL_ONLY and not any(_is_value(value, off) for off in NEUTRAL_ONLY[key]):
            shown = f"={value!r}" if isinstance(value, (bool, int, float, str)) else f"={_short(value)}"
            raise bad_request(f"{key}{shown}: not supported by this server", param=key)


def _count(key: str, value: Any, most: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= most:
        raise bad_request(f"{key}={value!r}: must be an integer in [1, {most}]", param=key)
    return value


def _logprobs(kind: Endpoint, body: dict[str, Any], echo: bool) -> dict[str, int]:
    """The `logprobs` and `prompt_logprobs` settings a request asks for."""
    if kind == "chat":
        wanted = _flag("logprobs", body.get("logprobs", False))
        top = body.get("top_logprobs")
        if top is not None and not wanted:
            raise bad_request(f"top_logprobs={top!r}: needs logprobs=true", param="top_logprobs")
        if not wanted:
            return {}
        if isinstance(top, bool) or not isinstance(top, int) or not 0 <= top <= MAX_LOGPROBS:
            if top is not None:
                raise bad_request(f"top_logprobs={top!r}: must be an integer in [0, {MAX_LOGPROBS}]",
                                  param="top_logprobs")
            top = 0
        return {"logprobs": top}
    k = body.get("logprobs")
    if k is None:
        return {}
    if isinstance(k, bool) or not isinstance(k, int) or not 0 <= k <= MAX_COMPLETION_LOGPROBS:
        raise bad_request(f"logprobs={k!r}: must be an integer in [0, {MAX_COMPLETION_LOGPROBS}]", param="logprobs")
    return {"logprobs": k, "prompt_logprobs": k} if echo else {"logprobs": k}


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


def _completion_prompts(body: dict[str, Any]) -> list[Prompt]:
    """`prompt`: a string, token ids, or a non-empty list of either."""
    prompt = body.get("prompt")
    if isinstance(prompt, str) or _is_ids(prompt):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(isinstance(p, str) or _is_ids(p) for p in prompt):
        return list(prompt)
    shown = "a missing prompt" if prompt is None else f"prompt={_short(prompt)}"
    raise bad_request(f"{shown}: the prompt must be a string, a list of token ids, or a non-empty list of "
                      "either", param="prompt")


def _is_ids(value: Any) -> bool:
    return isinstance(value, list) and bool(value) and all(
        isinstance(i, int) and not isinstance(i, bool) for i in value)


def _chat_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages: must be a non-empty list of {role, content} objects", param="messages")
    return [_chat_message(i, message) for i, message in enumerate(messages)]


def _chat_message(i: int, message: Any) -> dict[str, Any]:
    """One message as the chat template takes it: role and content (text), and an assistant's
    `tool_calls` or a tool result's `tool_call_id` as OpenAI spells them."""
    where = f"messages[{i}]"
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise bad_request(f"{where}: must be an object with a string role", param="messages")
    out: dict[str, Any] = {"role": message["role"], "content": _content(where, message)}
    if message.get("tool_calls") is not None:
        out["tool_calls"] = _tool_calls(where, message["role"], message["tool_calls"])
    if message["role"] == "tool":
        call = message.get("tool_call_id")
        if not isinstance(call, str):
            raise bad_request(f"{where}.tool_call_id: a tool message needs the id of the call it answers",
                              param="messages")
        out["tool_call_id"] = call
    if isinstance(message.get("name"), str):
        out["name"] = message["name"]
    return out


def _tool_calls(where: str, role: str, calls: Any) -> list[dict[str, Any]]:
    if role != "assistant":
        raise bad_request(f"{where}.tool_calls: only an assistant message has tool calls", param="messages")
    if not isinstance(calls, list):
        raise bad_request(f"{where}.tool_calls: must be a list", param="messages")
    out = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        if not (isinstance(call, dict) and isinstance(call.get("id"), str)
                and call.get("type", "function") == "function" and isinstance(function, dict)
                and isinstance(function.get("name"), str)
                and isinstance(function.get("arguments"), str)):
            raise bad_request(f"{where}.tool_calls[{j}]: must be {{id, type: function, function: {{name, arguments}}}} "
                              "with string id, name and arguments", param="messages")
        out.append({"id": call["id"], "type": "function",
                    "function": {"name": function["name"], "arguments": function["arguments"]}})
    return out


def _content(where: str, message: dict[str, Any]) -> str:
    content = message.get("content") or ""
    if isinstance(content, list):
        if not all(isinstance(p, dict) and p.get("type") == "text" and isinstance(p.get("text"), str) for p in content):
            raise bad_request(f"{where}.content: only text parts are supported", param="messages")
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise bad_request(f"{where}.content={_short(content)}: must be a string or a list of text parts",
                          param="messages")
    return content


def _short(value: Any, limit: int = 40) -> str:
    shown = repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
