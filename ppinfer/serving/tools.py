"""A chat request's tools: `tools` and `tool_choice` checked (errors name the field), the
grammar that makes `tool_choice` `required` or a named function always produce calls in the
model's own syntax with arguments that match the function's schema, and the calls read back
from the output (`ppinfer.text.tools.read`) as OpenAI's `tool_calls`, whole or as stream deltas.

`tool_choice`: `none` renders the conversation without tools (no call can be read back);
`auto` (the default with tools) renders them and reads whatever the model writes, unconstrained;
`required` constrains the answer to one or more calls of the given functions, a named function
to exactly one call of it.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ppinfer.sampling.grammar import grammar_of
from ppinfer.text.tools import (
    ARGUMENT_KEYS,
    HERMES_CLOSE,
    HERMES_OPEN,
    MISTRAL_MARKER,
    Reading,
    ToolFormat,
    ToolSyntax,
    read,
)

NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
"""A function name as OpenAI allows it."""
CHOICES = ("none", "auto", "required")
FUNCTION_KEYS = {"name", "description", "parameters", "strict"}
NO_PARAMETERS = {"type": "object", "properties": {}}
"""The schema of a function defined without `parameters` (OpenAI's: an empty parameter list)."""


@dataclass(frozen=True)
class ToolRequest:
    """The tools of one request and how the answer may use them."""

    tools: list[dict[str, Any]]
    """OpenAI's function definitions as the client sent them (given to the chat template)."""
    choice: str
    """`none`, `auto`, `required`, or `function` (the named one: `function`)."""
    function: str | None = None
    parallel: bool = True
    """`parallel_tool_calls`: False allows one call at most."""

    @property
    def most_calls(self) -> int | None:
        """Calls read back at most (None: any number)."""
        return None if self.parallel and self.choice != "function" else 1

    @property
    def offered(self) -> list[dict[str, Any]] | None:
        """The tools the template renders (none with tool_choice none)."""
        return None if self.choice == "none" else self.tools

    @property
    def constrained(self) -> bool:
        return self.choice in ("required", "function")


def parse_tools(body: dict[str, Any]) -> ToolRequest | None:
    """`tools` and `tool_choice` of a chat body (None without tools); raises ValueError whose
    message begins with the field (`tools[2].function.name=...: why`)."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    if tools is None:
        if choice is not None:
            raise ValueError("tool_choice: needs tools (the request has none)")
        return None
    if not isinstance(tools, list) or not tools:
        raise ValueError("tools: must be a non-empty list of {type: function, function: {...}} objects")
    names = [_tool_name(i, tool) for i, tool in enumerate(tools)]
    for i, name in enumerate(names):
        if name in names[:i]:
            raise ValueError(f"tools[{i}].function.name={name!r}: a second function of this name")
    parallel = body.get("parallel_tool_calls", True)
    if not isinstance(parallel, bool):
        raise ValueError(f"parallel_tool_calls={parallel!r}: must be true or false")
    choice = "auto" if choice is None else choice
    if isinstance(choice, str):
        if choice not in CHOICES:
            raise ValueError(f"tool_choice={choice!r}: must be one of {', '.join(CHOICES)} or "
                              '{"type": "function", "function": {"name": ...}}')
        request = ToolRequest(tools, choice, parallel=parallel)
    else:
        function = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
        name = function.get("name") if isinstance(function, dict) else None
        if not isinstance(name, str):
            raise ValueError(f"tool_choice={_short(choice)}: must be one of {', '.join(CHOICES)} or "
                              '{"type": "function", "function": {"name": ...}}')
        if name not in names:
            raise ValueError(f"tool_choice.function.name={name!r}: no such function in tools (known: "
                              f"{', '.join(names)})")
        request = ToolRequest(tools, "function", name, parallel)
    format_ = body.get("response_format")
    if request.constrained and isinstance(format_, dict) and format_.get("type") != "text":
        raise ValueError(f"tool_choice={_short(choice)}: cannot be combined with a response_format "
                          "(both constrain the answer)")
    return request


def _tool_name(i: int, tool: Any) -> str:
    where = f"tools[{i}]"
    if not isinstance(tool, dict) or tool.get("type") != "function" or set(tool) - {"type", "function"}:
        raise ValueError(f"{where}: must be an object {{type: function, function: {{...}}}}")
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError(f"{where}.function: must be an object with a name")
    unknown = sorted(set(function) - FUNCTION_KEYS)
    if unknown:
        raise ValueError(f"{where}.function.{unknown[0]}: not a field of a function (known: "
                          f"{', '.join(sorted(FUNCTION_KEYS))})")
    name = function.get("name")
    if not isinstance(name, str) or not NAME.fullmatch(name):
        raise ValueError(f"{where}.function.name={_short(name)}: must be 1 to 64 letters, digits, _ or -")
    if "description" in function and not isinstance(function["description"], str):
        raise ValueError(f"{where}.function.description: must be a string")
    if "strict" in function and not isinstance(function["strict"], bool):
        raise ValueError(f"{where}.function.strict: must be true or false")
    parameters = function.get("parameters", NO_PARAMETERS)
    if not isinstance(parameters, dict):
        raise ValueError(f"{where}.function.parameters: must be a JSON schema object")
    try:
        grammar_of({"type": "json_schema", "json_schema": {"schema": parameters}})
    except ValueError as exc:
        why = str(exc).removeprefix("response_format.json_schema: ")
        raise ValueError(f"{where}.function.parameters: {why}") from exc
    return name


def tool_grammar(syntax: ToolSyntax, request: ToolRequest, control_token: Callable[[str], int | None]) -> str | None:
    """The Lark grammar (llguidance's syntax) whose texts are exactly the calls `request`
    allows, in `syntax`: None unless the choice is `required` or a named function.
    `control_token` gives the id of a marker that is a control token (written `<[id]>`: no
    text spells it)."""
    if not request.constrained:
        return None
    key = ARGUMENT_KEYS[syntax.format]
    bodies = [
        {"type": "object", "properties": {"name": {"const": f["name"]}, key: f.get("parameters", NO_PARAMETERS)},
         "required": ["name", key], "additionalProperties": False}
        for f in (tool["function"] for tool in request.tools)
        if request.function in (None, f["name"])
    ]
    body = bodies[0] if len(bodies) == 1 else {"anyOf": bodies}
    one = request.most_calls == 1

    def marker(text: str) -> str:
        token = control_token(text)
        return f"<[{token}]>" if token is not None else json.dumps(text)

    if syntax.format is ToolFormat.HERMES:
        call = f'{marker(HERMES_OPEN)} "\\n" body "\\n" {marker(HERMES_CLOSE)}'
        start = "call" if one else 'call ("\\n" call)*'
        return f"start: {start}\ncall: {call}\nbody: %json {json.dumps(body)}\n"
    if syntax.format is ToolFormat.LLAMA3:
        return f"start: body\nbody: %json {json.dumps(body)}\n"
    calls = {"type": "array", "items": body, "minItems": 1, **({"maxItems": 1} if one else {})}
    return f"start: {marker(MISTRAL_MARKER)} calls\ncalls: %json {json.dumps(calls)}\n"


def call_id(syntax: ToolSyntax) -> str:
    """A fresh id for a call: 9 letters and digits where the template's own history needs that
    shape (Mistral's templates refuse other ids), else OpenAI's `call_...`."""
    if syntax.format is ToolFormat.MISTRAL:
        return "".join(secrets.choice(string.ascii_letters + string.digits) for _ in range(9))
    return f"call_{secrets.token_hex(12)}"


def message(syntax: ToolSyntax, text: str, most: int | None = None, cut: bool = False) -> tuple[dict[str, Any], bool]:
    """The assistant message of a whole answer (`cut` short by its budget or not), and whether it
    holds tool calls (the first `most` of those it wrote)."""
    reading = read(syntax, text, final=True, cut=cut)
    reading.calls = reading.calls[:most]
    if not reading.calls:
        return {"role": "assistant", "content": text}, False
    calls = [{"id": call_id(syntax), "type": "function", "function": {"name": c.name, "arguments": c.arguments}}
             for c in reading.calls]
    return {"role": "assistant", "content": reading.content or None, "tool_calls": calls}, True


@dataclass
class ToolDeltas:
    """One streamed choice's text turned into OpenAI's chat deltas: content, and for each call
    a first delta with its index, id, type, name and empty arguments, then fragments of its
    arguments. What is sent is always the start of what the whole answer would hold (but for
    the first delta of a call that the token budget cuts short, which cannot be taken back)."""

    syntax: ToolSyntax
    most: int | None = None
    """Calls sent at most (those the model writes beyond are dropped)."""
    text: str = ""
    content_sent: int = 0
    arguments_sent: list[int] = field(default_factory=list)
    """Characters of each started call's arguments sent."""

    @property
    def called(self) -> bool:
        return bool(self.arguments_sent)

    def push(self, text: str, final: bool, cut: bool = False) -> list[dict[str, Any]]:
        """The deltas the new `text` brings (at the end, `final`: everything left; `cut`: the
        answer was cut short by its budget)."""
        self.text += text
        reading = read(self.syntax, self.text, final, cut)
        reading.calls = reading.calls[:self.most]
        deltas: list[dict[str, Any]] = []
        if len(reading.content) > self.content_sent:
            deltas.append({"content": reading.content[self.content_sent:]})
            self.content_sent = len(reading.content)
        deltas += self._calls(reading)
        return deltas

    def _calls(self, reading: Reading) -> list[dict[str, Any]]:
        deltas = []
        for i, call in enumerate(reading.calls):
            if call.name is None:
                break
            if i == len(self.arguments_sent):
                self.arguments_sent.append(0)
                deltas.append({"tool_calls": [{"index": i, "id": call_id(self.syntax), "type": "function",
                                               "function": {"name": call.name, "arguments": ""}}]})
            fragment = call.arguments[self.arguments_sent[i]:]
            if fragment:
                deltas.append({"tool_calls": [{"index": i, "function": {"arguments": fragment}}]})
                self.arguments_sent[i] = len(call.arguments)
        return deltas


def _short(value: Any, limit: int = 60) -> str:
    shown = json.dumps(value) if isinstance(value, (dict, list)) else repr(value)
    return shown if len(shown) <= limit else shown[: limit - 3] + "..."
