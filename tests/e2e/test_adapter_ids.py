"""Adapter id hygiene over a real socket: one check of every id a client sends (422, fast, nothing else
disturbed), one adapter per folder, confinement to the roots, no host paths in errors, sources off
unless enabled, the bundled examples only in the demo, and bounded metrics labels."""

from __future__ import annotations

import json
import os
import shutil
import threading
import time
from pathlib import Path

import httpx
import pytest

from loraplex.config import ServerConfig
from loraplex.examples import ADAPTERS_DIR
from loraplex.lora.adapter import SAFETENSORS_FILE
from tests.e2e.conftest import start_server

PROMPT = "The capital of France is"
NUL_ID = "x\u0000y"
LONG_ID = "a" * 5000
METRICS_BYTES_BOUND = 64_000  # /metrics of a server that served a handful of adapters


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory, demo_adapters: dict[str, Path]) -> Path:
    """An adapter root: `upper` (a real adapter), `escape` (a symlink to a folder outside the root),
    `borrowed` (a folder whose files link outside), `broken` (unreadable weights)."""
    base = tmp_path_factory.mktemp("ids")
    root, outside = base / "root", base / "outside"
    shutil.copytree(demo_adapters["qv8"], root / "upper")
    shutil.copytree(demo_adapters["all16"], outside / "secret")
    (root / "escape").symlink_to(outside / "secret", target_is_directory=True)
    (root / "borrowed").mkdir()
    for file in (outside / "secret").iterdir():
        (root / "borrowed" / file.name).symlink_to(file)
    shutil.copytree(demo_adapters["qv8"], root / "broken")
    (root / "broken" / SAFETENSORS_FILE).write_bytes(b"\x07" * 300)
    return root


@pytest.fixture(scope="module")
def srv(root: Path):
    os.environ.setdefault("AWS_EC2_METADATA_DISABLED", "true")  # no credential lookup leaves the machine
    thread, running = start_server({"upper": root / "upper"}, ServerConfig(max_concurrent_requests=64),
                                   hub_offline=True, s3_endpoint_url="http://127.0.0.1:9")
    try:
        yield running
    finally:
        thread.stop()


def generate(srv, params: dict, timeout: float = 60) -> httpx.Response:
    return httpx.post(srv.url + "/generate", json={"inputs": PROMPT, "parameters": params}, timeout=timeout)


def stream_tokens(srv, adapter_id: str, max_new_tokens: int) -> list[int]:
    body = {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": max_new_tokens}}
    tokens = []
    with httpx.stream("POST", srv.url + "/generate_stream", json=body, timeout=120) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data:"):
                event = json.loads(line[5:])
                assert "error" not in event, event
                tokens.append(event["token"]["id"])
    return tokens


def bad_requests(adapter_id: str) -> list[tuple[str, dict]]:
    """(path, body) of every entry point that takes an adapter id, each naming `adapter_id`."""
    chat = {"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2}
    return [
        ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2}}),
        ("/generate_stream", {"inputs": PROMPT, "parameters": {"adapter_id": adapter_id, "max_new_tokens": 2}}),
        ("/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 2, "merged_adapters": {
            "ids": ["upper", adapter_id], "weights": [0.5, 0.5]}}}),
        ("/v1/chat/completions", {**chat, "model": adapter_id}),
        ("/v1/completions", {"prompt": PROMPT, "max_tokens": 2, "model": adapter_id}),
        ("/v1/adapters/load", {"adapter_id": adapter_id}),
        ("/v1/adapters/unload", {"adapter_id": adapter_id}),
    ]


def assert_no_host_path(text: str, root: Path) -> None:
    for path in (str(root), str(root.parent), str(ADAPTERS_DIR), "/tmp/", os.path.expanduser("~")):
        assert path not in text, (path, text)


@pytest.mark.parametrize("adapter_id", [NUL_ID, LONG_ID, "../upper", "upper/../../x", "/abs/upper", "a b",
                                        "\u202eupper"])
def test_every_entry_point_refuses_a_bad_id_with_a_fast_422(srv, root, adapter_id):
    for path, body in bad_requests(adapter_id):
        start = time.monotonic()
        r = httpx.post(srv.url + path, json=body, timeout=30)
        assert r.status_code == 422, (path, r.text)
        assert time.monotonic() - start < 5, path
        error = r.json()["error"]
        message = error["message"] if isinstance(error, dict) else error
        assert "adapter id" in message or "local adapter" in message, message
        assert len(message) < 500  # a 5,000-character id is quoted cut short
        assert "\x00" not in r.text
        assert_no_host_path(r.text, root)


