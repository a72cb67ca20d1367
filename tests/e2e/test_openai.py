"""The OpenAI API through the official `openai` SDK over a real socket."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

from loraplex import SamplingParams
from loraplex.server.protocol import MAX_N

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
    with pytest.raises(openai.UnprocessableEntityError, match="n: Input should be less than or equal to 16"):
        client.chat.completions.create(model="", messages=MESSAGES, n=MAX_N + 1, max_tokens=1)
    assert client.chat.completions.create(model="", messages=MESSAGES, n=MAX_N, max_tokens=1).choices[-1].index == 15


def test_error_body_is_openais_object_with_error_type(server):
    r = httpx.post(server.url + "/v1/chat/completions", json={"model": "", "messages": MESSAGES, "temperature": 5})
    assert r.status_code == 422
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert body["error"]["type"] == "validation" and body["error"]["code"] == 422
    assert "temperature" in body["error"]["message"]


def test_unknown_fields_are_refused_and_sdk_fields_ignored(client):
    with pytest.raises(openai.UnprocessableEntityError, match="adapter: Extra inputs are not permitted"):
        client.chat.completions.create(model="", messages=MESSAGES, max_tokens=4, extra_body={"adapter": "qv8"})
    with pytest.raises(openai.UnprocessableEntityError, match="promt"):
        client.completions.create(model="", prompt="x", max_tokens=4, extra_body={"promt": "y"})
    # What the SDK and agent frameworks send without us implementing it: accepted and ignored.
    ignored = {"user": "u-1", "metadata": {"k": "v"}, "store": False, "parallel_tool_calls": False,
               "service_tier": "auto", "logit_bias": {}}
    plain = client.chat.completions.create(model="", messages=MESSAGES, temperature=0, max_tokens=6)
    extra = client.chat.completions.create(model="", messages=MESSAGES, temperature=0, max_tokens=6, **ignored)
    assert extra.choices[0].message.content == plain.choices[0].message.content


def test_max_tokens_policy_is_bounded_by_the_limit(client, server):
    limit = server.state.engine.engine.max_model_len  # no --max-total-tokens on this server
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.UnprocessableEntityError, match=f"prompt \\+ {field} must be <= {limit}") as e:
            client.chat.completions.create(model="", messages=MESSAGES, **{field: 1_000_000_000})
        assert f"{field} is 1000000000" in str(e.value)
    with pytest.raises(openai.UnprocessableEntityError, match=f"prompt \\+ max_tokens must be <= {limit}"):
        client.completions.create(model="", prompt="x", max_tokens=limit)
    r = httpx.post(server.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": 1_000_000_000}})
    assert r.status_code == 422 and f"prompt + max_new_tokens must be <= {limit}" in r.json()["error"]


def test_seed_zero_is_a_seed(client):
    def sample(seed: int | None, n: int = 1) -> list[str]:
        r = client.completions.create(model="", prompt="Once upon a time", max_tokens=12, temperature=1.0, seed=seed,
                                      n=n)
        return [c.text for c in r.choices]

    assert sample(0) == sample(0)
    assert sample(0, n=3) == sample(0, n=3)
    assert sample(0) != sample(1)  # a seed of 0 draws as its own seed, not as "none given"


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


def test_tool_call_round_trip_goes_through_the_template(client, server):
    # The standard round trip: the assistant's call comes back with null content, then the tool's result.
    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather",
                                                             "arguments": '{"city": "Paris", "unit": "celsius"}'}}
    messages = [{"role": "user", "content": "What is the weather in Paris?"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "22 degrees, sunny"},
                {"role": "user"}]  # a message without content renders as ""
    reply = client.chat.completions.create(model="", messages=messages, temperature=0, max_tokens=8)
    assert reply.choices[0].message.content and reply.choices[0].finish_reason in ("stop", "length")
    # The prompt is the documented text form (Hermes) of the same conversation, through the template.
    tokenizer = server.state.generation.tokenizer
    text = [{"role": "user", "content": "What is the weather in Paris?"},
            {"role": "assistant", "content": '<tool_call>\n{"name": "get_weather", "arguments": '
                                             '{"city": "Paris", "unit": "celsius"}}\n</tool_call>'},
            {"role": "user", "content": '<tool_response>\n{"name": "get_weather", "content": "22 degrees, sunny"}'
                                        '\n</tool_response>'},
            {"role": "user", "content": ""}]
    want = tokenizer.apply_chat_template(text, add_generation_prompt=True, tokenize=False)
    assert reply.usage.prompt_tokens == len(tokenizer(want, add_special_tokens=False).input_ids)
    # The same conversation with the tools still offered: the next reply may answer or call again.
    again = client.chat.completions.create(model="", messages=messages, tools=[WEATHER], temperature=0,
                                           max_tokens=40)
    _assert_valid_tool_reply(again.choices[0], {"get_weather": WEATHER})


def _assert_valid_tool_reply(choice, tools: dict) -> None:
    """Either text (finish stop or length) or well-formed calls whose arguments follow the tool's schema."""
    message = choice.message
    if message.tool_calls:
        assert choice.finish_reason == "tool_calls" and message.content is None
        for call in message.tool_calls:
            assert call.type == "function" and call.function.name in tools
            jsonschema.validate(json.loads(call.function.arguments), tools[call.function.name]["function"]["parameters"])
    else:
        assert isinstance(message.content, str) and choice.finish_reason in ("stop", "length")
        assert choice.finish_reason == "length" or not message.content.startswith('"')


