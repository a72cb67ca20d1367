"""Metrics: adapter label values stay a bounded set whatever ids clients send."""

from __future__ import annotations

import time
from pathlib import Path

from peft import LoraConfig
from prometheus_client.parser import text_string_to_metric_families

from loraplex import LLM, SamplingParams
from loraplex.engine.async_engine import AsyncEngine
from loraplex.server.metrics import MAX_ADAPTER_LABELS, OTHER_ADAPTERS, Metrics
from tests.lora.peft_fixtures import make_adapter

METRICS_BYTES_BOUND = 64_000  # request metrics of the base model, OTHER_ADAPTERS and a few adapters


def observe(metrics: Metrics, adapter: str, status: str) -> None:
    metrics.observe_request(adapter, status, 0.5, 0.1 if status == "ok" else None, 0.01 if status == "ok" else None,
                            5, 3 if status == "ok" else 0)


def test_ids_that_never_served_a_request_share_one_label() -> None:
    metrics = Metrics()
    observe(metrics, "", "ok")
    observe(metrics, "known", "ok")
    for i in range(500):
        observe(metrics, f"nope-{i}", "error")
    text = metrics.render().decode()
    assert "nope-" not in text
    assert len(text) < METRICS_BYTES_BOUND
    assert f'loraplex_requests_total{{adapter="{OTHER_ADAPTERS}",status="error"}} 500.0' in text
    observe(metrics, "known", "error")  # an adapter that loaded once keeps its label for its failures
    assert 'loraplex_requests_total{adapter="known",status="error"} 1.0' in metrics.render().decode()


def test_at_most_max_adapter_labels_adapters_get_their_own_label() -> None:
    metrics = Metrics()
    names = [f"a{i}" for i in range(MAX_ADAPTER_LABELS + 10)]
    for name in names:
        observe(metrics, name, "ok")
    text = metrics.render().decode()
    assert all(f'adapter="{n}",status="ok"' in text for n in names[:MAX_ADAPTER_LABELS])
    assert not any(f'adapter="{n}",status="ok"' in text for n in names[MAX_ADAPTER_LABELS:])
    assert f'loraplex_requests_total{{adapter="{OTHER_ADAPTERS}",status="ok"}} 10.0' in text
    observe(metrics, "", "ok")  # the base model is never pushed out
    assert 'loraplex_requests_total{adapter="",status="ok"} 1.0' in metrics.render().decode()


def test_gateway_metrics_follow_the_model_server_protocol(base: Path, tmp_path: Path) -> None:
    # The Gateway API Inference Extension's model-server protocol (its docs/proposals/003-model-server-protocol):
    # gauges of queued and running requests and of KV-cache use, and `vllm:lora_requests_info`, a gauge whose
    # value is a timestamp and whose labels `running_lora_adapters` / `waiting_lora_adapters` are
    # comma-separated adapter names (as sent in `model`) and `max_lora` the number of adapter slots.
    names = [str(make_adapter(base, tmp_path / f"a{i}", LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj"]),
                              seed=i)) for i in range(3)]
    llm = LLM(str(base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8, max_num_seqs=3)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=40, temperature=0.0, ignore_eos=True)
    engine.add_request("base", [1, 2, 3], params)
    for i, adapter in enumerate([names[0], names[0], names[1], names[2]]):
        engine.add_request(f"r{i}", [4, 5, 6 + i], params, adapter_id=adapter)
    engine.wait_for_adapter_loads(timeout=60)
    for _ in range(3):
        engine.step()
    engine.add_request("unknown", [1, 2], params, adapter_id=str(tmp_path / "never-loads"))
    metrics = Metrics()
    metrics.watch(AsyncEngine(engine))
    text = metrics.render().decode()
    families = {f.name: f for f in text_string_to_metric_families(text)}
    sched = engine.scheduler

    def gauge(name: str) -> float:
        family = families[name]
        assert family.type == "gauge" and len(family.samples) == 1, name
        return float(family.samples[0].value)

    assert gauge("vllm:num_requests_running") == len(sched.running) == 3
    assert gauge("vllm:num_requests_waiting") == sched.num_waiting + engine.num_loading >= 2
    usage = 1 - engine.pool.num_free / engine.pool.num_blocks
    assert 0 < usage < 1 and gauge("vllm:kv_cache_usage_perc") == gauge("vllm:gpu_cache_usage_perc") == usage
    (cache,) = families["vllm:cache_config_info"].samples
    assert cache.labels == {"block_size": "4", "num_gpu_blocks": str(engine.pool.num_blocks)} and cache.value == 1
    exchange = engine.adapters.stats()  # the adapter exchange's timers, exported as they are
    for stage in ("fetch", "parse", "resolve"):
        (sample,) = families[f"loraplex_adapter_{stage}_seconds"].samples
        assert sample.value == getattr(exchange, f"{stage}_seconds")
    assert families["loraplex_adapter_parse_seconds"].samples[0].value > 0
    (info,) = families["vllm:lora_requests_info"].samples
    assert families["vllm:lora_requests_info"].type == "gauge" and abs(info.value - time.time()) < 60
    assert set(info.labels) == {"running_lora_adapters", "waiting_lora_adapters", "max_lora"}
    running = info.labels["running_lora_adapters"].split(",")
    waiting = info.labels["waiting_lora_adapters"].split(",")
    assert info.labels["max_lora"] == "1" and running == [names[0]]  # one slot: its holder's two requests run
    assert names[1] in waiting and names[2] in waiting and names[0] not in waiting
    assert "never-loads" not in text  # an adapter not loaded (yet) is no label value
    assert "loraplex_requests_running 3.0" in text  # beside our own metrics
