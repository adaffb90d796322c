"""Tool calls: the syntax read from a template, the conversation given to the template, the
calls read back from a model's output, and the grammar of `required` and named choices.

References: hand-written model outputs in each family's syntax with their calls written out by
hand; transformers' own `apply_chat_template(tools=...)` for what a template is given; and
llguidance's matcher, fed the tokens of hand-written calls, for what a grammar allows.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import llguidance
import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from ppinfer.pipeline.sinks import grammar_vocab
from ppinfer.sampling.grammar import GrammarVocab, lark_grammar
from ppinfer.serving.tools import ToolDeltas, ToolRequest, message, parse_tools, tool_grammar
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer
from ppinfer.text.tools import ToolFormat, ToolSyntax, read, tool_syntax

GEMMA3_VOCAB = Path(__file__).parent / "fixtures" / "gemma3-270m-vocab-only.gguf"
HERMES = ToolSyntax(ToolFormat.HERMES, True)
LLAMA3 = ToolSyntax(ToolFormat.LLAMA3, True)
MISTRAL = ToolSyntax(ToolFormat.MISTRAL, True)

# Templates in the shape of each family's own (written for these tests): how they give the
# tools to the model and write earlier calls.
HERMES_TEMPLATE = """{%- if tools %}<|im_start|>system
Functions:
<tools>
{%- for tool in tools %}
{{ tool | tojson }}
{%- endfor %}
</tools>
Call one as <tool_call>{"name": ..., "arguments": ...}</tool_call><|im_end|>
{% endif %}
{%- for message in messages %}
{%- if message.role == "tool" %}<|im_start|>user
<tool_response>
{{ message.content }}
</tool_response><|im_end|>
{% elif message.tool_calls %}<|im_start|>assistant
{%- for call in message.tool_calls %}
<tool_call>
{{ {"name": call.function.name, "arguments": call.function.arguments} | tojson }}
</tool_call>
{%- endfor %}<|im_end|>
{% else %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

LLAMA3_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == "user" and loop.last and tools is not none %}<|start_header_id|>user<|end_header_id|>

Answer with {"name": function name, "parameters": dictionary of arguments}. Functions:
{% for tool in tools %}{{ tool | tojson(indent=4) }}
{% endfor %}{{ message.content }}<|eot_id|>
{%- elif message.tool_calls %}<|start_header_id|>assistant<|end_header_id|>

{% for call in message.tool_calls %}{"name": "{{ call.function.name }}", "parameters": {{
call.function.arguments | tojson }}}{% endfor %}<|eot_id|>
{%- elif message.role == "tool" %}<|start_header_id|>ipython<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- else %}<|start_header_id|>{{ message.role }}<|end_header_id|>

{{ message.content }}<|eot_id|>
{%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}"""

MISTRAL_TEMPLATE = """{{- bos_token }}
{%- for message in messages %}
{%- if message.role == "user" %}
{%- if loop.last and tools %}[AVAILABLE_TOOLS]{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}
[INST]{{ message.content }}[/INST]
{%- elif message.tool_calls %}[TOOL_CALLS][
{%- for call in message.tool_calls %}{"name": "{{ call.function.name }}", "arguments": {{
call.function.arguments | tojson }}, "id": "{{ call.id }}"}{% if not loop.last %}, {% endif %}{% endfor %}]{{
eos_token }}
{%- elif message.role == "tool" %}[TOOL_RESULTS]{"content": {{ message.content | tojson }}, "call_id": "{{
message.tool_call_id }}"}[/TOOL_RESULTS]
{%- else %}{{ message.content }}{{ eos_token }}
{%- endif %}
{%- endfor %}"""

PLAIN_TEMPLATE = """{% for message in messages %}<|im_start|>{{ message.role }}
{{ message.content }}<|im_end|>
{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city", "parameters": {
    "type": "object", "properties": {"city": {"type": "string", "enum": ["Paris", "Rome"]},
                                     "days": {"type": "integer"}},
    "required": ["city"], "additionalProperties": False}}}
ADD = {"type": "function", "function": {"name": "add", "parameters": {
    "type": "object", "properties": {"a": {"type": "integer"}, "b": {"type": "integer"}}, "required": ["a", "b"],
    "additionalProperties": False}}}
