"""Chat rendering through the model's template: the tool-call round trip, messages without content, and
template failures, on the demo tokenizer (no tool support: the Hermes text form) and a tool-aware template."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from transformers import AutoTokenizer

from loraplex.tokenization import encode_chat

CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
ROUND_TRIP = [{"role": "user", "content": "Weather in Paris?"},
              {"role": "assistant", "content": None, "tool_calls": [CALL]},
              {"role": "tool", "tool_call_id": "call_1", "content": "22 C"},
              {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
              {"role": "user"}]


@pytest.fixture(scope="module")
def tokenizer(demo_model_path: Path):
    return AutoTokenizer.from_pretrained(demo_model_path)


def _text(tokenizer, messages) -> str:
    return tokenizer.decode(encode_chat(tokenizer, messages))


def test_round_trip_renders_in_the_hermes_text_form_without_template_support(tokenizer):
    assert "tool_calls" not in tokenizer.chat_template
    want = tokenizer.apply_chat_template([
        {"role": "user", "content": "Weather in Paris?"},
        {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n'
                                         '</tool_call>'},
        {"role": "user", "content": '<tool_response>\n{"name": "get_weather", "content": "22 C"}\n</tool_response>\n'
                                    '<tool_response>\n{"name": "get_weather", "content": "sunny"}\n</tool_response>'},
        {"role": "user", "content": ""}], add_generation_prompt=True, tokenize=False)
    assert _text(tokenizer, ROUND_TRIP) == want


def test_text_beside_calls_is_kept(tokenizer):
    text = _text(tokenizer, [{"role": "user", "content": "hi"},
                             {"role": "assistant", "content": "Let me look.", "tool_calls": [CALL]}])
    assert 'Let me look.\n<tool_call>\n{"name": "get_weather"' in text


TOOL_TEMPLATE = (
    "{% for m in messages %}<{{ m.role }}>{{ m.content }}"
    "{% for c in m.tool_calls or [] %}[call {{ c.function.name }} {{ c.function.arguments.city }}]{% endfor %}"
    "{% endfor %}{% if tools %}{{ tools | length }} tools{% endif %}")


def test_a_tool_aware_template_gets_structured_calls(tokenizer):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = TOOL_TEMPLATE
    text = _text(tokenizer, ROUND_TRIP)
    # Arguments arrive as an object (HF's convention), null content as "", tool turns as they are.
    assert text == "<user>Weather in Paris?<assistant>[call get_weather Paris]<tool>22 C<tool>sunny<user>"


@pytest.mark.parametrize(("template", "says"), [
    ("{{ raise_exception('Conversation roles must alternate') }}", "Conversation roles must alternate"),
    ("{% for m in messages %}{{ m.nope.deeper }}{% endfor %}", "UndefinedError"),
    ("{% for m in messages %}{{ m.content + 1 }}{% endfor %}", "TypeError"),
])
def test_template_errors_are_value_errors_naming_the_problem(tokenizer, template, says):
    tokenizer = AutoTokenizer.from_pretrained(tokenizer.name_or_path)
    tokenizer.chat_template = template
    with pytest.raises(ValueError, match="chat template cannot render these messages") as e:
        encode_chat(tokenizer, [{"role": "user", "content": "hi"}])
    assert says in str(e.value)


def test_arguments_that_are_not_json_are_rendered_as_given(tokenizer):
    bad = {**CALL, "function": {"name": "f", "arguments": "{not json"}}
    text = _text(tokenizer, [{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [bad]}])
    assert json.dumps({"name": "f", "arguments": "{not json"}) in text
