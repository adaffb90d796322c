"""Chat template rendering, compared with transformers' own `apply_chat_template`.

The reference is a `PreTrainedTokenizerFast` built independently of ppinfer (a dummy
word-level model) that carries the same template and bos/eos texts, so the comparison is
against transformers' renderer, not ours.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models
from transformers import PreTrainedTokenizerFast

from ppinfer.errors import ModelFileError, PromptError
from ppinfer.pipeline.job import encode_prompt
from ppinfer.text.tokenizer import Tokenizer, load_tokenizer

GEMMA3_VOCAB = Path(__file__).parent / "fixtures" / "gemma3-270m-vocab-only.gguf"

CONVERSATIONS: list[tuple[list[dict[str, Any]], bool]] = [
    ([{"role": "user", "content": "What is 2+2?"}], True),
    (
        [
            {"role": "system", "content": "You answer in French."},
            {"role": "user", "content": "Hello!"},
            {"role": "assistant", "content": "Bonjour !"},
            {"role": "user", "content": "How are you?"},
        ],
        True,
    ),
    (
        [
            {"role": "user", "content": "Write code:\n```py\nprint('hé 😀')\n```"},
            {"role": "assistant", "content": "  leading spaces\n\ttab <b>&amp;</b>"},
        ],
        False,
    ),
]


@pytest.fixture(scope="module")
def smollm2(smollm2_path: Path) -> Tokenizer:
    return load_tokenizer(smollm2_path)


def _hf_reference(template: str, bos: str, eos: str) -> PreTrainedTokenizerFast:
    dummy = HFTokenizer(models.WordLevel({"[UNK]": 0}, unk_token="[UNK]"))
    return PreTrainedTokenizerFast(tokenizer_object=dummy, chat_template=template, bos_token=bos, eos_token=eos)


@pytest.mark.slow
@pytest.mark.parametrize(("messages", "add_generation_prompt"), CONVERSATIONS)
def test_smollm2_template_matches_transformers(smollm2: Tokenizer, messages: list[dict[str, Any]],
                                               add_generation_prompt: bool) -> None:
    assert smollm2.chat_template is not None
    reference = _hf_reference(smollm2.chat_template, "<|im_start|>", "<|im_end|>")
    expected = reference.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert smollm2.apply_chat_template(messages, add_generation_prompt=add_generation_prompt) == expected


# Exercises trim_blocks/lstrip_blocks, loop controls, tojson without HTML escaping, bos/eos.
CUSTOM_TEMPLATE = """{{ bos_token }}
{% for m in messages %}
    {% if m['role'] == 'tool' %}{% continue %}{% endif %}
    <{{ m['role'] }}>{{ m['content'] | tojson }}
{% endfor %}
{% if add_generation_prompt %}<assistant>{% endif %}{{ eos_token }}"""


def test_explicit_template_matches_transformers() -> None:
    gemma = load_tokenizer(GEMMA3_VOCAB)
    messages = [
        {"role": "user", "content": "a <tag> & 'quote' é"},
        {"role": "tool", "content": "skipped"},
        {"role": "assistant", "content": "ok"},
    ]
    expected = _hf_reference(CUSTOM_TEMPLATE, "<bos>", "<eos>").apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    assert gemma.apply_chat_template(messages, template=CUSTOM_TEMPLATE) == expected
    assert '"a <tag> & \'quote\' é"' in expected


def test_no_template_is_a_clear_error() -> None:
    gemma = load_tokenizer(GEMMA3_VOCAB)
    assert gemma.chat_template is None
    with pytest.raises(ModelFileError, match=r"gemma3-270m-vocab-only\.gguf.*chat_template="):
        gemma.apply_chat_template([{"role": "user", "content": "hi"}])


def test_template_errors_are_reported() -> None:
    gemma = load_tokenizer(GEMMA3_VOCAB)
    strict = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first message must be user') }}{% endif %}"
    with pytest.raises(PromptError, match="first message must be user"):
        gemma.apply_chat_template([{"role": "system", "content": "x"}], template=strict)
    # The sandbox is immutable: a template may not mutate the caller's messages.
    with pytest.raises(PromptError, match="rejected"):
        gemma.apply_chat_template([{"role": "user", "content": "x"}], template="{{ messages.append(1) }}")
    with pytest.raises(ModelFileError, match="does not parse"):
        gemma.apply_chat_template([{"role": "user", "content": "x"}], template="{% for m in messages %}")


# The shape of the gemma-3 / Llama 3 templates: the template itself writes the BOS text.
BOS_TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<start_of_turn>{{ m['role'] }}\n{{ m['content'] }}<end_of_turn>\n"
    "{% endfor %}<start_of_turn>model\n"
)


@pytest.mark.parametrize("file_adds_bos", [True, False])
def test_chat_prompt_rendering_bos_gets_exactly_one(file_adds_bos: bool) -> None:
    gemma = load_tokenizer(GEMMA3_VOCAB)
    gemma.add_bos = file_adds_bos  # gemma-3's file says True; False is the other branch
    messages = [{"role": "user", "content": "hi"}]
    rendered = gemma.apply_chat_template(messages, template=BOS_TEMPLATE)
    assert rendered.startswith("<bos><start_of_turn>user\n")
    ids = encode_prompt(gemma, rendered, chat=True)
    # gemma-3: <bos> = 2, <start_of_turn> = 105, "user" = 2364 (this used to start 2, 2, 105).
    assert ids[:3] == [2, 105, 2364]
    assert ids.count(2) == 1
    # The same conversation rendered without the BOS text encodes to the same ids when the
    # file adds BOS itself.
    if file_adds_bos:
        without = gemma.apply_chat_template(messages, template=BOS_TEMPLATE.removeprefix("{{ bos_token }}"))
        assert encode_prompt(gemma, without, chat=True) == ids
