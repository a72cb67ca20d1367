"""Structured output over a real socket: `response_format` on the native API (LoRAX spelling, httpx) and the
OpenAI API (the official SDK); the generated text must parse as JSON and follow the schema."""

from __future__ import annotations

import json

import httpx
import jsonschema
import openai
import pytest

PERSON = {
    "type": "object",
    "properties": {"name": {"type": "string", "maxLength": 12}, "age": {"type": "integer", "minimum": 0,
                                                                         "maximum": 120}},
    "required": ["name", "age"],
    "additionalProperties": False,
}
PROMPT = "User: give me a JSON record for Alice, who is 31.\nAssistant:"
MESSAGES = [{"role": "user", "content": "Give me a JSON record for Alice, who is 31."}]


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def valid(text: str, schema: dict) -> dict:
    doc = json.loads(text)
    jsonschema.validate(doc, schema)
    return doc


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.mark.parametrize("adapter", [None, "qv8"])
def test_native_generate_with_lorax_json_object_and_schema(server, adapter):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 48, "details": True, "adapter_id": adapter,
        "response_format": {"type": "json_object", "schema": PERSON}}})
    assert r.status_code == 200, r.text
    body = r.json()
    valid(body["generated_text"], PERSON)
    assert body["details"]["finish_reason"] == "eos_token"


def test_native_stream_with_json_schema(server):
    r = post(server, "/generate_stream", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 48, "do_sample": True, "seed": 4, "response_format": {"type": "json_schema", "schema": PERSON}}})
    assert r.status_code == 200, r.text
    events = [json.loads(line[5:]) for line in r.text.splitlines() if line.startswith("data:")]
    text = "".join(e["token"]["text"] for e in events)
    assert events[-1]["generated_text"] == text
    valid(text, PERSON)


def test_openai_chat_with_json_schema(client):
    chat = client.chat.completions.create(
        model="", messages=MESSAGES, temperature=0, max_tokens=48,
        response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON, "strict": True}})
    choice = chat.choices[0]
    assert choice.finish_reason == "stop"
    valid(choice.message.content, PERSON)


def test_openai_completion_on_an_adapter(client):
    # The SDK's completions call has no response_format parameter: extra_body is how its users send one.
    r = client.completions.create(model="all16", prompt=PROMPT, max_tokens=48, temperature=0.7, seed=1, extra_body={
        "response_format": {"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}}})
    assert r.choices[0].finish_reason == "stop"
    valid(r.choices[0].text, PERSON)


@pytest.mark.parametrize("response_format, message", [
    ({"type": "json_schema", "json_schema": {"name": "x"}}, "needs a schema"),
    ({"type": "json_object", "schema": {"type": "nope"}}, "Invalid type: nope"),
])
def test_bad_response_format_is_422(server, response_format, message):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"response_format": response_format}})
    assert r.status_code == 422, r.text
    assert r.json()["error_type"] == "validation" and message in r.json()["error"]
    r = post(server, "/v1/chat/completions", {"model": "", "messages": MESSAGES, "response_format": response_format})
    assert r.status_code == 422 and message in r.text