CALL = {"id": "abcDEF123", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}
HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Rome?"},
    {"role": "assistant", "content": "", "tool_calls": [CALL]},
    {"role": "tool", "tool_call_id": "abcDEF123", "content": "sunny, 24 C"},
    {"role": "assistant", "content": "Sunny."},
    {"role": "user", "content": "And Paris?"},
]


# -- reading a model's output ---------------------------------------------------------------------

OUTPUTS: list[tuple[ToolSyntax, str, str | None, list[tuple[str, str]]]] = [
    (HERMES, 'Checking.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "note": "a } in {"}}'
     '\n</tool_call>\n<tool_call>{"arguments": {"a": 1, "b": [2, {"c": null}]}, "name": "add"}</tool_call>',
     "Checking.",
     [("get_weather", '{"city": "Paris", "note": "a } in {"}'), ("add", '{"a": 1, "b": [2, {"c": null}]}')]),
    (HERMES, "No call here, just <b>text</b>.", "No call here, just <b>text</b>.", []),
    (HERMES, '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>',  # not JSON: all content
     '<tool_call>\n{"name": "add", "arguments": {"a": 1,}}\n</tool_call>', []),
    (HERMES, '<tool_call>\n{"name": 7, "arguments": {}}\n</tool_call>', '<tool_call>\n{"name": 7, "arguments": {}}'
     '\n</tool_call>', []),
    (LLAMA3, '{"name": "get_weather", "parameters": {"city": "Rome", "days": 3}}', None,
     [("get_weather", '{"city": "Rome", "days": 3}')]),
    (LLAMA3, '<|python_tag|>{"name": "add", "arguments": {"a": 1, "b": 2}}', None, [("add", '{"a": 1, "b": 2}')]),
    (LLAMA3, "{The answer} is 4.", "{The answer} is 4.", []),
    (LLAMA3, "It is sunny.", "It is sunny.", []),
    (MISTRAL, '[TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Paris"}, "id": "a1b2c3d4e"}, '
     '{"name": "add", "arguments": {"a": -1.5e3, "b": 2}}]', None,
     [("get_weather", '{"city": "Paris"}'), ("add", '{"a": -1.5e3, "b": 2}')]),
    (MISTRAL, '[TOOL_CALLS] [{"name": "add", "arguments": {"a": 1}}', '[TOOL_CALLS] [{"name": "add", "arguments": '
     '{"a": 1}}', []),  # the list never closes
]


@pytest.mark.parametrize(("syntax", "output", "content", "calls"), OUTPUTS)
def test_outputs_read_as_written(syntax: ToolSyntax, output: str, content: str | None,
                                 calls: list[tuple[str, str]]) -> None:
    body, called = message(syntax, output)
    assert called == bool(calls)
    assert body["content"] == content
    got = [(c["function"]["name"], c["function"]["arguments"]) for c in body.get("tool_calls", [])]
    assert got == calls
    for _, arguments in got:
        json.loads(arguments)


@pytest.mark.parametrize(("syntax", "output", "content", "calls"), OUTPUTS)
@pytest.mark.parametrize("step", [1, 3, 11])
def test_streamed_deltas_join_to_the_whole_answer(syntax: ToolSyntax, output: str, content: str | None,
                                                  calls: list[tuple[str, str]], step: int) -> None:
    """Fed `step` characters at a time, the deltas rebuild the whole answer's content and calls
    (when the answer is a call, every call's first delta has its name and empty arguments)."""
    stream = ToolDeltas(syntax)
    deltas: list[dict[str, Any]] = []
    for i in range(0, len(output), step):
        deltas += stream.push(output[i:i + step], final=False)
    deltas += stream.push("", final=True)
    streamed_content = "".join(d.get("content", "") for d in deltas)
    assert streamed_content == (content or "")
    if not calls:
        return
    starts = [d["tool_calls"][0] for d in deltas if "tool_calls" in d and "id" in d["tool_calls"][0]]
    assert [(s["index"], s["type"], s["function"]) for s in starts] == [
        (i, "function", {"name": name, "arguments": ""}) for i, (name, _) in enumerate(calls)]
    for i, (_, arguments) in enumerate(calls):
        fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas
                     if "tool_calls" in d and d["tool_calls"][0]["index"] == i and "id" not in d["tool_calls"][0]]
        assert "".join(fragments) == arguments
        if i == 0:  # its name comes before its arguments: they stream in pieces, not at the end
            assert len(fragments) > 1 or step > len(arguments)


