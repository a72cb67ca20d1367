"""AdapterLoader's bookkeeping: every counter and timer of `stats()`, its limits and defaults, `cached`,
`forget` and `close`, and the host tier's byte accounting when two loads of one version race."""

from __future__ import annotations

import logging
import threading
import time
from pathlib import Path

import pytest

from loraplex.adapters.disk_store import DiskStore
from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.ref import AdapterIdentity, AdapterRef
from loraplex.adapters.sources import Resolved
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import (
    SAFETENSORS_FILE,
    AdapterAccessDenied,
    AdapterFetchError,
    AdapterInvalid,
    AdapterNotFound,
    AdapterWeights,
)
from tests.adapters.adapter_files import adapter_files, parse, write_adapter
from tests.adapters.test_adapter_loader import Clock, CountingSource, ref

PAUSE = 0.05  # each resolve, fetch and parse of the timed source below takes at least this long


class SlowSource(CountingSource):
    """CountingSource whose resolve and fetch take PAUSE each, and whose fetch checks the token too."""

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        time.sleep(PAUSE)
        return super().resolve(ref, token)

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        time.sleep(PAUSE)
        if self.token is not None and token != self.token:
            raise AdapterAccessDenied(f"adapter {ref}: the fetch got no token")
        assert resolved.version == self.versions[ref.id]
        super().fetch(ref, resolved, token, dest)


def slow_parse(path: Path) -> AdapterWeights:
    time.sleep(PAUSE)
    return parse(path)


def published(*names: str, token: str | None = None) -> SlowSource:
    source = SlowSource(token=token)
    for i, name in enumerate(names):
        source.publish(name, seed=i, version="v1")
    return source


def test_every_counter_and_timer_after_a_scripted_sequence(tmp_path: Path) -> None:
    source, clock = published("a", "b"), Clock()
    disk = DiskStore(tmp_path / "disk", 1 << 30)
    size = parse(write_adapter(tmp_path / "one")).size_bytes
    started = time.perf_counter()
    with AdapterLoader({"mem": source}, slow_parse, disk=disk, revalidate_s=30.0, negative_ttl_s=5.0,
                       clock=clock) as loader:
        loader.request(ref("a")).result(timeout=30)        # resolve, disk miss, fetch, parse
        loader.request(ref("a")).result(timeout=30)        # host hit, answered at once
        clock.now += 31
        loader.request(ref("a")).result(timeout=30)        # revalidated: resolve, then a host hit
        for _ in range(2):
            with pytest.raises(AdapterNotFound):
                loader.request(ref("missing")).result(timeout=30)  # a failed resolve; then remembered
        clock.now += 5                                     # the failure is forgotten at exactly its ttl
        with pytest.raises(AdapterNotFound):
            loader.request(ref("missing")).result(timeout=30)
        assert loader.forget(AdapterIdentity("mem", "a", "v1"))
        loader.request(ref("a")).result(timeout=30)        # resolve, host miss, disk hit, parse
        loader.request(ref("b")).result(timeout=30)        # resolve, disk miss, fetch, parse
        stats = loader.stats()
    elapsed = time.perf_counter() - started
    counts = {k: v for k, v in stats.as_dict().items() if not k.endswith("seconds")}
    assert counts == dict(
        requests=8, host_hits=2, host_misses=3, host_evictions=0, host_entries=2, host_bytes=2 * size,
        disk_hits=1, disk_misses=2, disk_evictions=0, disk_entries=2, disk_bytes=disk.stats().bytes_resident,
        fetches=2, parses=3, resolves=4, failures=2, negative_hits=1, joined=0, in_flight=0)
    assert disk.stats().bytes_resident > 0
    # Timers add up every call (each at least PAUSE) and never exceed the wall time of the sequence.
    assert 2 * PAUSE <= stats.fetch_seconds < elapsed
    assert 3 * PAUSE <= stats.parse_seconds < elapsed
    assert 4 * PAUSE <= stats.resolve_seconds < elapsed  # successful version checks only


def test_without_a_disk_store_its_counters_are_zero_and_fetches_get_the_token(tmp_path: Path) -> None:
    source = published("p", token="good")
    with AdapterLoader({"mem": source}, parse, clock=Clock()) as loader:
        loaded = loader.request(ref("p"), token="good").result(timeout=30)
        assert not loaded.path.exists()  # fetched into a temp folder, parsed, removed
        stats = loader.stats()
    assert (stats.disk_hits, stats.disk_misses, stats.disk_evictions, stats.disk_entries, stats.disk_bytes) == (
        0, 0, 0, 0, 0)
    assert (stats.fetches, stats.parses) == (1, 1)


