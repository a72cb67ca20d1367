"""tool_choice → the constrained reply format, and a constrained reply → the OpenAI assistant message."""

from __future__ import annotations

import json

import pytest

from loraplex.engine.request import FinishReason
from loraplex.server.tools import tool_call_message, tool_mode, with_tool_prompt

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


@pytest.mark.parametrize("choice", [None, "auto"])
def test_auto_is_an_either_or_of_the_calls_and_a_text_answer(choice):
    mode = tool_mode([WEATHER, TIME], choice)
    assert mode is not None
    options = json.loads(mode.schema)["anyOf"]
    assert [o.get("properties", {}).get("name") for o in options] == [{"const": "get_weather"},
                                                                      {"const": "get_time"}, None]
    assert options[0]["properties"]["arguments"] == WEATHER["function"]["parameters"]
    assert options[1]["properties"]["arguments"] == {"type": "object"}
    assert options[2] == {"type": "string"}
    assert "as a JSON string" in mode.prompt and '"name": "get_time"' in mode.prompt


def test_required_and_named_choices_allow_calls_only():
    required = tool_mode([WEATHER, TIME], "required")
    assert required is not None and {"type": "string"} not in json.loads(required.schema)["anyOf"]
    named = tool_mode([WEATHER, TIME], {"type": "function", "function": {"name": "get_time"}})
    assert named is not None and json.loads(named.schema)["properties"]["name"] == {"const": "get_time"}
    assert "get_weather" not in named.prompt
    assert tool_mode([WEATHER], "none") is None and tool_mode(None, None) is None and tool_mode(None, "auto") is None


@pytest.mark.parametrize(("tools", "choice", "says"), [
    ([WEATHER], "sometimes", "tool_choice must be"),
    ([WEATHER], {"type": "function", "function": {"name": "nope"}}, "not among the tools"),
    (None, "required", "needs tools"),
    ([{"type": "function"}], None, "tools[0] must be"),
    ([{"type": "function", "function": {"name": "f", "parameters": 3}}], None, "parameters must be"),
])
def test_bad_tool_requests_name_the_problem(tools, choice, says):
    with pytest.raises(ValueError, match=says.replace("[", r"\[")):
        tool_mode(tools, choice)


def test_a_call_object_becomes_tool_calls():
    message, finish = tool_call_message('{"name": "get_weather", "arguments": {"city": "Paris"}}', FinishReason.EOS_TOKEN)
    assert finish == "tool_calls" and message["content"] is None
    (call,) = message["tool_calls"]
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}
    assert call["type"] == "function" and call["id"].startswith("call_")


@pytest.mark.parametrize(("text", "reason", "content", "finish"), [
    ('"Paris is sunny.\\n"', FinishReason.EOS_TOKEN, "Paris is sunny.\n", "stop"),
    ('"Paris is sun', FinishReason.LENGTH, "Paris is sun", "length"),
    ('"caf\\u00', FinishReason.LENGTH, "caf", "length"),  # an escape cut in half
    ('{"name": "get_wea', FinishReason.LENGTH, '{"name": "get_wea', "length"),
    ('"Paris', FinishReason.STOP_SEQUENCE, "Paris", "stop"),
])
def test_text_answers_and_cut_replies_become_content(text, reason, content, finish):
    assert tool_call_message(text, reason) == ({"role": "assistant", "content": content}, finish)


def test_tool_prompt_joins_the_system_message_or_leads():
    assert with_tool_prompt([{"role": "user", "content": "x"}], "P")[0] == {"role": "system", "content": "P"}
    joined = with_tool_prompt([{"role": "system", "content": "Be brief."}, {"role": "user", "content": "x"}], "P")
    assert joined[0] == {"role": "system", "content": "Be brief.\n\nP"} and len(joined) == 2
    for empty in ("", None):  # an empty system message: the tool prompt alone, no blank lines before it
        assert with_tool_prompt([{"role": "developer", "content": empty}], "P") == [{"role": "developer",
                                                                                      "content": "P"}]
