"""Tool calls in a model's own syntax: which syntax a chat template uses, how a conversation
with tools is given to the template, and how a model's output is read back into calls.

Three syntaxes, those of the supported families' templates, chosen from the template's text
(the way llama.cpp's chat parser recognises them):

- `hermes` (Qwen 2.5 / 3, Hermes, SmolLM3): each call is `<tool_call>{"name": ..., "arguments":
  {...}}</tool_call>`, several in a row, after optional text;
- `llama3` (Llama 3.1 - 3.3): the whole answer is one `{"name": ..., "parameters": {...}}`,
  possibly after `<|python_tag|>`;
- `mistral` (Mistral 7B v0.3, Nemo, Small): `[TOOL_CALLS]` and a JSON list of `{"name": ...,
  "arguments": {...}}`.

A template that shows none of these markers (SmolLM2's, gemma's: no tool support) gets the
fallback: the tools are described in a system message written here, earlier calls and tool
results become plain text of the conversation, and the model is asked for the `hermes` syntax.

Reading output (`read`) never guesses: a call whose JSON does not parse, or lacks a name,
leaves the whole answer as content. A call's `arguments` is the JSON text of its arguments
exactly as the model wrote it, so a streamed call's fragments join to the same string.
"""

from __future__ import annotations

import contextlib
import json
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class ToolFormat(Enum):
    HERMES = "hermes"
    LLAMA3 = "llama3"
    MISTRAL = "mistral"


HERMES_OPEN, HERMES_CLOSE = "<tool_call>", "</tool_call>"
PYTHON_TAG = "<|python_tag|>"
MISTRAL_MARKER = "[TOOL_CALLS]"
ARGUMENT_KEYS = {ToolFormat.HERMES: "arguments", ToolFormat.LLAMA3: "parameters", ToolFormat.MISTRAL: "arguments"}
"""The key each syntax writes a call's arguments under (`read` takes either spelling)."""