def test_a_disk_store_with_evictions_reports_them(tmp_path: Path) -> None:
    source = published("a", "b", "c")
    size = sum(len(b) for b in adapter_files().values())
    disk = DiskStore(tmp_path / "disk", size + 10)
    with AdapterLoader({"mem": source}, parse, disk=disk, clock=Clock()) as loader:
        for name in "abc":
            loader.request(ref(name)).result(timeout=30)
        stats = loader.stats()
    assert (stats.disk_evictions, stats.disk_entries, stats.disk_misses) == (2, 1, 3)


def test_limits_are_checked_and_the_edges_are_allowed(tmp_path: Path) -> None:
    for kwargs, message in (({"host_bytes": -1}, "host_bytes must be >= 0, got -1"),
                            ({"workers": 0}, "workers must be >= 1, got 0"),
                            ({"negative_ttl_s": -1.0}, "must be >= 0, got -1.0, 30.0"),
                            ({"revalidate_s": -1.0}, "must be >= 0, got 5.0, -1.0")):
        with pytest.raises(ValueError, match=message):
            AdapterLoader({}, parse, **kwargs)  # type: ignore[arg-type]
    with AdapterLoader({"mem": published("a")}, parse, host_bytes=0, workers=1, negative_ttl_s=0.0,
                       revalidate_s=0.0) as loader:
        assert loader.request(ref("a")).result(timeout=30).weights.rank == 4
        assert loader.stats().host_entries == 0
    with AdapterLoader({}, parse) as loader:
        assert (loader.host_bytes, loader.negative_ttl_s, loader.revalidate_s) == (4 << 30, 5.0, 30.0)


def test_an_adapter_exactly_the_size_of_the_host_budget_is_kept(tmp_path: Path) -> None:
    size = parse(write_adapter(tmp_path / "one")).size_bytes
    with AdapterLoader({"mem": published("a")}, parse, host_bytes=size, clock=Clock()) as loader:
        loader.request(ref("a")).result(timeout=30)
        assert (loader.stats().host_entries, loader.stats().host_bytes) == (1, size)


@pytest.mark.parametrize("workers", [1, 2])
def test_at_most_workers_loads_run_at_once_on_named_threads(workers: int) -> None:
    source = published(*"abcd")
    running, most, names = 0, 0, set()
    lock = threading.Lock()

    def parse_slowly(path: Path) -> AdapterWeights:
        nonlocal running, most
        with lock:
            running += 1
            most = max(most, running)
            names.add(threading.current_thread().name)
        time.sleep(0.3)  # long enough for every worker to be inside a parse at once
        with lock:
            running -= 1
        return parse(path)

    with AdapterLoader({"mem": source}, parse_slowly, workers=workers, clock=Clock()) as loader:
        futures = [loader.request(ref(name)) for name in "abcd"]
        for f in futures:
            f.result(timeout=30)
    assert most == workers
    assert all(name.startswith("adapter-loader") for name in names)


def test_default_workers_from_config_and_its_ttls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    config = AdapterSourceConfig(sources=("local",), adapter_roots=(str(tmp_path),), negative_ttl_s=7.0,
                                 revalidate_s=11.0, disk_cache_dir=str(tmp_path / "mine"), loader_workers=3)
    with AdapterLoader.from_config(config, parse) as loader:
        assert (loader.negative_ttl_s, loader.revalidate_s) == (7.0, 11.0)
        assert loader._pool._max_workers == 3  # noqa: SLF001 (no public view of the pool's size)
    assert (tmp_path / "mine" / "entries").is_dir() and not (tmp_path / "home" / "adapters").exists()
    with AdapterLoader({}, parse) as loader:
        assert loader._pool._max_workers == 2  # noqa: SLF001


def test_cached_answers_from_the_host_tier_without_io(tmp_path: Path) -> None:
    source = published("a", "b")
    size = parse(write_adapter(tmp_path / "one")).size_bytes
    with AdapterLoader({"mem": source}, parse, host_bytes=size, clock=Clock()) as loader:
        assert loader.cached(ref("a")) is None
        loaded = loader.request(ref("a")).result(timeout=30)
        resolves = source.resolves
        assert loader.cached(ref("a")) is loaded and source.resolves == resolves
        loader.request(ref("b")).result(timeout=30)  # evicts a: the budget holds one
        assert loader.cached(ref("a")) is None and loader.cached(ref("b")) is not None
        assert loader.stats().host_evictions == 1


