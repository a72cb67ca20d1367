"""Prometheus metrics of the server: requests, latencies, batches, KV and adapter state.

Each app has its own registry (several servers can live in one process, e.g. in tests). Request
metrics are observed as requests end, labelled by adapter from a bounded set (Metrics.adapter_label);
engine state (KV usage, queue lengths, resident adapters) is read at scrape time by a collector, so the
step loop pays nothing for it.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import TYPE_CHECKING

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from loraplex.engine.sequence import SequenceStatus

if TYPE_CHECKING:
    from loraplex.engine.async_engine import AsyncEngine

MAX_ADAPTER_LABELS = 64
"""Adapters with their own label value; requests of any other adapter count under OTHER_ADAPTERS."""
OTHER_ADAPTERS = "(other)"  # no adapter id can be spelled so (server.adapters.request_ref)
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
TOKEN_LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._labels = {""}  # adapter label values in use; "" is the base model
        r = self.registry
        self.requests = Counter("loraplex_requests", "Finished requests by adapter and outcome",
                                ["adapter", "status"], registry=r)
        self.duration = Histogram("loraplex_request_duration_seconds", "Request latency, submit to last token",
                                  ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Submit to first generated token",
                              ["adapter"], buckets=LATENCY_BUCKETS, registry=r)
        self.tpot = Histogram("loraplex_time_per_output_token_seconds", "Mean time between generated tokens",
                              ["adapter"], buckets=TOKEN_LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens by adapter", ["adapter"], registry=r)
        self.generated_tokens = Counter("loraplex_generated_tokens", "Generated tokens by adapter", ["adapter"],
                                        registry=r)
        self.draft_tokens = Counter("loraplex_speculative_draft_tokens",
                                    "Draft tokens proposed (speculative decoding), by adapter", ["adapter"], registry=r)
        self.accepted_tokens = Counter("loraplex_speculative_accepted_tokens",
                                       "Draft tokens accepted (each a step saved), by adapter", ["adapter"], registry=r)
        self.verify_steps = Counter("loraplex_speculative_verify_steps",
                                    "Request-steps that verified drafts; accepted / verify_steps is the mean "
                                    "accepted length", ["adapter"], registry=r)
        self.batch_size = Histogram("loraplex_batch_size", "Requests that got a token per engine step",
                                    buckets=BATCH_BUCKETS, registry=r)
        self.step_duration = Histogram("loraplex_step_duration_seconds", "Engine step time",
                                       buckets=TOKEN_LATENCY_BUCKETS, registry=r)

    def observe_request(self, adapter: str, status: str, duration: float, ttft: float | None,
                        tpot: float | None, prompt_tokens: int, generated_tokens: int,
                        drafts: tuple[int, int, int] = (0, 0, 0)) -> None:
        """One finished request; `drafts`: its draft tokens proposed, accepted, and the steps that verified them."""
        adapter = self.adapter_label(adapter, loaded=status == "ok")
        self.requests.labels(adapter, status).inc()
        self.prompt_tokens.labels(adapter).inc(prompt_tokens)
        self.generated_tokens.labels(adapter).inc(generated_tokens)
        if drafts[2]:
            self.draft_tokens.labels(adapter).inc(drafts[0])
            self.accepted_tokens.labels(adapter).inc(drafts[1])
            self.verify_steps.labels(adapter).inc(drafts[2])
        if status != "ok":
            return
        self.duration.labels(adapter).observe(duration)
        if ttft is not None:
            self.ttft.labels(adapter).observe(ttft)
        if tpot is not None and generated_tokens > 1:
            self.tpot.labels(adapter).observe(tpot)

    def adapter_label(self, adapter: str, loaded: bool) -> str:
        """`adapter`'s label value. A label series lives as long as the process, so only adapters that
        served a request (`loaded`) get one, the first MAX_ADAPTER_LABELS of them: ids a client merely
        names (unknown, broken, refused) share OTHER_ADAPTERS, and /metrics stays bounded."""
        if adapter in self._labels:
            return adapter
        if loaded and len(self._labels) < MAX_ADAPTER_LABELS + 1:  # + 1: the base model's ""
            self._labels.add(adapter)
            return adapter
        return OTHER_ADAPTERS

    def observe_step(self, rows: int, seconds: float) -> None:
        """One engine step: `rows` requests got a token in `seconds`."""
        self.batch_size.observe(rows)
        self.step_duration.observe(seconds)

    def watch(self, engine: AsyncEngine) -> None:
        """Report `engine`'s state at every scrape."""
        self.registry.register(_EngineCollector(engine))
        # Not the outputs' count: requests that do not stream report no output between their first and last.
        engine.on_step = lambda _outputs, seconds: self.observe_step(engine.engine.last_step_rows, seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class _EngineCollector(Collector):
    def __init__(self, engine: AsyncEngine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[GaugeMetricFamily | CounterMetricFamily]:
        core = self.engine.engine
        pool, sched = core.pool, core.scheduler
        yield GaugeMetricFamily("loraplex_engine_alive", "1 while the engine loop runs", value=int(self.engine.alive))
        yield CounterMetricFamily("loraplex_engine_step_failures", "Engine steps that raised (their requests failed)",
                                  value=self.engine.num_step_failures)
        yield GaugeMetricFamily("loraplex_kv_cache_usage_ratio", "Share of KV blocks in use",
                                value=1 - pool.num_free / pool.num_blocks)
        yield GaugeMetricFamily("loraplex_requests_running", "Requests holding KV blocks", value=len(sched.running))
        yield GaugeMetricFamily("loraplex_requests_waiting", "Requests queued for admission", value=len(sched.waiting))
        yield GaugeMetricFamily("loraplex_requests_parked",
                                "Running requests whose adapter waits for a device slot", value=sched.num_parked)
        yield GaugeMetricFamily("loraplex_requests_in_flight", "Requests submitted and not finished",
                                value=self.engine.num_in_flight)
        yield CounterMetricFamily("loraplex_preemptions", "Requests preempted (KV freed, recomputed later)",
                                  value=sched.num_preemptions)
        yield CounterMetricFamily("loraplex_adapter_slot_parks",
                                  "Slot holders parked to pass a device slot to a waiting adapter", value=sched.num_parks)
        yield CounterMetricFamily("loraplex_prefix_cache_query_tokens", "Prompt tokens looked up in the prefix cache",
                                  value=sched.prefix_cache_queries)
        yield CounterMetricFamily("loraplex_prefix_cache_hit_tokens", "Prompt tokens found in the prefix cache",
                                  value=sched.prefix_cache_hits)
        weights = GaugeMetricFamily("loraplex_model_weight_bytes", "Bytes of the base model's weights, by storage dtype",
                                    labels=["dtype"])
        for dtype, size in core.weight_bytes.items():
            weights.add_metric([dtype], size)
        yield weights
        yield from _gateway_metrics(self.engine)
        if core.lora is not None:
            resident = GaugeMetricFamily("loraplex_adapter_resident", "1 for each adapter in a tier",
                                         labels=["adapter", "tier"])
            for identity in core.lora.resident():
                resident.add_metric([identity.id, "device"], 1)
            if core.adapters is not None:
                for loaded in core.adapters.host_entries():
                    resident.add_metric([loaded.identity.id, "host"], 1)
            yield resident
            yield CounterMetricFamily("loraplex_adapter_device_loads", "Adapter loads into device slots",
                                      value=core.lora.loads)
        if core.adapters is not None:
            stats = core.adapters.stats()
            for tier in ("host", "disk"):
                yield GaugeMetricFamily(f"loraplex_adapter_{tier}_bytes", f"Bytes of adapters in the {tier} tier",
                                        value=getattr(stats, f"{tier}_bytes"))
                for event in ("hits", "misses", "evictions"):
                    yield CounterMetricFamily(f"loraplex_adapter_{tier}_{event}", f"Adapter {tier} tier {event}",
                                              value=getattr(stats, f"{tier}_{event}"))
            for stage in ("fetch", "parse", "resolve"):
                yield CounterMetricFamily(f"loraplex_adapter_{stage}_seconds", f"Time spent in adapter {stage}es",
                                          value=getattr(stats, f"{stage}_seconds"))
            yield CounterMetricFamily("loraplex_adapter_load_failures", "Adapter loads that failed",
                                      value=stats.failures)


def _gateway_metrics(engine: AsyncEngine) -> Iterator[GaugeMetricFamily]:
    """What the Gateway API Inference Extension's endpoint picker reads of a model server (its model-server
    protocol, docs/proposals/003-model-server-protocol): queued and running requests, KV-cache use as a
    fraction, and the LoRA info gauge, under vLLM's names, which are the picker's defaults (docs/deploy.md).

    As in vLLM, `running_lora_adapters` are the adapters of requests that run (each holds a device slot)
    and `waiting_lora_adapters` those of requests that wait (queued, or parked for a slot); `max_lora` is
    the number of device slots. Adapters are named as a client names them in `model`. Requests whose
    adapter is still loading count as waiting requests, but their adapter ids (not checked yet: the load
    may fail) are no label: only adapters that loaded appear, so a client cannot fill the labels."""
    core = engine.engine
    sched, pool = core.scheduler, core.pool
    running = list(sched.running)  # one C call: the step loop may change the list while this reads it
    waiting = sched.waiting
    loading = core.num_loading
    yield GaugeMetricFamily("vllm:num_requests_waiting", "Requests waiting to run (gateway protocol: TotalQueuedRequests)",
                            value=len(waiting) + loading)
    yield GaugeMetricFamily("vllm:num_requests_running", "Requests running (gateway protocol: TotalRunningRequests)",
                            value=len(running))
    usage = 1 - pool.num_free / pool.num_blocks
    for name in ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc"):  # the picker's newer and older default
        yield GaugeMetricFamily(name, "Fraction of KV blocks in use, 0 to 1 (gateway protocol: KVCacheUtilization)",
                                value=usage)
    cache = GaugeMetricFamily("vllm:cache_config_info", "KV cache settings (gateway protocol: BlockSize)",
                              labels=["block_size", "num_gpu_blocks"])
    cache.add_metric([str(core.kv_cache.block_size), str(pool.num_blocks)], 1)
    yield cache
    active = {s.adapter.id for s in running if s.adapter is not None and s.status is not SequenceStatus.PARKED}
    queued = {s.adapter.id for s in running if s.adapter is not None and s.status is SequenceStatus.PARKED}
    queued |= {s.adapter.id for s in waiting if s.adapter is not None}
    info = GaugeMetricFamily("vllm:lora_requests_info", "Adapters of running and waiting requests; the value is "
                             "when this was read (gateway protocol: LoRA adapter serving)",
                             labels=["running_lora_adapters", "waiting_lora_adapters", "max_lora"])
    info.add_metric([",".join(sorted(active)), ",".join(sorted(queued)),
                     str(core.config.lora.max_loras)], time.time())
    yield info
