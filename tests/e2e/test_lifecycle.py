"""Disconnects free everything, overload is refused at once, SIGTERM drains in-flight streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import httpx
import pytest

from loraplex.config import ServerConfig
from tests.e2e.conftest import free_socket, start_server

PROMPT = "Write a long story about a dragon."


def engine_idle(engine) -> dict:
    """What a drained engine must show: nothing queued or running, every KV block and slot free."""
    return {"running": len(engine.scheduler.running), "waiting": len(engine.scheduler.waiting),
            "free_blocks": engine.pool.num_free == engine.pool.num_blocks,
            "slot_refs": sum(engine.lora.slot_refs())}


async def wait_idle(server, timeout: float = 30) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        state = await server.state.engine.call(engine_idle)
        if (state == {"running": 0, "waiting": 0, "free_blocks": True, "slot_refs": 0}
                and server.state.engine.num_in_flight == 0) or time.monotonic() > deadline:
            return state
        await asyncio.sleep(0.1)


def test_50_streaming_clients_that_disconnect_free_kv_and_adapters(server):
    adapters = ["qv8", "all16", ""]

    async def one(client: httpx.AsyncClient, i: int) -> int:
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 200, "ignore_eos_token": True,
                                                  "adapter_id": adapters[i % 3]}}
        seen = 0
        async with client.stream("POST", server.url + "/generate_stream", json=body) as r:
            assert r.status_code == 200
            async for line in r.aiter_lines():
                if line.startswith("data:"):
                    seen += 1
                    if seen == 2 + i % 3:
                        break  # leave mid-stream: the connection closes here
        return seen

    async def run() -> dict:
        async with httpx.AsyncClient(timeout=120, limits=httpx.Limits(max_connections=60)) as client:
            seen = await asyncio.gather(*(one(client, i) for i in range(50)))
        assert all(2 <= s <= 4 for s in seen)
        return await wait_idle(server)

    assert asyncio.run(run()) == {"running": 0, "waiting": 0, "free_blocks": True, "slot_refs": 0}
    # The server is still fine afterwards.
    r = httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 3}}, timeout=60)
    assert r.status_code == 200


def test_overload_is_refused_at_once_with_429(demo_adapters):
    thread, srv = start_server(demo_adapters, ServerConfig(max_concurrent_requests=2))
    try:
        async def run() -> None:
            async with httpx.AsyncClient(timeout=120) as client:
                body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 500, "ignore_eos_token": True}}
                streams = [client.stream("POST", srv.url + "/generate_stream", json=body) for _ in range(2)]
                responses = [await s.__aenter__() for s in streams]
                assert [r.status_code for r in responses] == [200, 200]
                start = time.monotonic()
                refused = await client.post(srv.url + "/generate", json={"inputs": PROMPT})
                assert refused.status_code == 429 and time.monotonic() - start < 5
                assert refused.json()["error_type"] == "overloaded"
                for s in streams:
                    await s.__aexit__(None, None, None)
                await wait_idle(srv)
                ok = await client.post(srv.url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}})
                assert ok.status_code == 200

        asyncio.run(run())
    finally:
        thread.stop()


@pytest.mark.timeout(180)
def test_sigterm_drains_in_flight_streams(demo_model_path, tmp_path):
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "LORAPLEX_PORT": str(port)}  # settable from the environment
    proc = subprocess.Popen([sys.executable, "-m", "loraplex.cli", "serve", "--model-id", str(demo_model_path)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                if httpx.get(url + "/ready", timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
            time.sleep(0.2)
        events = []
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
        assert len(events) == 40 and events[-1]["generated_text"] is not None  # the stream finished
        # uvicorn re-raises the captured SIGTERM once drained, so the exit status is the signal's (as for any
        # process ended by SIGTERM); what matters is that it exits by itself after the stream finished.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.wait()


def test_ready_fails_from_the_shutdown_signal_on(server):
    import uvicorn

    from loraplex.server.main import _DrainingServer

    signalled = _DrainingServer(uvicorn.Config(app=None), server.state)  # type: ignore[arg-type]
    assert httpx.get(server.url + "/ready").status_code == 200
    try:
        signalled.handle_exit(signal.SIGTERM, None)
        assert signalled.should_exit
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
        assert httpx.get(server.url + "/health").status_code == 200  # still alive: in-flight work finishes
    finally:
        server.state.draining = False