@pytest.mark.parametrize("tool_choice", [None, "auto"])
def test_tool_choice_auto_answers_in_text_or_calls_a_tool(client, tool_choice):
    tools = {"get_weather": WEATHER, "get_time": TIME}
    ask = [{"role": "user", "content": "What is the weather in Paris? Use the tool."}]
    extra = {} if tool_choice is None else {"tool_choice": tool_choice}
    r = client.chat.completions.create(model="", messages=ask, tools=list(tools.values()), temperature=0.9, seed=5,
                                       n=6, max_tokens=40, **extra)
    assert len(r.choices) == 6
    for choice in r.choices:
        _assert_valid_tool_reply(choice, tools)


def test_the_sdks_own_reply_message_goes_back_in_the_conversation(client):
    # What agent loops do: append the SDK's message object as it came, then one result per call.
    ask = [{"role": "user", "content": "What is the weather in Paris?"}]
    first = client.chat.completions.create(model="", messages=ask, tools=[WEATHER], tool_choice="required",
                                           temperature=0, max_tokens=40)
    message = first.choices[0].message
    results = [{"role": "tool", "tool_call_id": c.id, "content": "22 degrees"} for c in message.tool_calls]
    final = client.chat.completions.create(model="", messages=[*ask, message, *results], tools=[WEATHER],
                                           temperature=0, max_tokens=30)
    _assert_valid_tool_reply(final.choices[0], {"get_weather": WEATHER})
    assert final.usage.prompt_tokens > first.usage.prompt_tokens + first.usage.completion_tokens


def test_chat_logprobs_in_openais_shape_streamed_or_not(client):
    kwargs = {"model": "qv8", "messages": MESSAGES, "temperature": 0, "max_tokens": 6, "logprobs": True,
              "top_logprobs": 3}
    whole = client.chat.completions.create(**kwargs)
    content = whole.choices[0].logprobs.content
    assert len(content) == whole.usage.completion_tokens
    assert "".join(t.token for t in content) == whole.choices[0].message.content
    for t in content:
        assert t.bytes == list(t.token.encode()) and t.logprob <= 0
        assert len(t.top_logprobs) == 3 and all(x.bytes == list(x.token.encode()) for x in t.top_logprobs)
        assert [x.logprob for x in t.top_logprobs] == sorted((x.logprob for x in t.top_logprobs), reverse=True)
        assert (t.top_logprobs[0].token, t.top_logprobs[0].logprob) == (t.token, t.logprob)  # greedy: the top one
    chunks = list(client.chat.completions.create(**kwargs, stream=True))
    streamed = [t for c in chunks if c.choices and c.choices[0].logprobs for t in c.choices[0].logprobs.content]
    # The same tokens and numbers (to float rounding: the prompt's KV may come from the prefix cache the second time).
    assert [(t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in streamed] == [
        (t.token, t.bytes, [x.token for x in t.top_logprobs]) for t in content]
    assert [[t.logprob] + [x.logprob for x in t.top_logprobs] for t in streamed] == [
        pytest.approx([t.logprob] + [x.logprob for x in t.top_logprobs], abs=1e-4) for t in content]


def test_a_streamed_chat_opens_every_choice_with_its_index_and_role(client):
    chunks = list(client.chat.completions.create(model="", messages=MESSAGES, temperature=0.7, seed=1, n=2,
                                                 max_tokens=4, stream=True))
    openers = [c.choices[0] for c in chunks[:2]]
    assert [(o.index, o.delta.role, o.delta.content) for o in openers] == [(0, "assistant", ""), (1, "assistant", "")]
    assert {c.choices[0].index for c in chunks[2:] if c.choices} == {0, 1}


def test_completion_logprobs_offsets_and_stream(client):
    kwargs = {"model": "", "prompt": "The capital of France is", "max_tokens": 5, "temperature": 0, "logprobs": 2}
    whole = client.completions.create(**kwargs).choices[0]
    lp = whole.logprobs
    assert "".join(lp.tokens) == whole.text
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(len(lp.tokens))]
    assert all(top[tok] == value for tok, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs,
                                                              strict=True))  # greedy: the chosen token is listed
    chunks = [c.choices[0] for c in client.completions.create(**kwargs, stream=True) if c.choices]
    assert [c.logprobs.tokens[0] for c in chunks] == lp.tokens
    assert [c.logprobs.token_logprobs[0] for c in chunks] == pytest.approx(lp.token_logprobs, abs=1e-4)
    assert [c.logprobs.top_logprobs[0] for c in chunks] == [pytest.approx(top, abs=1e-4) for top in lp.top_logprobs]


def test_openai_penalties_and_ignore_eos_reach_the_engine(client, offline):
    prompt = "1, 2, 3, 4,"
    base = {"max_new_tokens": 16, "temperature": 0.0}
    got = client.completions.create(model="", prompt=prompt, max_tokens=16, temperature=0,
                                    frequency_penalty=1.5).choices[0].text
    want = offline.generate(prompt, SamplingParams(**base, frequency_penalty=1.5))[0].text
    assert got == want != offline.generate(prompt, SamplingParams(**base))[0].text
    short = "The capital of France is"
    stopped = client.completions.create(model="", prompt=short, max_tokens=64, temperature=0)
    assert stopped.choices[0].finish_reason == "stop"  # the model ends this answer itself
    ignored = client.completions.create(model="", prompt=short, max_tokens=64, temperature=0,
                                        extra_body={"ignore_eos": True})
    assert ignored.choices[0].finish_reason == "length" and ignored.usage.completion_tokens == 64
    with pytest.raises(openai.UnprocessableEntityError, match="logit_bias is not supported"):
        client.completions.create(model="", prompt=short, max_tokens=4, logit_bias={"15": 5})
