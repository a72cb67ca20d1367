"""One max-tokens policy for both APIs, bounded by --max-total-tokens, on a server that sets it (real socket)."""

from __future__ import annotations

from collections.abc import Iterator

import httpx
import openai
import pytest

from loraplex.config import ServerConfig
from tests.e2e.conftest import RunningServer, start_server

LIMIT = 48
MESSAGES = [{"role": "user", "content": "Count to one hundred."}]


@pytest.fixture(scope="module")
def limited(demo_adapters) -> Iterator[RunningServer]:
    thread, running = start_server(demo_adapters, ServerConfig(), max_total_tokens=LIMIT)
    try:
        yield running
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def small_kv(demo_adapters) -> Iterator[RunningServer]:
    """No --max-total-tokens, and a KV cache of 4 blocks of 16 tokens: far less than the model's length."""
    thread, running = start_server(demo_adapters, ServerConfig(), num_blocks=4, block_size=16)
    try:
        yield running
    finally:
        thread.stop()


@pytest.fixture(scope="module")
def client(limited) -> openai.OpenAI:
    return openai.OpenAI(base_url=limited.url + "/v1", api_key="unused", max_retries=0, timeout=120)


def test_over_the_limit_is_422_naming_the_numbers_in_both_apis(client, limited):
    prompt = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=1).usage.prompt_tokens
    room = LIMIT - prompt
    for field in ("max_tokens", "max_completion_tokens"):
        with pytest.raises(openai.UnprocessableEntityError) as e:
            client.chat.completions.create(model="", messages=MESSAGES, **{field: room + 1})
        assert (f"prompt + {field} must be <= {LIMIT} tokens: the prompt has {prompt} tokens and {field} is "
                f"{room + 1}") in str(e.value)
    exact = client.chat.completions.create(model="", messages=MESSAGES, max_tokens=room, temperature=0,
                                           extra_body={"ignore_eos": True})
    assert exact.usage.completion_tokens == room
    r = httpx.post(limited.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": LIMIT}}, timeout=120)
    assert r.status_code == 422, r.text
    assert r.json()["error"].startswith(f"prompt + max_new_tokens must be <= {LIMIT} tokens: the prompt has 1 tokens")
    ok = httpx.post(limited.url + "/generate", json={"inputs": "x", "parameters": {"max_new_tokens": LIMIT - 1}},
                    timeout=120)
    assert ok.status_code == 200, ok.text


def test_without_max_tokens_openai_chat_runs_up_to_the_limit(client):
    r = client.chat.completions.create(model="", messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length"
    assert r.usage.total_tokens == LIMIT


def test_a_prompt_that_fills_the_limit_is_422(client, limited):
    long = " ".join(["word"] * LIMIT)
    with pytest.raises(openai.UnprocessableEntityError, match=f"at most {LIMIT - 1} fit"):
        client.completions.create(model="", prompt=long)
    r = httpx.post(limited.url + "/generate", json={"inputs": long}, timeout=120)
    assert r.status_code == 422 and f"at most {LIMIT - 1} fit" in r.json()["error"]


def test_openai_default_fits_the_kv_cache(small_kv):
    # "Up to the limit" must be a request the engine admits: here the KV cache (64 tokens) is the limit.
    small = openai.OpenAI(base_url=small_kv.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    r = small.chat.completions.create(model="", messages=MESSAGES, temperature=0, extra_body={"ignore_eos": True})
    assert r.choices[0].finish_reason == "length" and r.usage.total_tokens == 64
    with pytest.raises(openai.UnprocessableEntityError, match="must be <= 64 tokens"):
        small.chat.completions.create(model="", messages=MESSAGES, max_tokens=64)


def test_info_reports_the_limit_requests_are_held_to(limited, small_kv):
    for running, limit in ((limited, LIMIT), (small_kv, 64)):
        info = httpx.get(running.url + "/info", timeout=30).json()
        assert (info["max_total_tokens"], info["max_input_length"]) == (limit, limit - 1)
