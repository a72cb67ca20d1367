"""The adapter admin API over a real socket: token guard, preloading, load / pin / unpin / unload, listing."""

from __future__ import annotations

import json

import httpx
import pytest

from loraplex.config import ServerConfig
from tests.e2e.conftest import start_server

TOKEN = "s3cret-admin"


@pytest.fixture(scope="module")
def admin_server(demo_adapters):
    thread, srv = start_server(demo_adapters, ServerConfig(admin_token=TOKEN, preloaded_adapter_ids=("qv8",)),
                               max_loras=2)
    try:
        yield srv
    finally:
        thread.stop()


def call(srv, method: str, path: str, token: str | None = TOKEN, **body) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    return httpx.request(method, srv.url + path, json=body or None, headers=headers, timeout=120)


def listing(srv) -> dict[str, dict]:
    return {a["adapter_id"]: a for a in call(srv, "GET", "/v1/adapters").json()["adapters"]}


def test_admin_needs_the_token(admin_server):
    for token in (None, "wrong"):
        r = call(admin_server, "GET", "/v1/adapters", token=token)
        assert r.status_code == 401 and r.json()["error_type"] == "unauthorized"
        assert call(admin_server, "POST", "/v1/adapters/pin", token=token, adapter_id="all16").status_code == 401


def test_preloaded_adapter_is_resident_and_serves(admin_server):
    entry = listing(admin_server)["qv8"]
    assert "device" in entry["tiers"] and "host" in entry["tiers"] and entry["size_bytes"] > 0
    r = httpx.post(admin_server.url + "/generate", timeout=120,
                   json={"inputs": "Hello", "parameters": {"adapter_id": "qv8", "max_new_tokens": 3}})
    assert r.status_code == 200


def test_load_pin_unpin_unload(admin_server):
    loaded = call(admin_server, "POST", "/v1/adapters/load", adapter_id="all16").json()
    assert loaded["tiers"] == ["device", "host"] and loaded["pinned"] is False
    pinned = call(admin_server, "POST", "/v1/adapters/pin", adapter_id="all16").json()
    assert pinned["pinned"] is True and pinned["slot"] == loaded["slot"]
    assert listing(admin_server)["all16"]["pinned"] is True
    refused = call(admin_server, "POST", "/v1/adapters/unload", adapter_id="all16")
    assert refused.status_code == 422 and "pinned" in refused.json()["error"]
    assert call(admin_server, "POST", "/v1/adapters/unpin", adapter_id="all16").json() == {
        "adapter_id": "all16", "pinned": False}
    removed = call(admin_server, "POST", "/v1/adapters/unload", adapter_id="all16").json()
    assert sorted(removed["removed_from"]) == ["device", "host"]
    assert "all16" not in listing(admin_server)
    # Unloaded is not forbidden: the next request loads it again.
    r = httpx.post(admin_server.url + "/generate", timeout=120,
                   json={"inputs": "Hello", "parameters": {"adapter_id": "all16", "max_new_tokens": 3}})
    assert r.status_code == 200 and "all16" in listing(admin_server)


def test_unknown_adapters(admin_server):
    r = call(admin_server, "POST", "/v1/adapters/load", adapter_id="nope")
    assert r.status_code == 404 and "nope" in r.json()["error"]
    assert call(admin_server, "POST", "/v1/adapters/unpin", adapter_id="nope").status_code == 404
    bad = call(admin_server, "POST", "/v1/adapters/load", adapter_id="../etc")  # the check every client id passes
    assert bad.status_code == 422 and "'..'" in bad.json()["error"]


def test_unload_leaves_the_slot_of_a_running_request(admin_server):
    # The slot a running request holds is never freed under it: the unload drops the host copy only,
    # and the stream finishes with exactly the tokens it gets alone.
    body = {"inputs": "Write a long story about a cat.",
            "parameters": {"adapter_id": "all16", "max_new_tokens": 24, "ignore_eos_token": True}}
    alone = httpx.post(admin_server.url + "/generate", json=body, timeout=120).json()["generated_text"]
    streamed, removed = [], None
    with httpx.stream("POST", admin_server.url + "/generate_stream", json=body, timeout=120) as r:
        for line in r.iter_lines():
            if not line.startswith("data:"):
                continue
            event = json.loads(line[5:])
            assert "error" not in event, event
            streamed.append(event["token"]["text"])
            if removed is None:  # the request is running on its slot now
                removed = call(admin_server, "POST", "/v1/adapters/unload", adapter_id="all16").json()
    assert removed == {"adapter_id": "all16", "removed_from": ["host"]}
    assert "".join(streamed) == alone
    assert len(streamed) == 24
    again = call(admin_server, "POST", "/v1/adapters/unload", adapter_id="all16").json()
    assert again["removed_from"] == ["device"]  # idle now: the slot goes