def test_a_burst_of_bad_ids_leaves_another_clients_stream_whole(srv, root):
    # F1: the engine never sees the ids, so a stream running meanwhile gets every token it gets alone.
    alone = stream_tokens(srv, "upper", 40)
    got: list[list[int]] = []
    streamer = threading.Thread(target=lambda: got.append(stream_tokens(srv, "upper", 40)))
    streamer.start()
    statuses: list[int] = []

    def hostile(adapter_id: str) -> None:
        for path, body in bad_requests(adapter_id)[:5]:
            statuses.append(httpx.post(srv.url + path, json=body, timeout=60).status_code)

    burst = [threading.Thread(target=hostile, args=(i,)) for i in [NUL_ID, LONG_ID, "y\u0000z"] * 4]
    for t in burst:
        t.start()
    for t in [*burst, streamer]:
        t.join(120)
    assert set(statuses) == {422} and len(statuses) == 60
    assert got == [alone]
    assert httpx.get(srv.url + "/health").status_code == 200
    assert httpx.get(srv.url + "/ready").status_code == 200


def test_merged_adapters_with_a_nul_id_is_a_fast_422(srv):
    # F2: it hung for more than 100 s.
    start = time.monotonic()
    r = generate(srv, {"max_new_tokens": 2, "merged_adapters": {"ids": ["upper", "y\u0000z"], "weights": [1, 1]}},
                 timeout=30)
    assert r.status_code == 422 and "control characters" in r.json()["error"]
    assert time.monotonic() - start < 5


def test_every_spelling_of_a_folder_is_one_adapter(srv):
    # F7: upper, ./upper and upper/ were three adapters, three host copies, three device slots.
    texts = {generate(srv, {"adapter_id": spelling, "max_new_tokens": 6}).json()["generated_text"]
             for spelling in ("upper", "./upper", "upper/", "./upper//")}
    assert len(texts) == 1
    core = srv.state.engine.engine
    assert [i.id for i in core.lora.resident() if i.id.endswith("upper")] == ["upper"]
    assert [a.identity.id for a in core.adapters.host_entries() if a.identity.id.endswith("upper")] == ["upper"]
    absolute = generate(srv, {"adapter_id": str(srv.adapters["upper"]), "max_new_tokens": 2})
    assert absolute.status_code == 422 and "by name" in absolute.json()["error"]  # served by name only


@pytest.mark.parametrize(("adapter_id", "status", "message"), [
    ("escape", 404, "outside the adapter roots"),            # F9: a symlink to a folder outside the root
    ("borrowed", 404, "links outside the adapter roots"),    # a folder inside whose files link outside
    ("broken", 424, "not a readable safetensors file"),
    ("nope", 404, "not a folder under the adapter roots"),
])
def test_confinement_and_errors_name_the_adapter_never_a_host_path(srv, root, adapter_id, status, message):
    for path in ("/generate", "/generate_stream"):
        r = httpx.post(srv.url + path, json={"inputs": PROMPT, "parameters": {"adapter_id": adapter_id}}, timeout=60)
        assert r.status_code == status, r.text
        assert message in r.json()["error"] and adapter_id in r.json()["error"]
        assert_no_host_path(r.text, root)
    r = httpx.post(srv.url + "/v1/chat/completions", timeout=60,
                   json={"model": adapter_id, "messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == status and message in r.json()["error"]["message"]
    assert_no_host_path(r.text, root)


def test_bundled_examples_are_not_served_with_an_adapter_root(srv):
    r = generate(srv, {"adapter_id": "invoice-json", "max_new_tokens": 2})
    assert r.status_code == 404, r.text
    models = [m["id"] for m in httpx.get(srv.url + "/v1/models").json()["data"]]
    assert "upper" in models and "invoice-json" not in models


@pytest.mark.parametrize("params", [
    {"adapter_id": "org/name", "adapter_source": "hub"},
    {"adapter_id": "s3://bucket/adapter"},
    {"adapter_id": "bucket/adapter", "adapter_source": "s3"},
    {"merged_adapters": {"ids": ["org/a", "org/b"], "weights": [1, 1]}, "adapter_source": "hub"},
])
def test_remote_sources_are_off_for_requests_by_default(srv, params):
    r = generate(srv, {**params, "max_new_tokens": 2})
    assert r.status_code == 422, r.text
    assert "not enabled for requests" in r.json()["error"]
    r = httpx.post(srv.url + "/v1/adapters/load", json={"adapter_id": "org/name", "adapter_source": "hub"}, timeout=30)
    assert r.status_code == 422 and "not enabled for requests" in r.json()["error"]


def test_unknown_ids_get_no_metrics_label(srv):
    # F11: every unknown id became a permanent label; /metrics grew to 800 KB.
    with httpx.Client(base_url=srv.url, timeout=60) as client:
        for i in range(500):
            r = client.post("/generate", json={"inputs": PROMPT, "parameters": {"adapter_id": f"nope-{i}",
                                                                                 "max_new_tokens": 1}})
            assert r.status_code == 404
        text = client.get("/metrics").text
    assert "nope-" not in text
    assert len(text.encode()) < METRICS_BYTES_BOUND, len(text.encode())
    assert 'loraplex_requests_total{adapter="(other)",status="error"}' in text
