"""The adapter admin API over a real socket: token guard, preloading, load / pin / unpin / unload, listing."""

from __future__ import annotations

import json

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

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
        assert r.status_code == 401 and r.json() == {
            "error": "the adapter admin API needs `Authorization: Bearer <admin token>`", "error_type": "unauthorized"}
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
    unpinned = call(admin_server, "POST", "/v1/adapters/unpin", adapter_id="nope")
    assert unpinned.status_code == 404 and unpinned.json()["error"] == "adapter 'nope' is not loaded"
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
                entry = listing(admin_server)["all16"]  # on its slot still, no longer in host memory
                assert (entry["tiers"], entry["size_bytes"]) == (["device"], None) and entry["slot"] is not None
    assert removed == {"adapter_id": "all16", "removed_from": ["host"]}
    assert "".join(streamed) == alone
    assert len(streamed) == 24
    again = call(admin_server, "POST", "/v1/adapters/unload", adapter_id="all16").json()
    assert again["removed_from"] == ["device"]  # idle now: the slot goes


def test_the_inference_gateways_dynamic_lora_routes(admin_server):
    # vLLM's routes, as the Gateway API Inference Extension's adapter syncer calls them: the same admin
    # token, vLLM's plain-text answers, and the adapter then reported in the gateway's LoRA metric.
    assert call(admin_server, "POST", "/v1/load_lora_adapter", token=None, lora_name="all16").status_code == 401
    r = call(admin_server, "POST", "/v1/load_lora_adapter", lora_name="all16", lora_path="all16")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all16' added successfully."
    assert "device" in listing(admin_server)["all16"]["tiers"]
    alias = call(admin_server, "POST", "/v1/load_lora_adapter", lora_name="my-alias", lora_path="all16")
    assert alias.status_code == 422 and alias.json()["error"]["message"] == (  # OpenAI's shape, as vLLM's
        "lora_path must equal lora_name: loraplex serves an adapter under its own id (a name under --adapter-root, "
        "a Hub id, or an s3:// URL), which is also the `model` clients send; it has no aliases")
    assert call(admin_server, "POST", "/v1/load_lora_adapter", lora_name="nope").status_code == 404
    body = {"model": "all16", "prompt": "Hello", "max_tokens": 3}
    assert httpx.post(admin_server.url + "/v1/completions", json=body, timeout=120).status_code == 200
    metrics = httpx.get(admin_server.url + "/metrics", timeout=30).text
    (info,) = next(f for f in text_string_to_metric_families(metrics) if f.name == "vllm:lora_requests_info").samples
    assert info.labels == {"running_lora_adapters": "", "waiting_lora_adapters": "", "max_lora": "2"}
    r = call(admin_server, "POST", "/v1/unload_lora_adapter", lora_name="all16")
    assert r.status_code == 200 and r.text == "Success: LoRA adapter 'all16' removed successfully."
    assert "all16" not in listing(admin_server)
    assert call(admin_server, "POST", "/v1/unload_lora_adapter", lora_name="all16").status_code == 404
