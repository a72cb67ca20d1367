"""No request can hurt another: good streams keep their exact tokens while hostile requests hit the server.

Eight greedy streams (native and OpenAI, base model and the bundled `upper` / `invoice-json` adapters)
are first run one at a time for their reference tokens, then again all together while 50 hostile
requests arrive at once: NUL and 5,000-character adapter ids, merges with NUL ids and NaN / 1e308
weights, a billion max tokens, path spellings of one adapter, paths outside the roots, unknown ids,
misspelled parameters, out-of-vocabulary token ids and the fuzzer's worst bodies. Every good stream must
end normally with exactly its reference tokens; every hostile request must get its answer (a 4xx for a
bad request; never a 5xx, never a hang); afterwards /health is 200, /metrics has not grown with the
hostile ids, and one adapter folder is one adapter however it is spelled.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplex.examples import ADAPTERS_DIR
from tests.e2e.conftest import RunningServer
from tests.e2e.hardened import error_problems, hardened_server, sse_payloads, strict_json

GOOD_TOKENS = 16
HOSTILE_TIMEOUT_S = 30.0
METRICS_GROWTH_LIMIT = 16_384
"""Bytes /metrics may grow by over the hostile burst: a handful of bounded label sets, never one set per
hostile id (on main 20 unknown ids and two 5,000-character ids add ~50 KB)."""
UPPER = str(ADAPTERS_DIR / "upper")


@dataclass(frozen=True)
class Good:
    name: str
    path: str
    body: dict[str, Any]


@dataclass(frozen=True)
class Hostile:
    name: str
    path: str
    body: Any
    """A JSON value (sent with NaN allowed, as Python writes it) or raw bytes."""
    client_error: bool = True
    """True: must be answered with a 4xx. False: any answer but a 5xx (a request that a fix may serve)."""


def good_requests() -> list[Good]:
    def native(adapter: str | None) -> dict[str, Any]:
        return {"inputs": "Write one sentence about the sea.", "parameters": {
            "max_new_tokens": GOOD_TOKENS, "ignore_eos_token": True, "adapter_id": adapter}}

    def chat(model: str) -> dict[str, Any]:
        return {"model": model, "messages": [{"role": "user", "content": "Name three colours."}], "stream": True,
                "temperature": 0, "max_tokens": GOOD_TOKENS, "ignore_eos": True}

    def completion(model: str) -> dict[str, Any]:
        return {"model": model, "prompt": "Invoice 17: two chairs at", "stream": True, "temperature": 0,
                "max_tokens": GOOD_TOKENS, "ignore_eos": True}

    return [
        Good("native base", "/generate_stream", native(None)),
        Good("native upper", "/generate_stream", native("upper")),
        Good("native invoice-json", "/generate_stream", native("invoice-json")),
        Good("native compat upper", "/", {**native("upper"), "stream": True}),
        Good("chat upper", "/v1/chat/completions", chat("upper")),
        Good("chat base", "/v1/chat/completions", chat("")),
        Good("completion invoice-json", "/v1/completions", completion("invoice-json")),
        Good("completion base", "/v1/completions", completion("")),
    ]


def hostile_requests(seed: int = 19) -> list[Hostile]:
    rng = random.Random(seed)

    def gen(name: str, **parameters: Any) -> Hostile:
        return Hostile(name, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 4, **parameters}})

    def chat(name: str, client_error: bool = True, **fields: Any) -> Hostile:
        body = {"model": "", "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 4, **fields}
        return Hostile(name, "/v1/chat/completions", body, client_error)

    def spelling(name: str, adapter_id: str) -> Hostile:
        return Hostile(name, "/generate", {"inputs": "Hi", "parameters": {"max_new_tokens": 4, "adapter_id": adapter_id}},
                       client_error=False)

    def merged(name: str, ids: list[str], weights: list[float]) -> Hostile:
        return gen(name, merged_adapters={"ids": ids, "weights": weights})

    tool_call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
    unknown = ["".join(rng.choices("abcdefghijklmnopqrstuvwxyz0123456789-_", k=120)) for _ in range(20)]
    return [
        # F1: ids that the filesystem refuses
        gen("native NUL id", adapter_id="x\u0000y"),
        Hostile("native stream NUL id", "/generate_stream", {"inputs": "Hi", "parameters": {"adapter_id": "x\u0000y"}}),
        chat("chat NUL model", model="x\u0000y"),
        Hostile("completion NUL model", "/v1/completions", {"model": "x\u0000y", "prompt": "Hi", "max_tokens": 4}),
        gen("native 5000-char id", adapter_id="a" * 5000),
        chat("chat 5000-char model", model="b" * 5000),
        # F2: merges naming NUL ids
        merged("merge NUL id", ["upper", "y\u0000z"], [1.0, 1.0]),
        Hostile("merge NUL id stream", "/generate_stream", {"inputs": "Hi", "parameters": {
            "merged_adapters": {"ids": ["y\u0000z", "invoice-json"], "weights": [0.5, 0.5]}}}),
        # F4: weights that are not finite or overflow when combined
        merged("merge NaN weight", ["upper", "invoice-json"], [math.nan, 1.0]),
        merged("merge 1e308 weights", ["upper", "invoice-json"], [1e308, 1e308]),
        merged("merge inf weight", ["upper", "invoice-json"], [math.inf, 1.0]),
        # F5: max tokens far beyond any context
        Hostile("completion 1e9 max_tokens", "/v1/completions", {"model": "", "prompt": "Hi", "max_tokens": 10**9}),
        chat("chat 1e9 max_tokens", max_tokens=10**9),
        gen("native 1e9 max_new_tokens", max_new_tokens=10**9),
        # F3: the OpenAI tool round trip and a message without content (a fix serves these: no 5xx)
        chat("tool round trip", False, tools=tools, messages=[
            {"role": "user", "content": "Weather in Paris?"},
            {"role": "assistant", "content": None, "tool_calls": [tool_call]},
            {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'}]),
        chat("user without content", False, messages=[{"role": "user"}]),
        # F7: spellings of one folder (a fix refuses them or serves the one `upper`)
        spelling("dot-slash upper", "./upper"),
        spelling("upper slash", "upper/"),
        spelling("absolute upper", UPPER),
        # paths outside the adapter roots
        gen("absolute /etc", adapter_id="/etc"),
        gen("absolute /", adapter_id="/"),
        gen("traversal", adapter_id="../../../../etc"),
        chat("absolute tmp model", model=str(Path(os.sep, "tmp"))),
        # F11: ids nobody has (each must not become a metrics label)
        *[gen(f"unknown {i}", adapter_id=u) if i % 2 else chat(f"unknown {i}", model=u) for i, u in enumerate(unknown)],
        # misspelled parameters: the native API refuses unknown fields; OpenAI's may ignore them
        gen("native misspelled adapter", adapter="upper"),
        gen("native misspelled max tokens", max_new_token=4),
        chat("chat misspelled", False, max_token=4),
        # the fuzzer's worst: token ids outside the vocabulary, bodies that are not objects or not JSON
        Hostile("completion token id beyond vocab", "/v1/completions", {"model": "", "prompt": [10**9], "max_tokens": 4}),
        Hostile("completion negative token id", "/v1/completions", {"model": "", "prompt": [-1], "max_tokens": 4}),
        Hostile("body is an array", "/generate", [{"inputs": "Hi"}]),
        Hostile("body is not JSON", "/v1/chat/completions", b'{"model": "", "messages": [{"role": "user", "cont'),
    ]


async def _stream_tokens(client: httpx.AsyncClient, good: Good) -> list[Any]:
    """The tokens of one stream (native: ids; OpenAI: each chunk's text), checking it ended normally."""
    async with client.stream("POST", good.path, json=good.body) as response:
        text = (await response.aread()).decode()
    assert response.status_code == 200, f"{good.name}: {response.status_code} {text[:300]}"
    payloads = sse_payloads(text)
    if good.path.startswith("/v1/"):
        assert payloads[-1] == "[DONE]", f"{good.name} did not end with [DONE]: {payloads[-3:]}"
        events = [strict_json(p) for p in payloads[:-1]]
        assert all("error" not in e for e in events), f"{good.name}: {events[-1]}"
        chunks = [c for e in events for c in e["choices"]]
        assert chunks[-1]["finish_reason"] == "length", f"{good.name}: {chunks[-1]}"
        # chat opens with a role-only chunk; every later chunk (the last too) carries one token's text
        return [c["text"] if "text" in c else c["delta"]["content"] for c in chunks if "role" not in c.get("delta", {})]
    events = [strict_json(p) for p in payloads]
    assert all("error" not in e for e in events), f"{good.name}: {events[-1]}"
    assert events[-1]["generated_text"] is not None, f"{good.name} ended without its final event: {events[-1]}"
    return [e["token"]["id"] for e in events]


async def _hostile(client: httpx.AsyncClient, h: Hostile) -> str | None:
    """What is wrong with the server's answer to `h`, or None."""
    content = h.body if isinstance(h.body, bytes) else json.dumps(h.body, allow_nan=True).encode()
    try:
        response = await client.post(h.path, content=content, headers={"content-type": "application/json"},
                                     timeout=HOSTILE_TIMEOUT_S)
    except httpx.TimeoutException:
        return f"{h.name}: no answer within {HOSTILE_TIMEOUT_S:.0f} s"
    status, text = response.status_code, response.text
    if status >= 500 or (h.client_error and not 400 <= status < 500):
        return f"{h.name}: {status} {text[:300]}"
    problems: list[str] = []
    if response.headers.get("content-type", "").startswith("application/json"):
        try:
            body = strict_json(text)
        except ValueError as e:
            return f"{h.name}: {status} with a body that is not JSON ({e}): {text[:300]}"
        if status >= 400:
            problems = error_problems(h.path, body)
    else:
        for payload in sse_payloads(text):
            if payload != "[DONE]":
                try:
                    event = strict_json(payload)
                except ValueError as e:
                    return f"{h.name}: streamed an event that is not JSON ({e}): {payload[:300]}"
                if "error" in event:
                    problems.append(f"streamed an error: {payload[:300]}")
    return f"{h.name}: {status} {'; '.join(problems)}" if problems else None


async def _run_alone(url: str, goods: list[Good]) -> list[list[Any]]:
    async with httpx.AsyncClient(base_url=url, timeout=120) as client:
        return [await _stream_tokens(client, g) for g in goods]


async def _run_together(url: str, goods: list[Good], hostile: list[Hostile]) -> tuple[list[Any], list[str | None]]:
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=httpx.Limits(max_connections=100)) as client:
        streams = [asyncio.create_task(_stream_tokens(client, g)) for g in goods]
        await asyncio.sleep(0.5)  # the good streams are admitted and generating when the burst lands
        answers = await asyncio.gather(*(_hostile(client, h) for h in hostile))
        together = await asyncio.gather(*streams, return_exceptions=True)
    return together, answers


