"""loraplex on Ray Serve (loraplex/ray_serve.py) with a local Ray cluster: two replicas of the demo model
behind the ingress, driven with the published `openai` client. An adapter's requests stick to one
replica (Ray Serve's multiplexing by adapter id); a replica killed mid-traffic is replaced, and every
request in flight on it gets an answer or an error, never a silent end."""

from __future__ import annotations

import collections
import json
import socket
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

ray = pytest.importorskip("ray")
serve = pytest.importorskip("ray.serve")

from loraplex.cli import build_parser  # noqa: E402
from loraplex.ray_serve import REPLICA_HEADER, LoraplexReplica, adapter_of, build_app, configs  # noqa: E402

SLOW = pytest.mark.slow  # the cluster tests: about two minutes (two model loads, a third after the kill)
STREAM_TOKENS = 256


def test_adapter_of_reads_the_adapter_each_api_names() -> None:
    assert adapter_of("/v1/completions", b'{"model": "upper", "prompt": "x"}', "demo") == "upper"
    assert adapter_of("/v1/chat/completions", b'{"model": "demo"}', "demo") == ""
    assert adapter_of("/generate", b'{"inputs": "x", "parameters": {"adapter_id": "upper"}}', "demo") == "upper"
    assert adapter_of("/", b'{"inputs": "x", "adapter_id": "upper"}', "demo") == "upper"
    assert adapter_of("/generate", b"not json", "demo") == adapter_of("/generate", b"[1]", "demo") == ""
    assert adapter_of("/v1/adapters/load", b'{"adapter_id": "upper"}', "demo") == ""


def test_a_replica_whose_preload_failed_fails_its_health_check() -> None:
    # Every request would fail as the preload did: Ray Serve replaces a replica whose check raises.
    import asyncio
    import types

    check = LoraplexReplica.func_or_class.check_health

    async def run() -> None:
        async def preload(fails: bool) -> None:
            if fails:
                raise ValueError("bad adapter")

        replica = types.SimpleNamespace(state=types.SimpleNamespace(
            engine=types.SimpleNamespace(alive=True, dead=None)), _preloaded=None)
        await check(replica)  # not preloaded yet: healthy
        replica._preloaded = asyncio.ensure_future(preload(False))
        await replica._preloaded
        await check(replica)
        replica._preloaded = asyncio.ensure_future(preload(True))
        with pytest.raises(ValueError):
            await replica._preloaded
        with pytest.raises(RuntimeError, match="preloading this replica's adapters failed"):
            await check(replica)

    asyncio.run(run())


def test_options_are_loraplex_serve_flags_parsed_as_the_cli_parses_them() -> None:
    engine, server = configs({"max_loras": "8", "allow_request_sources": "local,hub", "admin_token": "t",
                              "enable_prefix_caching": "false", "max_num_seqs": 32})
    assert engine.lora.max_loras == 8 and engine.scheduler.max_num_seqs == 32
    assert not engine.cache.enable_prefix_caching
    assert server.allow_request_sources == ("local", "hub") and server.admin_token == "t"
    with pytest.raises(ValueError, match="not a flag of loraplex serve"):
        configs({"max_lora": "8"})
    # As `loraplex serve` takes them: a flag's other spelling, and $LORAPLEX_* for what the options leave out.
    engine, server = configs({"model_id": "demo", "adapter_root": "/srv/a,/srv/b"},
                             environ={"LORAPLEX_MAX_LORAS": "3", "LORAPLEX_MODEL": "other", "LORAPLEX_PORT": "9"})
    assert engine.model.model == "demo" and engine.adapters.adapter_roots == ("/srv/a", "/srv/b")
    assert engine.lora.max_loras == 3 and server.port == 9
    with pytest.raises(ValueError, match="given twice"):
        configs({"model": "a", "model_id": "b"})
    with pytest.raises(ValueError, match="option max_loras"):
        configs({}, environ={"LORAPLEX_MAX_LORAS": "many"})
    args = build_parser().parse_args(["ray-serve", "--num-replicas", "3", "--max-loras", "8"])
    assert args.num_replicas == 3 and args.max_loras == 8 and args.func.__name__ == "_ray_serve"


@pytest.fixture(scope="module")
def cluster(demo_model_path: Any) -> Iterator[str]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    sock.close()
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False)
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        serve.run(build_app({"num_replicas": "2", "max_loras": "2", "model": str(demo_model_path)}),
                  route_prefix="/")
        yield f"http://127.0.0.1:{port}"
    finally:
        serve.shutdown()
        ray.shutdown()


