"""The OpenAI API through the official `openai` SDK over a real socket."""

from __future__ import annotations

import json

import openai
import pytest

from loraplex import SamplingParams

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_models_lists_base_and_adapters(client, server):
    ids = [m.id for m in client.models.list()]
    assert ids[0] == server.state.model_id
    assert {"qv8", "all16"} <= set(ids)


@pytest.mark.parametrize("model", ["", "qv8"])
def test_chat_equals_offline_engine(client, server, offline, model):
    chat = client.chat.completions.create(model=model, messages=MESSAGES, temperature=0, max_tokens=16)
    adapter = str(server.adapters[model]) if model else None
    want = offline.chat(MESSAGES, SamplingParams(max_new_tokens=16, temperature=0), adapter_id=adapter)[0]
    choice = chat.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == want.text
    assert chat.usage.prompt_tokens == len(want.prompt_token_ids)
    assert chat.usage.completion_tokens == len(want.token_ids)
    assert choice.finish_reason == ("length" if want.finish_reason == "length" else "stop")
    if model == "":
        assert "Paris" in choice.message.content


def test_chat_stream_with_usage_equals_non_stream(client):
    whole = client.chat.completions.create(model="all16", messages=MESSAGES, temperature=0, max_tokens=12)
    chunks = list(client.chat.completions.create(model="all16", messages=MESSAGES, temperature=0, max_tokens=12,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finals = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finals == [whole.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == whole.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == whole.usage.prompt_tokens


def test_completions_n_logprobs_echo_stop(client, server):
    r = client.completions.create(model="qv8", prompt=["The capital of France is", "1, 2, 3,"], max_tokens=6,
                                  temperature=0, n=2, logprobs=2, echo=True)
    assert [c.index for c in r.choices] == [0, 1, 2, 3]
    assert r.choices[0].text == r.choices[1].text  # greedy: both samples agree
    assert r.choices[0].text.startswith("The capital of France is")
    lp = r.choices[2].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == 6 and all(len(t) <= 2 for t in lp.top_logprobs)
    stopped = client.completions.create(model="", prompt="1, 2, 3, 4,", max_tokens=20, temperature=0, stop=[" 7"])
    assert stopped.choices[0].finish_reason == "stop" and " 7" not in stopped.choices[0].text


def test_completions_seeded_sampling_is_reproducible(client):
    a = client.completions.create(model="", prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=3)
    b = client.completions.create(model="", prompt="Once upon a time", max_tokens=10, temperature=0.8, seed=3)
    assert a.choices[0].text == b.choices[0].text


def test_completion_stream(client, server):
    chunks = list(client.completions.create(model="all16", prompt="The capital of France is", max_tokens=8,
                                            temperature=0, stream=True))
    whole = client.completions.create(model="all16", prompt="The capital of France is", max_tokens=8, temperature=0)
    assert "".join(c.choices[0].text for c in chunks) == whole.choices[0].text


def test_errors_surface_as_openai_exceptions(client):
    with pytest.raises(openai.NotFoundError, match="nope"):
        client.chat.completions.create(model="nope", messages=MESSAGES, max_tokens=4)
    with pytest.raises(openai.UnprocessableEntityError, match="temperature"):
        client.chat.completions.create(model="", messages=MESSAGES, temperature=5)
    with pytest.raises(openai.UnprocessableEntityError, match="auto"):
        client.chat.completions.create(model="", messages=MESSAGES, tools=[
            {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}])


WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "Current weather in a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"},
                                                           "unit": {"enum": ["celsius", "fahrenheit"]}},
                          "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"timezone": {"type": "string"}}, "required": ["timezone"]}}}


@pytest.mark.parametrize("model", ["", "qv8"])
def test_tool_calls(client, model):
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    named = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER, TIME], temperature=0,
                                           max_tokens=60, tool_choice={"type": "function",
                                                                       "function": {"name": "get_weather"}})
    choice = named.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id.startswith("call_")
    arguments = json.loads(call.function.arguments)
    assert set(arguments) == {"city", "unit"} and isinstance(arguments["city"], str)
    assert arguments["unit"] in ("celsius", "fahrenheit")
    required = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER, TIME], temperature=0,
                                              max_tokens=60, tool_choice="required")
    assert required.choices[0].message.tool_calls[0].function.name in ("get_weather", "get_time")
    plain = client.chat.completions.create(model=model, messages=ask, tools=[WEATHER], tool_choice="none",
                                           temperature=0, max_tokens=8)
    assert plain.choices[0].message.tool_calls is None and plain.choices[0].message.content
    with pytest.raises(openai.UnprocessableEntityError, match="not among the tools"):
        client.chat.completions.create(model=model, messages=ask, tools=[WEATHER],
                                       tool_choice={"type": "function", "function": {"name": "nope"}})
