"""Disconnects free everything, overload is refused at once, SIGTERM drains in-flight streams."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

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


def start_serve(model: Path, *flags: str, script: str | None = None) -> tuple[subprocess.Popen[str], str]:
    """`loraplex serve` in a subprocess on a free port (run through `script` when given); returns once /ready
    answers 200."""
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    env = {**os.environ, "LORAPLEX_PORT": str(port)}  # settable from the environment
    command = ["-c", script] if script is not None else ["-m", "loraplex.cli"]
    proc = subprocess.Popen([sys.executable, *command, "serve", "--model-id", str(model), *flags],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if httpx.get(url + "/ready", timeout=1).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise AssertionError(f"server did not start: {proc.communicate()[0][-3000:]}")
        time.sleep(0.2)


def stop(proc: subprocess.Popen[str]) -> None:
    if proc.poll() is None:
        proc.kill()
    proc.wait()


@pytest.mark.timeout(240)
def test_sigterm_drains_in_flight_streams(demo_model_path):
    proc, url = start_serve(demo_model_path, "--shutdown-timeout-s", "120")
    try:
        events = []
        probes: dict[str, int] = {}
        body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 40, "ignore_eos_token": True}}
        with httpx.stream("POST", url + "/generate_stream", json=body, timeout=120) as r:
            for line in r.iter_lines():
                if line.startswith("data:"):
                    events.append(json.loads(line[5:]))
                    if len(events) == 1:
                        proc.send_signal(signal.SIGTERM)
                    if len(events) == 3:
                        # Draining: the listener is still open, readiness fails, liveness holds, and new
                        # generation requests are refused, while this stream goes on.
                        time.sleep(0.3)  # the signal handler runs between the event loop's callbacks
                        probes["ready"] = httpx.get(url + "/ready", timeout=10).status_code
                        probes["health"] = httpx.get(url + "/health", timeout=10).status_code
                        refused = httpx.post(url + "/generate", json={"inputs": PROMPT}, timeout=10)
                        probes["generate"] = refused.status_code
                        assert refused.json()["error_type"] == "unavailable", refused.text
        assert probes == {"ready": 503, "health": 200, "generate": 503}
        assert len(events) == 40 and events[-1]["generated_text"] is not None  # the stream finished
        # uvicorn re-raises the captured SIGTERM once drained, so the exit status is the signal's (as for any
        # process ended by SIGTERM); what matters is that it exits by itself after the stream finished.
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
        with pytest.raises(httpx.TransportError):
            httpx.get(url + "/health", timeout=2)
    finally:
        stop(proc)


@pytest.mark.timeout(240)
def test_streams_cut_by_the_shutdown_timeout_end_with_an_error_event(demo_model_path):
    proc, url = start_serve(demo_model_path, "--shutdown-timeout-s", "2")
    try:
        native = {"inputs": PROMPT, "parameters": {"max_new_tokens": 1000, "ignore_eos_token": True}}
        oai = {"prompt": PROMPT, "max_tokens": 1000, "stream": True, "ignore_eos": True}

        async def read(client: httpx.AsyncClient, path: str, body: dict, started: asyncio.Event) -> list[str]:
            lines = []
            async with client.stream("POST", url + path, json=body) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("data:"):
                        lines.append(line[5:].strip())
                        started.set()
            return lines

        async def run() -> tuple[list[str], list[str]]:
            async with httpx.AsyncClient(timeout=120) as client:
                started = [asyncio.Event(), asyncio.Event()]
                tasks = [asyncio.create_task(read(client, "/generate_stream", native, started[0])),
                         asyncio.create_task(read(client, "/v1/completions", oai, started[1]))]
                for event in started:
                    await asyncio.wait_for(event.wait(), 60)
                proc.send_signal(signal.SIGTERM)
                return await tasks[0], await tasks[1]

        native_lines, oai_lines = asyncio.run(run())
        last = json.loads(native_lines[-1])
        assert last["error_type"] == "unavailable" and "shutdown timeout" in last["error"], last
        assert all(json.loads(line)["generated_text"] is None for line in native_lines[:-1])  # none ended cleanly
        assert oai_lines[-1] != "[DONE]"
        error = json.loads(oai_lines[-1])["error"]
        assert error["type"] == "unavailable" and "shutdown timeout" in error["message"], error
        assert len(native_lines) < 1000 and len(oai_lines) < 1000
        assert proc.wait(timeout=60) in (0, -signal.SIGTERM)
    finally:
        stop(proc)


BROKEN_STEP = """
import sys
from loraplex import cli
from loraplex.engine.engine import Engine