def _running_replicas() -> int:
    states = serve.status().applications["default"].deployments["LoraplexReplica"].replica_states
    return sum(n for state, n in states.items() if str(getattr(state, "value", state)) == "RUNNING")


@SLOW
def test_an_adapters_requests_stick_to_one_replica(cluster: str) -> None:
    from openai import OpenAI

    client = OpenAI(base_url=cluster + "/v1", api_key="unused", max_retries=0)
    models = ["upper"] * 24 + ["invoice-json"] * 8 + [str(_base_model(cluster))] * 8

    def one(i_model: tuple[int, str]) -> tuple[str, str]:
        i, model = i_model
        raw = client.completions.with_raw_response.create(model=model, prompt=f"Say hello {i}.", max_tokens=3)
        raw.parse()
        return model, raw.headers[REPLICA_HEADER]

    with ThreadPoolExecutor(4) as pool:
        served = list(pool.map(one, enumerate(models)))
    by_model: dict[str, collections.Counter[str]] = collections.defaultdict(collections.Counter)
    for model, replica in served:
        by_model[model][replica] += 1
    hot = by_model["upper"]
    share = hot.most_common(1)[0][1] / sum(hot.values())
    print(f"replicas by model: {dict(by_model)}; hot adapter share on its replica: {share:.2f}")
    assert share >= 0.9, dict(by_model)
    cold = by_model["invoice-json"]
    assert cold.most_common(1)[0][1] / sum(cold.values()) >= 0.9, dict(by_model)
    # Not asserted: that both replicas serve. Rendezvous hashing over two replicas with random ids puts both
    # adapters on one replica half the time, and the base model's requests may then all go there too
    # (a CI run saw it); spreading is the router's property, for a unit test of it.


def _base_model(url: str) -> str:
    return str(httpx.get(url + "/info", timeout=60).json()["model_id"])


def _stream(url: str, i: int) -> tuple[str, int]:
    """One streamed completion: ("done", tokens) when it ended with [DONE], ("error", n) when the server
    said it failed (a status or an error event), ("cut", n) when it ended silently."""
    body = {"model": "upper", "prompt": f"Count to one hundred, {i}:", "max_tokens": STREAM_TOKENS, "stream": True,
            "ignore_eos": True}
    tokens = 0
    try:
        with httpx.stream("POST", url + "/v1/completions", json=body, timeout=120) as r:
            if r.status_code != 200:
                return "error", tokens
            for line in r.iter_lines():
                if not line.startswith("data: "):
                    continue
                data = line.removeprefix("data: ")
                if data == "[DONE]":
                    return "done", tokens
                event = json.loads(data)
                if "error" in event:
                    return "error", tokens
                tokens += 1
    except httpx.HTTPError:
        return "error", tokens
    return "cut", tokens


@SLOW
def test_a_killed_replica_is_replaced_and_no_request_is_lost_silently(cluster: str) -> None:
    assert _running_replicas() == 2
    # The streams all name one adapter, so they run on the replica that holds it: that one is killed.
    probe = httpx.post(cluster + "/v1/completions", json={"model": "upper", "prompt": "Hi", "max_tokens": 1},
                       timeout=120)
    victim = probe.headers[REPLICA_HEADER]
    (actor,) = [a for a in ray.util.list_named_actors(all_namespaces=True)
                if "LoraplexReplica" in a["name"] and a["name"].endswith(victim)]
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(_stream, cluster, i) for i in range(6)]
        time.sleep(3)  # the streams are running
        ray.kill(ray.get_actor(actor["name"], namespace=actor["namespace"]), no_restart=True)
        outcomes = [f.result() for f in futures]
    print(f"outcomes of the 6 streams: {outcomes}")
    assert all(kind in ("done", "error") for kind, _ in outcomes), outcomes
    assert any(kind == "error" for kind, _ in outcomes)  # the kill did cut requests in flight
    assert all(n == STREAM_TOKENS for kind, n in outcomes if kind == "done")
    deadline = time.monotonic() + 300
    while _running_replicas() < 2:
        assert time.monotonic() < deadline, "the replica was not replaced"
        time.sleep(2)
    for i in range(4):
        assert _stream(cluster, 100 + i) == ("done", STREAM_TOKENS)