def test_an_answer_cut_short_keeps_the_calls_it_completed() -> None:
    text = ('<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
            '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b"')
    body, called = message(HERMES, text, cut=True)
    assert called and [c["function"]["arguments"] for c in body["tool_calls"]] == ['{"a": 1, "b": 2}']
    assert message(HERMES, text)[0] == {"role": "assistant", "content": text}  # not cut: malformed, content
    assert message(HERMES, text[:30], cut=True)[0]["content"] == text[:30]  # no call completed
    first, called = message(HERMES, text.replace('"b"', '"b": 3}}</tool_call>'), most=1)
    assert called and len(first["tool_calls"]) == 1


def test_text_that_may_begin_a_call_is_held_back() -> None:
    assert read(HERMES, "Sure <tool_", final=False).content == "Sure"
    assert read(HERMES, "Sure <tool_", final=True).content == "Sure <tool_"
    assert read(MISTRAL, "x [TOOL", final=False).content == "x"
    assert read(LLAMA3, "  <|python", final=False).content == ""


# -- which syntax, and what the template is given --------------------------------------------------

@pytest.mark.parametrize(("template", "expected"), [
    (HERMES_TEMPLATE, HERMES), (LLAMA3_TEMPLATE, LLAMA3), (MISTRAL_TEMPLATE, MISTRAL),
    (PLAIN_TEMPLATE, ToolSyntax(ToolFormat.HERMES, False)), (None, ToolSyntax(ToolFormat.HERMES, False)),
])
def test_the_syntax_is_read_from_the_template(template: str | None, expected: ToolSyntax) -> None:
    assert tool_syntax(template) == expected


@pytest.fixture(scope="module")
def gemma() -> Tokenizer:
    return load_tokenizer(GEMMA3_VOCAB)