@pytest.fixture(scope="module")
def iso_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    # Room for the good streams: a chat prompt (~35 tokens) and 16 new ones.
    with hardened_server(tmp_path_factory.mktemp("isolation"), max_model_len=96, max_total_tokens=64) as server:
        yield server


def test_hostile_requests_do_not_change_good_streams(iso_server: RunningServer) -> None:
    goods, hostile = good_requests(), hostile_requests()
    assert len(goods) == 8 and len(hostile) == 50
    alone = asyncio.run(_run_alone(iso_server.url, goods))
    assert all(len(tokens) == GOOD_TOKENS for tokens in alone), [len(t) for t in alone]
    metrics_before = len(httpx.get(iso_server.url + "/metrics").content)

    together, answers = asyncio.run(_run_together(iso_server.url, goods, hostile))

    problems = [f"good stream {g.name}: {t!r:.300}" for g, t, a in zip(goods, together, alone, strict=True)
                if t != a]
    problems += [a for a in answers if a is not None]
    health = httpx.get(iso_server.url + "/health", timeout=10)
    if health.status_code != 200:
        problems.append(f"/health answered {health.status_code}: {health.text[:300]}")
    growth = len(httpx.get(iso_server.url + "/metrics", timeout=10).content) - metrics_before
    if growth > METRICS_GROWTH_LIMIT:
        problems.append(f"/metrics grew by {growth} bytes over the hostile burst")
    listing = httpx.get(iso_server.url + "/v1/adapters", timeout=10).json()["adapters"]
    uppers = [a["adapter_id"] for a in listing
              if a["source"] == "local" and os.path.normpath(os.path.join(ADAPTERS_DIR, a["adapter_id"])) == UPPER]
    if len(uppers) > 1:
        problems.append(f"one folder became {len(uppers)} adapters: {uppers}")
    assert not problems, "\n".join(problems)