@dataclass(frozen=True)
class ToolSyntax:
    """How one chat template speaks of tools."""

    format: ToolFormat
    native: bool
    """True when the template renders `tools` and tool messages itself; False for the fallback
    (tools described in a system message written here, `hermes` syntax)."""

    def conversation(self, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> list[dict[str, Any]]:
        """`messages` (OpenAI's shapes: assistant `tool_calls` with JSON-string arguments, `tool`
        messages) as the template takes them. Native: arguments become objects, as
        transformers' templates expect (`tool_call.arguments | tojson`). Fallback: calls and
        results become text, and `tools` (when given) a system message."""
        if self.native:
            return [_with_object_arguments(m) for m in messages]
        out: list[dict[str, Any]] = []
        for message in messages:
            if message["role"] == "tool":
                result = f"<tool_response>\n{message.get('content') or ''}\n</tool_response>"
                if out and out[-1].get("tool_results"):
                    out[-1] = {**out[-1], "content": out[-1]["content"] + "\n" + result}
                else:
                    out.append({"role": "user", "content": result, "tool_results": True})
            elif message.get("tool_calls"):
                calls = [_hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in message["tool_calls"]]
                text = "\n".join([message.get("content") or "", *calls]).strip("\n")
                out.append({"role": message["role"], "content": text})
            else:
                out.append({"role": message["role"], "content": message.get("content") or ""})
        out = [{k: v for k, v in m.items() if k != "tool_results"} for m in out]
        if tools:
            described = _describe(tools)
            if out and out[0]["role"] == "system":
                out[0] = {**out[0], "content": f"{out[0]['content']}\n\n{described}"}
            else:
                out.insert(0, {"role": "system", "content": described})
        return out


def tool_syntax(template: str | None) -> ToolSyntax:
    """The syntax of `template`'s tool calls: the first family whose marker its text shows,
    else the fallback."""
    text = template or ""
    if HERMES_OPEN in text:
        return ToolSyntax(ToolFormat.HERMES, True)
    if MISTRAL_MARKER in text:
        return ToolSyntax(ToolFormat.MISTRAL, True)
    if PYTHON_TAG in text or ("<|start_header_id|>" in text and '"parameters"' in text):
        return ToolSyntax(ToolFormat.LLAMA3, True)
    return ToolSyntax(ToolFormat.HERMES, False)


def _with_object_arguments(message: dict[str, Any]) -> dict[str, Any]:
    calls = message.get("tool_calls")
    if not calls:
        return message
    converted = []
    for call in calls:
        function = dict(call["function"])
        # Arguments that are not JSON stay the string the client sent.
        with contextlib.suppress(TypeError, ValueError):
            function["arguments"] = json.loads(function["arguments"])
        converted.append({**call, "function": function})
    return {**message, "tool_calls": converted}


def _hermes_call(name: str, arguments: str) -> str:
    try:
        value: Any = json.loads(arguments)
    except ValueError:
        value = arguments
    return f"{HERMES_OPEN}\n{json.dumps({'name': name, 'arguments': value}, ensure_ascii=False)}\n{HERMES_CLOSE}"


def _describe(tools: list[dict[str, Any]]) -> str:
    """The fallback's system text: the functions' signatures, and the syntax to call them."""
    signatures = "\n".join(json.dumps(tool, ensure_ascii=False) for tool in tools)
    return (
        "You can call functions to answer. The functions, as JSON signatures:\n"
        f"<tools>\n{signatures}\n</tools>\n"
        "To call one, reply with its name and arguments as a JSON object inside tags, like\n"
        f'{HERMES_OPEN}\n{{"name": "function_name", "arguments": {{"argument": "value"}}}}\n{HERMES_CLOSE}\n'
        "Each function's result will come back inside <tool_response></tool_response> tags."
    )


@dataclass
class ToolCall:
    """One call read from the output: its function's name (None until it has been read) and
    the JSON text of its arguments so far."""

    name: str | None
    arguments: str
    complete: bool


@dataclass
class Reading:
    """The output read so far: the content (text that is not a call) and the calls."""

    content: str
    calls: list[ToolCall] = field(default_factory=list)


def read(syntax: ToolSyntax, text: str, final: bool, cut: bool = False) -> Reading:
    """The content and calls in `text`. While the output goes on (`final` False), text that
    may still turn out to begin a call is held back from the content, and the last call may be
    incomplete, and trailing white space is held back too (so the content read at any time is
    the start of the final content). At the end, an output that does not read entirely as
    calls (after optional text) is all content; but an answer `cut` short (by its token budget)
    keeps the calls it completed, without the one it was writing."""
    if final and cut:
        reading = read(syntax, text, final=False)
        calls = [c for c in reading.calls if c.complete and c.name is not None]
        return Reading(reading.content, calls) if calls else Reading(text)
    start = _call_start(syntax, text)
    if start is None:
        if final:
            return Reading(text)
        return Reading(text[: len(text) - _held_back(syntax, text)].rstrip())
    content = text[:start].rstrip()
    calls, tail_ok, rest = _calls(syntax, text, start)
    if final:
        if not tail_ok or not calls or not all(c.complete and c.name is not None for c in calls):
            return Reading(text)
        if rest.strip():
            content = f"{content}\n{rest.strip()}" if content else rest.strip()
        return Reading(content, calls)
    if not tail_ok:  # not a call after all: the text so far is content
        return Reading(text.rstrip())
    return Reading(content, calls)


def _call_start(syntax: ToolSyntax, text: str) -> int | None:
    """Where the calls begin in `text` (None: no call has begun)."""
    if syntax.format is ToolFormat.HERMES:
        index = text.find(HERMES_OPEN)
        return None if index < 0 else index
    if syntax.format is ToolFormat.MISTRAL:
        index = text.find(MISTRAL_MARKER)
        return None if index < 0 else index
    stripped = text.lstrip()
    if stripped.startswith((PYTHON_TAG, "{")):
        return len(text) - len(stripped)
    return None


def _held_back(syntax: ToolSyntax, text: str) -> int:
    """How many characters at the end of `text` could begin a call."""
    if syntax.format is ToolFormat.LLAMA3:
        stripped = text.lstrip()
        return len(text) if PYTHON_TAG.startswith(stripped) else 0
    marker = HERMES_OPEN if syntax.format is ToolFormat.HERMES else MISTRAL_MARKER
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


def _calls(syntax: ToolSyntax, text: str, start: int) -> tuple[list[ToolCall], bool, str]:
    """The calls from `start` on; whether the text read so far has the syntax's shape; the
    text after the last complete call's envelope (content after the calls)."""
    if syntax.format is ToolFormat.HERMES:
        return _hermes_calls(text, start)
    if syntax.format is ToolFormat.MISTRAL:
        return _mistral_calls(text, start + len(MISTRAL_MARKER))
    i = start + len(PYTHON_TAG) if text.startswith(PYTHON_TAG, start) else start
    i = _skip_space(text, i)
    if i == len(text):
        return [], True, ""
    call, end, ok = _object_call(text, i)
    if not ok:
        return [], False, ""
    return [call], True, "" if end is None else text[end:]


def _hermes_calls(text: str, i: int) -> tuple[list[ToolCall], bool, str]:
    calls: list[ToolCall] = []
    rest = ""
    while True:
        i = _skip_space(text, i)
        if i == len(text):
            return calls, True, rest
        if not text.startswith(HERMES_OPEN, i):
            if calls and calls[-1].complete:
                return calls, True, text[i:]
            return calls, HERMES_OPEN.startswith(text[i:]), rest
        i = _skip_space(text, i + len(HERMES_OPEN))
        if i == len(text):
            return calls, True, rest
        call, end, ok = _object_call(text, i)
        if not ok:
            return calls, False, rest
        calls.append(call)
        if end is None:
            return calls, True, rest
        i = _skip_space(text, end)
        if not text.startswith(HERMES_CLOSE, i):
            if HERMES_CLOSE.startswith(text[i:]):  # the closing tag is still coming
                call.complete = False
                return calls, True, rest
            return calls, False, rest
        i += len(HERMES_CLOSE)


def _mistral_calls(text: str, i: int) -> tuple[list[ToolCall], bool, str]:
    i = _skip_space(text, i)
    if i == len(text):
        return [], True, ""
    if text[i] != "[":
        return [], False, ""
    calls: list[ToolCall] = []
    i += 1
    while True:
        i = _skip_space(text, i)
        if i == len(text):
            return calls, True, ""
        if calls and text[i] == "]":
            return calls, True, text[i + 1:]
        if calls:
            if text[i] != ",":
                return calls, False, ""
            i = _skip_space(text, i + 1)
            if i == len(text):
                return calls, True, ""
        call, end, ok = _object_call(text, i)
        if not ok:
            return calls, False, ""
        calls.append(call)
        if end is None:
            return calls, True, ""
        call.complete = False  # until the list's closing bracket
        i = end
        j = _skip_space(text, i)
        if j < len(text) and text[j] in ",]":
            call.complete = True


def _skip_space(text: str, i: int) -> int:
    while i < len(text) and text[i].isspace():
        i += 1
    return i


def _object_call(text: str, i: int) -> tuple[ToolCall, int | None, bool]:
    """The call written as the JSON object at `text[i]`; where the object ends (None: not yet);
    whether the text can be such an object."""
    scan = scan_object(text, i)
    if scan is None:
        return ToolCall(None, "", False), None, False
    name = _string_field(text, scan, "name")
    if "name" in scan.fields and scan.fields["name"][1] is not None and name is None:
        return ToolCall(None, "", False), None, False  # a name that is not a string
    key = next((k for k in ("arguments", "parameters") if k in scan.fields), None)
    arguments = ""
    if key is not None:
        begin, end = scan.fields[key]
        if begin is not None:
            arguments = text[begin:end] if end is not None else text[begin:].rstrip()
    if scan.end is None:
        return ToolCall(name, arguments, False), None, True
    try:
        whole = json.loads(text[i:scan.end])
    except ValueError:
        return ToolCall(None, "", False), None, False
    if not isinstance(whole.get("name"), str) or key is None:
        return ToolCall(None, "", False), None, False
    return ToolCall(whole["name"], arguments, True), scan.end, True


def _string_field(text: str, scan: ObjectScan, key: str) -> str | None:
    span = scan.fields.get(key)
    if span is None or span[0] is None or span[1] is None:
        return None
    try:
        value = json.loads(text[span[0]:span[1]])
    except ValueError:
        return None
    return value if isinstance(value, str) else None


@dataclass
class ObjectScan:
    """Where the top-level values of a JSON object lie in a text (possibly cut short)."""

    fields: dict[str, list[int | None]]
    """Key -> [start, end) of its value; None where not read yet."""
    end: int | None
    """Just after the object's closing brace; None while it is still open."""


def scan_object(text: str, i: int) -> ObjectScan | None:
    """Scan the JSON object that begins at `text[i]`, possibly cut short by the end of the
    text. Only its top level is followed (strings, nesting and separators); None when the text
    cannot be the start of an object. Full validity is left to `json.loads` once it ends."""
    if i >= len(text) or text[i] != "{":
        return None
    fields: dict[str, list[int | None]] = {}
    depth = 1
    in_string = escaped = False
    key_start: int | None = None
    key: str | None = None  # a key read, its colon not yet
    value: str | None = None  # the key whose value is being read (at depth 1)
    expect_key = True
    last = i  # the last non-space character of a scalar value
    for j in range(i + 1, len(text)):
        c = text[j]
        if in_string:
            if escaped:
                escaped = False
            elif c == "\\":
                escaped = True
            elif c == '"':
                in_string = False
                if depth == 1 and key_start is not None:
                    key, key_start = json.loads(text[key_start:j + 1]), None
                elif depth == 1 and value is not None:
                    fields[value][1], value = j + 1, None
            continue
        if depth > 1:
            if c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            elif c in "}]":
                depth -= 1
                if depth == 1:
                    assert value is not None
                    fields[value][1], value = j + 1, None
            continue
        if c.isspace():
            continue
        if value is not None and fields[value][0] is None:  # a value begins
            fields[value][0] = last = j
            if c == '"':
                in_string = True
            elif c in "{[":
                depth += 1
            continue
        if value is not None:  # inside a number, true, false or null
            if c in ",}":
                fields[value][1], value = last + 1, None
                if c == "}":
                    return ObjectScan(fields, j + 1)
                expect_key = True
            else:
                last = j
            continue
        if c == '"' and expect_key and key is None:
            key_start, in_string = j, True
        elif c == ":" and key is not None:
            fields[key], value, key, expect_key = [None, None], key, None, False
        elif c == "," and not expect_key and key is None:
            expect_key = True
        elif c == "}" and key is None and (not expect_key or not fields):
            return ObjectScan(fields, j + 1)
        else:
            return None
    return ObjectScan(fields, None)