def test_forget_drops_one_adapter_and_its_resolution_only() -> None:
    source, clock = published("a", "b"), Clock()
    with AdapterLoader({"mem": source}, parse, clock=clock) as loader:
        a = loader.request(ref("a")).result(timeout=30)
        b = loader.request(ref("b")).result(timeout=30)
        assert not loader.forget(AdapterIdentity("mem", "zzz", "v1"))
        assert loader.forget(a.identity)
        assert not loader.forget(a.identity)  # already gone
        assert loader.stats().host_bytes == b.weights.size_bytes
        assert loader.stats().host_entries == 1
        assert loader.cached(ref("a")) is None and loader.cached(ref("b")) is b
        resolves = source.resolves
        assert loader.request(ref("b")).done()  # b still trusted: no worker, no resolve
        again = loader.request(ref("a")).result(timeout=30)
        assert again is not a and source.resolves == resolves + 1


def test_close_returns_at_once_and_cancels_queued_loads() -> None:
    source = published("a", "b")
    source.gate.clear()
    loader = AdapterLoader({"mem": source}, parse, workers=1, clock=Clock())
    running = loader.request(ref("a"))
    queued = loader.request(ref("b"))
    deadline = time.monotonic() + 30
    while source.resolves == 0 and time.monotonic() < deadline:  # the worker has taken "a" (blocked in it)
        time.sleep(0.01)
    started = time.perf_counter()
    loader.close()
    assert time.perf_counter() - started < 1.0 and not running.done()  # did not wait for the blocked load
    assert queued.cancelled()
    source.gate.set()
    assert running.result(timeout=30).weights.rank == 4


def test_two_loads_of_one_version_count_its_bytes_once(tmp_path: Path) -> None:
    # Requests with different tokens never share a load, so two loads may parse the same version.
    source = published("p")
    source.gate.clear()
    with AdapterLoader({"mem": source}, parse, clock=Clock()) as loader:
        first, second = loader.request(ref("p"), token="one"), loader.request(ref("p"), token="two")
        source.gate.set()
        size = first.result(timeout=30).weights.size_bytes
        second.result(timeout=30)
        assert (loader.stats().host_entries, loader.stats().host_bytes) == (1, size)


def test_an_unexpected_error_is_logged_with_its_traceback_and_an_adapter_error_is_not(
        caplog: pytest.LogCaptureFixture, tmp_path: Path) -> None:
    from tests.adapters.test_adapter_loader import BrokenSource

    with AdapterLoader({"mem": BrokenSource(), "ok": published()}, parse, clock=Clock()) as loader, \
            caplog.at_level(logging.ERROR, logger="loraplex.adapters.loader"):
        with pytest.raises(AdapterFetchError):
            loader.request(ref("x")).result(timeout=30)
        with pytest.raises(AdapterNotFound):
            loader.request(AdapterRef("ok", "absent")).result(timeout=30)
    errors = [r for r in caplog.records if r.levelno == logging.ERROR]
    assert [r.getMessage() for r in errors] == ["loading adapter mem:x failed"]
    assert errors[0].exc_info is not None and isinstance(errors[0].exc_info[1], OSError)


def test_a_negative_ttl_of_zero_remembers_nothing() -> None:
    source = published()
    with AdapterLoader({"mem": source}, parse, negative_ttl_s=0.0, clock=Clock()) as loader:
        for _ in range(3):
            with pytest.raises(AdapterNotFound):
                loader.request(ref("missing")).result(timeout=30)
        assert source.resolves == 3 and loader.stats().negative_hits == 0


def test_a_fetched_adapter_that_does_not_parse_names_the_adapter_without_a_disk_store() -> None:
    source = published("a")
    source.files["a"][SAFETENSORS_FILE] = b"\x00" * 64
    with AdapterLoader({"mem": source}, parse, clock=Clock()) as loader, \
            pytest.raises(AdapterInvalid, match=r"^adapter mem:a: ") as info:
        loader.request(ref("a")).result(timeout=30)
    assert "loraplex-adapter-" not in str(info.value)  # the temp folder is not named


def test_a_fetch_into_the_disk_tier_gets_the_requests_token(tmp_path: Path) -> None:
    source = published("p", token="good")  # checks the token on resolve and on fetch
    with AdapterLoader({"mem": source}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30), clock=Clock()) as loader:
        assert loader.request(ref("p"), token="good").result(timeout=30).weights.rank == 4
    assert source.fetches == 1


def test_a_remembered_failure_keeps_its_cause_and_host_entries_list_lru_first() -> None:
    from tests.adapters.test_adapter_loader import BrokenSource

    with AdapterLoader({"mem": BrokenSource(), "ok": published("a", "b")}, parse, negative_ttl_s=5.0,
                       clock=Clock()) as loader:
        for _ in range(2):  # the load's own error, then the remembered one
            with pytest.raises(AdapterFetchError) as info:
                loader.request(ref("x")).result(timeout=30)
            assert isinstance(info.value.__cause__, OSError)
        for name in ("a", "b", "a"):
            loader.request(AdapterRef("ok", name)).result(timeout=30)
        assert [e.identity.id for e in loader.host_entries()] == ["b", "a"]
