"""AdapterLoader: non-blocking requests, single-flight, negative cache, revalidation, host and disk tiers."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from loraplex.adapters.disk_store import DiskStore
from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.local_source import LocalSource
from loraplex.adapters.ref import AdapterIdentity, AdapterRef, parse_ref
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


class CountingSource:
    """A remote source held in memory that counts its calls; `gate` holds every resolve until set."""

    def __init__(self, token: str | None = None) -> None:
        self.files: dict[str, dict[str, bytes]] = {}
        self.versions: dict[str, str] = {}
        self.token = token
        self.resolves = 0
        self.fetches = 0
        self.gate = threading.Event()
        self.gate.set()
        self._lock = threading.Lock()

    def publish(self, adapter_id: str, seed: int, version: str) -> None:
        self.files[adapter_id] = adapter_files(seed)
        self.versions[adapter_id] = version

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        with self._lock:
            self.resolves += 1
        assert self.gate.wait(30), "test gate never opened"
        if self.token is not None and token != self.token:
            raise AdapterAccessDenied(f"adapter {ref}: wrong token")
        if ref.id not in self.files:
            raise AdapterNotFound(f"adapter {ref}: no such adapter")
        return Resolved(version=self.versions[ref.id])

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        with self._lock:
            self.fetches += 1
        for name, data in self.files[ref.id].items():
            (dest / name).write_bytes(data)


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture()
def source() -> CountingSource:
    src = CountingSource()
    for i, name in enumerate("abc"):
        src.publish(name, seed=i, version="v1")
    return src


@pytest.fixture()
def clock() -> Clock:
    return Clock()


@pytest.fixture()
def loader(source: CountingSource, clock: Clock, tmp_path: Path) -> Iterator[AdapterLoader]:
    with AdapterLoader({"mem": source}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30), workers=2,
                       negative_ttl_s=5.0, revalidate_s=30.0, clock=clock) as ldr:
        yield ldr


def ref(name: str) -> AdapterRef:
    return AdapterRef("mem", name)


def test_request_returns_at_once_while_the_source_is_slow(loader: AdapterLoader, source: CountingSource,
                                                          tmp_path: Path) -> None:
    source.gate.clear()
    future = loader.request(ref("a"))
    assert not future.done()  # the caller got its Future while the source is still blocked
    source.gate.set()
    loaded = future.result(timeout=30)
    assert loaded.identity == AdapterIdentity("mem", "a", "v1")
    assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "check")).content_hash
    again = loader.request(ref("a"))
    assert again.done() and again.result() is loaded  # a recent host-tier hit needs no worker


def test_concurrent_requests_share_one_load(loader: AdapterLoader, source: CountingSource) -> None:
    source.gate.clear()
    futures = []
    threads = [threading.Thread(target=lambda: futures.append(loader.request(ref("a")))) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len({id(f) for f in futures}) == 1
    source.gate.set()
    results = {id(f.result(timeout=30)) for f in futures}
    assert len(results) == 1
    assert (source.resolves, source.fetches) == (1, 1)
    stats = loader.stats()
    assert (stats.joined, stats.fetches, stats.parses, stats.in_flight) == (7, 1, 1, 0)


def test_a_failure_is_remembered_for_the_ttl(loader: AdapterLoader, source: CountingSource, clock: Clock) -> None:
    with pytest.raises(AdapterNotFound, match="mem:missing"):
        loader.request(ref("missing")).result(timeout=30)
    clock.now += 4.9
    storm = [loader.request(ref("missing")) for _ in range(20)]
    assert all(f.done() for f in storm)  # answered from memory, at once
    for f in storm:
        with pytest.raises(AdapterNotFound, match="mem:missing"):
            f.result()
    assert source.resolves == 1 and loader.stats().negative_hits == 20
    clock.now += 0.2
    source.publish("missing", seed=7, version="v1")  # it exists now
    assert loader.request(ref("missing")).result(timeout=30).identity.version == "v1"
    assert source.resolves == 2


def test_a_failure_without_the_token_does_not_block_a_request_with_it(tmp_path: Path, clock: Clock) -> None:
    private = CountingSource(token="good")
    private.publish("p", seed=0, version="v1")
    with AdapterLoader({"mem": private}, parse, negative_ttl_s=5.0, clock=clock) as loader:
        with pytest.raises(AdapterAccessDenied):
            loader.request(ref("p")).result(timeout=30)
        with pytest.raises(AdapterAccessDenied):
            loader.request(ref("p"), token="bad").result(timeout=30)
        assert loader.request(ref("p"), token="good").result(timeout=30).identity.version == "v1"
        assert private.fetches == 1  # no disk store: fetched into a temp folder and parsed from there


def test_host_tier_evicts_least_recently_used_beyond_its_byte_budget(source: CountingSource, clock: Clock,
                                                                   tmp_path: Path) -> None:
    size = parse(write_adapter(tmp_path / "one")).size_bytes
    with AdapterLoader({"mem": source}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30),
                       host_bytes=2 * size, clock=clock) as loader:
        for name in "ab":
            loader.request(ref(name)).result(timeout=30)
        loader.request(ref("a")).result(timeout=30)  # a is now more recent than b
        loader.request(ref("c")).result(timeout=30)
        stats = loader.stats()
        assert (stats.host_evictions, stats.host_entries, stats.host_bytes) == (1, 2, 2 * size)
        assert loader.request(ref("a")).done()  # still in the host tier
        again_b = loader.request(ref("b"))
        again_b.result(timeout=30)
        stats = loader.stats()
        # b came back from the disk tier: parsed again, not fetched again.
        assert (stats.fetches, stats.parses, stats.disk_hits) == (3, 4, 1)
        assert source.fetches == 3


def test_an_adapter_larger_than_the_host_budget_is_served_but_not_kept(source: CountingSource,
                                                                        clock: Clock) -> None:
    with AdapterLoader({"mem": source}, parse, host_bytes=10, clock=clock) as loader:
        assert loader.request(ref("a")).result(timeout=30).weights.rank == 4
        assert loader.stats().host_entries == 0


def test_a_new_version_is_noticed_after_revalidate_s(loader: AdapterLoader, source: CountingSource,
                                                      clock: Clock) -> None:
    first = loader.request(ref("a")).result(timeout=30)
    source.publish("a", seed=42, version="v2")
    clock.now += 29
    assert loader.request(ref("a")).result(timeout=30) is first  # trusted for revalidate_s
    clock.now += 2
    second = loader.request(ref("a")).result(timeout=30)
    assert second.identity == AdapterIdentity("mem", "a", "v2")
    assert second.weights.content_hash != first.weights.content_hash
    clock.now += 31
    assert loader.request(ref("a")).result(timeout=30) is second  # same version: host hit after the check
    assert source.fetches == 2


def test_local_adapters_are_rechecked_on_every_request(tmp_path: Path, clock: Clock) -> None:
    folder = write_adapter(tmp_path / "roots" / "mine", seed=1)
    with AdapterLoader({"local": LocalSource((str(tmp_path / "roots"),))}, parse, clock=clock) as loader:
        first = loader.request(AdapterRef("local", "mine")).result(timeout=30)
        assert first.path == folder.resolve()
        assert loader.request(AdapterRef("local", "mine")).result(timeout=30) is first
        write_adapter(folder, seed=2)
        second = loader.request(AdapterRef("local", "mine")).result(timeout=30)
        assert second.identity != first.identity
        assert second.weights.content_hash != first.weights.content_hash
        stats = loader.stats()
        assert (stats.parses, stats.fetches, stats.host_hits) == (2, 0, 1)


def test_the_disk_tier_outlives_the_loader(source: CountingSource, clock: Clock, tmp_path: Path) -> None:
    for _ in range(2):  # the second loader is a restarted server: same disk store, empty host tier
        with AdapterLoader({"mem": source}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30),
                           clock=clock) as loader:
            assert loader.request(ref("a")).result(timeout=30).weights.rank == 4
    assert (source.resolves, source.fetches) == (2, 1)


def test_an_entry_that_does_not_parse_is_dropped_from_disk(source: CountingSource, clock: Clock,
                                                           tmp_path: Path) -> None:
    source.files["a"][SAFETENSORS_FILE] = b"\x00" * 64  # present and non-empty, but not safetensors
    disk = DiskStore(tmp_path / "disk", 1 << 30)
    with AdapterLoader({"mem": source}, parse, disk=disk, negative_ttl_s=0.0, clock=clock) as loader:
        with pytest.raises(AdapterInvalid, match="mem:a"):
            loader.request(ref("a")).result(timeout=30)
        assert disk.get(AdapterIdentity("mem", "a", "v1")) is None
        source.publish("a", seed=0, version="v1")  # the source's bytes were fine after all
        assert loader.request(ref("a")).result(timeout=30).weights.rank == 4
        assert source.fetches == 2


def test_an_unknown_source_is_not_found(loader: AdapterLoader) -> None:
    with pytest.raises(AdapterNotFound, match="unknown adapter source 'ftp'"):
        loader.request(AdapterRef("ftp", "x")).result(timeout=30)


def test_from_config_keeps_fetched_adapters_under_loraplex_home(monkeypatch: pytest.MonkeyPatch,
                                                                tmp_path: Path) -> None:
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    write_adapter(tmp_path / "roots" / "mine")
    config = AdapterSourceConfig(sources=("local", "s3"), adapter_roots=(str(tmp_path / "roots"),),
                                 negative_ttl_s=0.0)
    with AdapterLoader.from_config(config, parse) as loader:
        assert loader.request(AdapterRef("local", "mine")).result(timeout=30).weights.rank == 4
        with pytest.raises(AdapterNotFound, match="not by path"):
            loader.request(AdapterRef("local", str(tmp_path))).result(timeout=30)
        with pytest.raises(AdapterNotFound, match="unknown adapter source 'hub'"):
            loader.request(AdapterRef("hub", "org/name")).result(timeout=30)
    assert (tmp_path / "home" / "adapters" / "entries").is_dir()


@pytest.mark.usefixtures("two_torch_threads")
def test_loader_threads_parse_on_one_torch_thread(source: CountingSource, tmp_path: Path) -> None:
    # A loader thread with an OpenMP team of its own would slow every step of the model (loraplex.runtime).
    seen: list[int] = []

    def parse_and_count(path: Path) -> AdapterWeights:
        seen.append(torch.get_num_threads())
        return parse(path)

    with AdapterLoader({"mem": source}, parse_and_count, disk=DiskStore(tmp_path / "disk", 1 << 30)) as loader:
        loader.request(ref("a")).result(timeout=30)
    assert seen == [1]


def test_a_load_in_flight_is_joined_only_with_the_same_token(tmp_path: Path, clock: Clock) -> None:
    # A request without the token must not ride on a load started with it (nor the other way round).
    private = CountingSource(token="good")
    private.publish("p", seed=0, version="v1")
    private.gate.clear()
    with AdapterLoader({"mem": private}, parse, negative_ttl_s=5.0, clock=clock) as loader:
        authorised = loader.request(ref("p"), token="good")
        anonymous = loader.request(ref("p"))
        wrong = loader.request(ref("p"), token="bad")
        assert len({id(authorised), id(anonymous), id(wrong)}) == 3
        assert loader.request(ref("p"), token="good") is authorised  # the same token joins
        private.gate.set()
        assert authorised.result(timeout=30).identity.version == "v1"
        for future in (anonymous, wrong):
            with pytest.raises(AdapterAccessDenied):
                future.result(timeout=30)


class BrokenSource:
    """A source whose library raises something outside the AdapterError family."""

    def __init__(self) -> None:
        self.resolves = 0

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        self.resolves += 1
        raise OSError(36, "File name too long", "/srv/secret/root/" + ref.id)

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        raise AssertionError("never fetched")


def test_an_unexpected_error_fails_the_load_as_an_adapter_error(clock: Clock) -> None:
    # The waiter gets an AdapterError naming the adapter (HTTP 424), without the library's host path,
    # and the failure is remembered like any other.
    broken = BrokenSource()
    with AdapterLoader({"mem": broken}, parse, negative_ttl_s=5.0, clock=clock) as loader:
        for _ in range(2):
            with pytest.raises(AdapterFetchError, match="mem:x") as info:
                loader.request(ref("x")).result(timeout=30)
            assert "/srv/secret" not in str(info.value) and "OSError" in str(info.value)
        assert broken.resolves == 1 and loader.stats().in_flight == 0


def test_a_parse_error_names_the_adapter_not_its_folder(tmp_path: Path, clock: Clock) -> None:
    root = tmp_path / "roots"
    write_adapter(root / "team" / "bad")
    (root / "team" / "bad" / SAFETENSORS_FILE).write_bytes(b"\x00" * 64)
    with AdapterLoader({"local": LocalSource((str(root),))}, parse, clock=clock) as loader, \
            pytest.raises(AdapterInvalid, match="local:team/bad") as info:
        loader.request(AdapterRef("local", "team/bad")).result(timeout=30)
    assert str(tmp_path) not in str(info.value) and SAFETENSORS_FILE in str(info.value)


def test_every_spelling_of_a_local_folder_is_one_host_entry(tmp_path: Path, clock: Clock) -> None:
    root = tmp_path / "roots"
    write_adapter(root / "upper")
    (root / "alias").symlink_to(root / "upper")
    with AdapterLoader({"local": LocalSource((str(root),))}, parse, clock=clock) as loader:
        loaded = [loader.request(parse_ref(i, "local", local_paths=False)).result(timeout=30)
                  for i in ("upper", "./upper", "upper/", "alias")]
        assert {a.identity.id for a in loaded} == {"upper"}
        assert all(a is loaded[0] for a in loaded)
        assert loader.stats().host_entries == 1 and loader.stats().parses == 1


def test_replicas_with_their_own_copies_of_an_adapter_name_it_alike(tmp_path: Path, clock: Clock) -> None:
    # Two replicas, each with its own copy of the adapter (a synced volume: other mtimes). The identity
    # (and so the prefix cache key, the disk tier entry, the admin listing) is the content's, the same on
    # both; a change of the files is seen by both at their next request (local adapters are rechecked
    # on every request), and a touch alone changes nothing.
    import os
    import shutil

    first = write_adapter(tmp_path / "replica-a" / "mine", seed=1)
    second = tmp_path / "replica-b" / "mine"
    shutil.copytree(first, second)
    for f in second.iterdir():
        os.utime(f, ns=(1, 1))  # the copy's own times
    sources = [LocalSource((str(tmp_path / r),)) for r in ("replica-a", "replica-b")]
    with AdapterLoader({"local": sources[0]}, parse, clock=clock) as a, \
            AdapterLoader({"local": sources[1]}, parse, clock=clock) as b:
        mine = AdapterRef("local", "mine")
        ia, ib = (loader.request(mine).result(timeout=30).identity for loader in (a, b))
        assert ia == ib and ia.version.startswith("sha256-")
        for folder in (first, second):
            write_adapter(folder, seed=2)
        ja, jb = (loader.request(mine).result(timeout=30).identity for loader in (a, b))
        assert ja == jb != ia
        for f in second.iterdir():
            os.utime(f, ns=(2, 2))
        assert b.request(mine).result(timeout=30).identity == jb


def test_a_local_version_reads_the_contents_once_per_change(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_adapter(tmp_path / "root" / "mine", seed=1)
    source = LocalSource((str(tmp_path / "root"),))
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(self.name)
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", counting_open)
    versions = {source.resolve(AdapterRef("local", "mine"), None).version for _ in range(5)}
    assert len(versions) == 1 and len(opened) == len(list(folder.iterdir()))
    write_adapter(folder, seed=3)
    assert source.resolve(AdapterRef("local", "mine"), None).version not in versions
