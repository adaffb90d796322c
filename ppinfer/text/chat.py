"""Chat template rendering: the GGUF's Jinja `tokenizer.chat_template` in a sandbox.

Owns an environment configured like transformers' `apply_chat_template` renderer, so a
template renders the same string here as there: `ImmutableSandboxedEnvironment` (templates
come from model files: untrusted code), `trim_blocks` + `lstrip_blocks`, the `loopcontrols`
extension, a `{% generation %}` block that just renders its body, a `tojson` filter that
does not HTML-escape, and the `raise_exception` / `strftime_now` globals. Templates are
compiled once per distinct source string.
"""

from __future__ import annotations

import json
from datetime import datetime
from functools import lru_cache
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.parser
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ppinfer.errors import ModelFileError, PromptError


class _GenerationBlock(jinja2.ext.Extension):
    """`{% generation %}...{% endgeneration %}` (assistant-mask marker): renders the body unchanged."""

    tags = frozenset({"generation"})

    def parse(self, parser: jinja2.parser.Parser) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller: Any) -> str:
        return caller()


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None,
            separators: tuple[str, str] | None = None, sort_keys: bool = False) -> str:
    # Jinja's own tojson HTML-escapes (<, >, &, '), which would change prompts.
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


@lru_cache(maxsize=16)
def _compile(template: str) -> jinja2.Template:
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    return env.from_string(template)


def render_chat_template(
    template: str,
    messages: list[dict[str, Any]],
    *,
    add_generation_prompt: bool,
    bos_token: str,
    eos_token: str,
    source: str,
    tools: list[dict[str, Any]] | None = None,
) -> str:
    """Render `template` for `messages` (and `tools`: OpenAI's function definitions, given to
    the template as transformers gives them, None when there are none).

    `source` names where the template came from, for error messages. A syntax error in the
    template raises `ModelFileError`; a template that rejects the conversation (through
    `raise_exception`, or by failing on it) raises `PromptError`.
    """
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise PromptError(f"chat messages must be a list of dicts with 'role' and 'content', got {messages!r}")
    try:
        compiled = _compile(template)
    except jinja2.TemplateSyntaxError as exc:
        raise ModelFileError(f"chat template from {source} does not parse: {exc.message} (line {exc.lineno})") from exc
    try:
        return compiled.render(
            messages=messages,
            tools=tools,
            add_generation_prompt=add_generation_prompt,
            bos_token=bos_token,
            eos_token=eos_token,
        )
    except (jinja2.TemplateError, TypeError) as exc:
        # TypeError: the template combined message fields of the wrong type (e.g. str + None).
        raise PromptError(f"chat template from {source} rejected the messages: {exc}") from exc