def _transformers(template: str, messages: list[dict[str, Any]], tools: list[dict[str, Any]] | None) -> str:
    dummy = HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    reference = PreTrainedTokenizerFast(tokenizer_object=dummy, chat_template=template, bos_token="<bos>",
                                        eos_token="<eos>")
    return reference.apply_chat_template(messages, tools=tools, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("template", [HERMES_TEMPLATE, LLAMA3_TEMPLATE, MISTRAL_TEMPLATE])
@pytest.mark.parametrize("tools", [[WEATHER, ADD], None])
def test_native_templates_get_what_transformers_gives_them(gemma: Tokenizer, template: str,
                                                           tools: list[dict[str, Any]] | None) -> None:
    """transformers' templates take a call's arguments as an object (the client sends a JSON
    string) and `tools` as the function definitions (None when absent)."""
    syntax = tool_syntax(template)
    ours = gemma.apply_chat_template(syntax.conversation(HISTORY, tools), template=template, tools=tools)
    as_objects = [dict(m, tool_calls=[{**CALL, "function": {"name": "get_weather", "arguments": {"city": "Rome"}}}])
                  if m.get("tool_calls") else m for m in HISTORY]
    assert ours == _transformers(template, as_objects, tools)
    assert '"city": "Rome"' in ours and "sunny, 24 C" in ours
    assert ('"name": "add"' in ours) == (tools is not None)


def test_the_fallback_describes_the_tools_and_writes_calls_as_text(gemma: Tokenizer) -> None:
    syntax = tool_syntax(PLAIN_TEMPLATE)
    conversation = syntax.conversation(HISTORY, [WEATHER])
    assert [m["role"] for m in conversation] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert conversation[0]["content"].startswith("Be brief.\n\n")
    assert json.dumps(WEATHER) in conversation[0]["content"]
    assert conversation[2]["content"] == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n' \
                                         "</tool_call>"
    assert conversation[3]["content"] == "<tool_response>\nsunny, 24 C\n</tool_response>"
    rendered = gemma.apply_chat_template(conversation, template=PLAIN_TEMPLATE)
    assert rendered.endswith("<|im_start|>user\nAnd Paris?<|im_end|>\n<|im_start|>assistant\n")


# -- the grammar of required and named choices ----------------------------------------------------

@pytest.fixture(scope="module")
def vocab(smollm2_path: Path) -> tuple[Tokenizer, GrammarVocab]:
    tokenizer = load_tokenizer(smollm2_path)
    return tokenizer, grammar_vocab(tokenizer)


def _allows(vocab: tuple[Tokenizer, GrammarVocab], grammar: str, text: str) -> bool:
    """True when the grammar's matcher takes every token of `text` and may end there."""
    tokenizer, grammar_vocab_ = vocab
    matcher = llguidance.LLMatcher(grammar_vocab_.tokenizer, lark_grammar(grammar), log_level=0)
    return all(matcher.consume_token(t) for t in tokenizer.encode(text, add_bos=False, parse_special=False)) \
        and matcher.is_accepting()


def _grammar(syntax: ToolSyntax, choice: Any, parallel: bool = True) -> str:
    request = parse_tools({"tools": [WEATHER, ADD], "tool_choice": choice, "parallel_tool_calls": parallel})
    assert isinstance(request, ToolRequest)
    grammar = tool_grammar(syntax, request, lambda text: None)
    assert grammar is not None
    return grammar


NAMED = {"type": "function", "function": {"name": "get_weather"}}


@pytest.mark.parametrize(("syntax", "choice", "text", "allowed"), [
    (HERMES, NAMED, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', True),
    (HERMES, NAMED, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>', False),
    (HERMES, NAMED, '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>', False),
    (HERMES, NAMED, 'Sure.<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', False),
    (HERMES, NAMED, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', False),
    (HERMES, "required", '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>\n'
     '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "days": 2}}\n</tool_call>', True),
    (HERMES, "required", '<tool_call>\n{"name": "add", "arguments": {"a": 1}}\n</tool_call>', False),
    (HERMES, "required", "I will not call anything.", False),
    (LLAMA3, "required", '{"name": "add", "parameters": {"a": 1, "b": 2}}', True),
    (LLAMA3, "required", '{"name": "add", "arguments": {"a": 1, "b": 2}}', False),
    (LLAMA3, NAMED, '{"name": "get_weather", "parameters": {"city": "Paris"}}', True),
    (MISTRAL, "required", '[TOOL_CALLS][{"name": "add", "arguments": {"a": 1, "b": 2}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome"}}]', True),
    (MISTRAL, NAMED, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', True),
    (MISTRAL, NAMED, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}, '
     '{"name": "get_weather", "arguments": {"city": "Rome"}}]', False),
    (MISTRAL, "required", "[TOOL_CALLS][]", False),
])
def test_the_grammar_allows_exactly_the_calls_asked_for(vocab, syntax: ToolSyntax, choice: Any, text: str,
                                                        allowed: bool) -> None:
    assert _allows(vocab, _grammar(syntax, choice), text) == allowed


def test_one_call_without_parallel_tool_calls(vocab) -> None:
    one = '<tool_call>\n{"name": "add", "arguments": {"a": 1, "b": 2}}\n</tool_call>'
    assert _allows(vocab, _grammar(HERMES, "required", parallel=False), one)
    assert not _allows(vocab, _grammar(HERMES, "required", parallel=False), f"{one}\n{one}")
    assert not _allows(vocab, _grammar(MISTRAL, "required", parallel=False), '[TOOL_CALLS][{"name": "add", '
                       '"arguments": {"a": 1, "b": 2}}, {"name": "add", "arguments": {"a": 1, "b": 2}}]')
    with pytest.raises(ValueError, match=r"^parallel_tool_calls=1: must be true or false"):
        parse_tools({"tools": [ADD], "parallel_tool_calls": 1})


def test_every_text_the_grammar_allows_reads_back_as_its_calls() -> None:
    """The grammar's calls in each syntax are what `read` takes as calls (the hand-written
    allowed texts above, read back)."""
    for syntax, text, name in [
        (HERMES, '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>', "get_weather"),
        (LLAMA3, '{"name": "add", "parameters": {"a": 1, "b": 2}}', "add"),
        (MISTRAL, '[TOOL_CALLS][{"name": "get_weather", "arguments": {"city": "Rome"}}]', "get_weather"),
    ]:
        body, called = message(syntax, text)
        assert called and body["tool_calls"][0]["function"]["name"] == name


def test_control_token_markers_are_written_by_id() -> None:
    request = parse_tools({"tools": [ADD], "tool_choice": "required"})
    assert request is not None
    grammar = tool_grammar(MISTRAL, request, lambda text: 5 if text == "[TOOL_CALLS]" else None)
    assert grammar is not None and grammar.startswith("start: <[5]> calls")
    assert tool_grammar(HERMES, ToolRequest([ADD], "auto"), lambda text: None) is None
