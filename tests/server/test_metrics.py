"""Metrics: adapter label values stay a bounded set whatever ids clients send."""

from __future__ import annotations

from loraplex.server.metrics import MAX_ADAPTER_LABELS, OTHER_ADAPTERS, Metrics

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