def step(self):
    raise RuntimeError("injected: every step fails")

Engine.step = step
sys.exit(cli.main(sys.argv[1:]))
"""


@pytest.mark.timeout(240)
def test_the_process_exits_non_zero_when_the_engine_loop_dies(demo_model_path):
    from loraplex.engine.async_engine import MAX_CONSECUTIVE_STEP_FAILURES
    from loraplex.server.main import EXIT_ENGINE_DEAD

    proc, url = start_serve(demo_model_path, script=BROKEN_STEP)
    try:
        for _ in range(MAX_CONSECUTIVE_STEP_FAILURES):  # each request runs one failing step, then nothing is left
            r = httpx.post(url + "/generate", json={"inputs": PROMPT, "parameters": {"max_new_tokens": 2}}, timeout=60)
            assert r.status_code == 500 and r.json()["error_type"] == "generation", r.text
        # The loop is dead: rather than answer 503 for ever, the process exits so it gets restarted.
        assert proc.wait(timeout=60) == EXIT_ENGINE_DEAD
        assert "engine loop died" in proc.communicate()[0]
    finally:
        stop(proc)


def test_drain_keeps_probes_answered_and_refuses_new_generation(server):
    import uvicorn

    from loraplex.server.main import DrainingServer

    signalled = DrainingServer(uvicorn.Config(app=None), server.state)  # type: ignore[arg-type]
    assert httpx.get(server.url + "/ready").status_code == 200
    try:
        signalled.handle_exit(signal.SIGTERM, None)
        assert not signalled.should_exit  # uvicorn would close the listener now: first the drain
        r = httpx.get(server.url + "/ready")
        assert r.status_code == 503 and "shutting down" in r.json()["error"]
        assert httpx.get(server.url + "/health").status_code == 200  # still alive: in-flight work finishes
        for path, body in (("/generate", {"inputs": PROMPT}), ("/v1/completions", {"prompt": PROMPT})):
            r = httpx.post(server.url + path, json=body, timeout=30)
            assert r.status_code == 503, r.text
        asyncio.run(signalled.on_tick(1))  # nothing is in flight: the drain is over
        assert signalled.should_exit
    finally:
        server.state.engine.draining = False


@pytest.mark.timeout(180)
def test_serve_in_process_logs_its_address_and_returns_0_after_a_drain(monkeypatch, caplog):
    # `serve` itself (the subprocess tests above run it out of this process's sight): SIGTERM once ready,
    # the drain finds nothing in flight, and it returns 0. uvicorn re-raises the signal it captured once
    # shut down; the handler installed here takes it instead of ending the test run.
    import logging
    import threading

    from loraplex.config import EngineConfig
    from loraplex.server import main

    monkeypatch.setattr(main, "use_one_torch_thread", lambda: None)  # keep this thread's torch threads
    sock = free_socket()
    port = sock.getsockname()[1]
    sock.close()
    url = f"http://127.0.0.1:{port}"
    reraised: list[int] = []
    previous = signal.signal(signal.SIGTERM, lambda sig, frame: reraised.append(sig))

    def stop_when_ready() -> None:
        deadline = time.monotonic() + 150
        while time.monotonic() < deadline:
            try:
                if httpx.get(url + "/ready", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_when_ready, daemon=True).start()
    try:
        with caplog.at_level(logging.INFO, logger="loraplex.server.main"):
            status = main.serve(EngineConfig.from_options(max_loras=0),
                                ServerConfig(hostname="127.0.0.1", port=port, shutdown_timeout_s=5))
    finally:
        signal.signal(signal.SIGTERM, previous)
    assert status == 0 and reraised == [signal.SIGTERM]
    assert f"serving SmolLM2-135M-Instruct on http://127.0.0.1:{port}" in caplog.text
    assert "draining: 0 requests in flight, at most 5 s" in caplog.text
