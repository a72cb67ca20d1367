"""Over a real socket: hostile requests fail alone (4xx/424 with a JSON body) while a good stream beside
them gets exactly the tokens it gets alone, and no response carries a non-finite number."""

from __future__ import annotations

import asyncio
import json
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from loraplex import SamplingParams
from loraplex.adapters.ref import AdapterRef
from tests.e2e.test_lifecycle import wait_idle

PROMPT = "Write a long story about a dragon."
GOOD_TOKENS = 40


def _strict_json(text: str) -> Any:
    """json.loads that refuses NaN and Infinity, as every JSON parser but Python's does."""
    def refuse(name: str) -> Any:
        raise ValueError(f"invalid JSON number {name}")
    return json.loads(text, parse_constant=refuse)


@pytest.fixture
def faulty_local_source(server) -> Iterator[None]:
    """The server's local source raises a RuntimeError (no AdapterError: a bug, or a library's own error)
    for ids starting with "boom", as the path handling did for ids with a NUL or 5,000 characters."""
    source = server.state.engine.engine.adapters._sources["local"]
    resolve = source.resolve

    def faulty(ref: AdapterRef, token: str | None) -> Any:
        if ref.id.startswith("boom"):
            raise RuntimeError("an unexpected error in a source")
        return resolve(ref, token)

    source.resolve = faulty
    yield
    source.resolve = resolve


def _hostile_bodies() -> list[tuple[str, dict[str, Any]]]:
    native = [{"adapter_id": "x\u0000y"}, {"adapter_id": "a" * 5000}, {"adapter_id": "boom-1"},
              {"merged_adapters": {"ids": ["qv8", "y\u0000z"], "weights": [0.5, 0.5]}},
              {"merged_adapters": {"ids": ["qv8", "boom-2"], "weights": [0.5, 0.5]}}]
    openai = [{"model": "x\u0000y"}, {"model": "b" * 5000}, {"model": "boom-3"}]
    bodies = [("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, **p}}) for p in native]
    bodies += [("/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, **p}}) for p in native]
    bodies += [("/v1/completions", {"prompt": PROMPT, "max_tokens": 3, **p}) for p in openai]
    return bodies * 3  # 39 hostile requests: once 3 failing steps in a row stopped the engine for good


def test_hostile_requests_fail_alone_beside_a_good_stream(server, offline, faulty_local_source):
    failures_before = server.state.engine.num_step_failures
    good = {"inputs": PROMPT, "parameters": {"max_new_tokens": GOOD_TOKENS, "ignore_eos_token": True,
                                             "adapter_id": "qv8"}}

    async def stream(client: httpx.AsyncClient, started: asyncio.Event) -> list[dict[str, Any]]:
        events = []
        async with client.stream("POST", server.url + "/generate_stream", json=good) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    events.append(_strict_json(line[5:]))
                    started.set()
        return events

    async def hostile(client: httpx.AsyncClient, path: str, body: dict[str, Any]) -> tuple[int, Any]:
        r = await client.post(server.url + path, json=body)
        return r.status_code, _strict_json(r.text)

    async def run() -> tuple[list[dict[str, Any]], list[tuple[int, Any]]]:
        async with httpx.AsyncClient(timeout=60, limits=httpx.Limits(max_connections=64)) as client:
            started = asyncio.Event()
            good_task = asyncio.create_task(stream(client, started))
            await asyncio.wait_for(started.wait(), 60)
            answers = await asyncio.gather(*(hostile(client, path, body) for path, body in _hostile_bodies()))
            events = await good_task
        await wait_idle(server)
        return events, list(answers)

    events, answers = asyncio.run(run())

    for status, body in answers:
        assert 400 <= status < 500, (status, body)  # refused (422) or the adapter could not load (424, 404)
        error = body["error"]
        assert isinstance(error, str | dict) and error
    assert "error" not in events[-1], events[-1]
    want = offline.generate(PROMPT, SamplingParams(max_new_tokens=GOOD_TOKENS, temperature=0, ignore_eos=True),
                            adapter_id=str(server.adapters["qv8"]))[0]
    assert [e["token"]["id"] for e in events] == want.token_ids
    assert events[-1]["generated_text"] == want.text
    assert server.state.engine.num_step_failures == failures_before
    assert httpx.get(server.url + "/health").status_code == 200
    assert httpx.get(server.url + "/ready").status_code == 200


@pytest.fixture
def huge_alpha_adapter(server) -> Iterator[str]:
    """A copy of qv8 with lora_alpha 1e308 (finite in JSON, inf in float32), under the server's adapter root."""
    folder = server.adapters["qv8"].parent / "alpha-1e308"
    shutil.copytree(server.adapters["qv8"], folder)
    config = json.loads((folder / "adapter_config.json").read_text())
    (folder / "adapter_config.json").write_text(json.dumps({**config, "lora_alpha": 1e308}))
    try:
        yield folder.name
    finally:
        shutil.rmtree(folder)


def test_an_adapter_whose_alpha_overflows_is_refused_with_424(server, huge_alpha_adapter: Path):
    # It used to load: streams carried "logprob": NaN (invalid JSON) and /generate answered empty text.
    params = {"max_new_tokens": 4, "adapter_id": huge_alpha_adapter, "details": True}
    for path in ("/generate", "/generate_stream"):
        r = httpx.post(server.url + path, json={"inputs": PROMPT, "parameters": params}, timeout=60)
        assert r.status_code == 424, r.text
        body = _strict_json(r.text)
        assert body["error_type"] == "adapter_load" and "lora_alpha" in body["error"]
    r = httpx.post(server.url + "/v1/completions", json={"prompt": PROMPT, "max_tokens": 4, "model": huge_alpha_adapter},
                   timeout=60)
    assert r.status_code == 424 and "lora_alpha" in _strict_json(r.text)["error"]["message"]


def _merged(weights: str) -> str:
    # Written by hand: NaN is no JSON, but Python's parser (and so the server's) accepts it.
    body = json.dumps({"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "merged_adapters": {
        "ids": ["qv8", "qv8"], "weights": "WEIGHTS"}}})
    return body.replace('"WEIGHTS"', weights)


@pytest.mark.parametrize(("weights", "status"), [("[NaN, 1]", 422), ("[Infinity, 1]", 422), ("[1e308, 1e308]", 424)])
def test_merge_weights_that_are_not_finite_or_overflow_are_refused(server, weights: str, status: int):
    # Both answered 200 with empty text and spent a device slot.
    lora = server.state.engine.engine.lora
    loads = lora.loads
    r = httpx.post(server.url + "/generate", content=_merged(weights), timeout=60,
                   headers={"content-type": "application/json"})
    assert r.status_code == status, r.text
    assert _strict_json(r.text)["error"]
    assert lora.loads == loads  # no slot was loaded with it
