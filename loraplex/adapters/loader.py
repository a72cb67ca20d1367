"""Asynchronous adapter loading: source → disk tier → parse → host tier, on worker threads.

`request(ref, token)` never blocks on I/O: it answers from memory (a host-tier hit whose version was
checked recently, or a recent failure) with a finished Future, joins the load already in flight for
the same ref (single-flight), or starts one on a worker and returns its Future. Only `.result()` waits.

A load resolves the ref's current version with its source, so an adapter changed under the same name
gets a new identity and is parsed afresh; an unchanged one comes from the host tier. A remote adapter
is fetched into the disk store once per version. A failed load is remembered for `negative_ttl_s`, so
a storm of requests for a broken adapter asks its source once. The host tier holds parsed adapters
within a byte budget, least recently used first out.

In-flight loads and remembered failures are keyed by the ref and a digest of the token, so a request
without a valid token never shares another request's authorised fetch or its failure. Once parsed,
an adapter is served from the host tier to any caller: access control is the server's (auth.py).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from loraplex.adapters.disk_store import DiskStore
from loraplex.adapters.ref import AdapterIdentity, AdapterRef
from loraplex.adapters.sources import AdapterSource, build_sources
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import AdapterError, AdapterFetchError, AdapterNotFound, AdapterWeights
from loraplex.paths import loraplex_home
from loraplex.runtime import use_one_torch_thread

log = logging.getLogger(__name__)
_T = TypeVar("_T")
_FlightKey = tuple[AdapterRef, str | None]  # (ref, token digest)


@dataclass(frozen=True)
class LoadedAdapter:
    identity: AdapterIdentity
    weights: AdapterWeights
    path: Path
    """The folder it was parsed from (the local folder, a disk-tier entry, or a removed temp folder)."""


@dataclass(frozen=True)
class LoaderStats:
    requests: int
    host_hits: int            # requests answered from the host tier (parsed adapters)
    host_misses: int
    host_evictions: int
    host_entries: int
    host_bytes: int
    disk_hits: int            # loads parsed from a disk-tier entry
    disk_misses: int
    disk_evictions: int
    disk_entries: int
    disk_bytes: int
    fetches: int              # downloads from a remote source into the disk tier
    fetch_seconds: float
    parses: int
    parse_seconds: float
    resolves: int             # version checks with a source
    resolve_seconds: float
    failures: int
    negative_hits: int        # requests answered from a remembered failure
    joined: int               # requests that joined a load already in flight
    in_flight: int

    def as_dict(self) -> dict[str, float]:
        return dataclasses.asdict(self)


class AdapterLoader:
    def __init__(self, sources: Mapping[str, AdapterSource], parse: Callable[[Path], AdapterWeights], *,
                 disk: DiskStore | None = None, host_bytes: int = 4 << 30, workers: int = 2,
                 negative_ttl_s: float = 5.0, revalidate_s: float = 30.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if host_bytes < 0:
            raise ValueError(f"host_bytes must be >= 0, got {host_bytes}")
        if workers < 1:
            raise ValueError(f"workers must be >= 1, got {workers}")
        if negative_ttl_s < 0 or revalidate_s < 0:
            raise ValueError(f"negative_ttl_s and revalidate_s must be >= 0, got {negative_ttl_s}, {revalidate_s}")
        self._sources = dict(sources)
        self._parse = parse
        self._disk = disk
        self.host_bytes = host_bytes
        self.negative_ttl_s = negative_ttl_s
        self.revalidate_s = revalidate_s
        self._clock = clock
        # Loader threads parse and pack tensors on their own thread, leaving OpenMP to the model's thread.
        self._pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="adapter-loader",
                                        initializer=use_one_torch_thread)
        # One lock for all the state below; it is never held across I/O, so request() never waits on I/O.
        self._lock = threading.Lock()
        self._host: OrderedDict[AdapterIdentity, LoadedAdapter] = OrderedDict()
        self._host_used = 0
        self._resolved: dict[AdapterRef, tuple[AdapterIdentity, float]] = {}  # ref → (identity, trusted until)
        self._in_flight: dict[_FlightKey, Future[LoadedAdapter]] = {}
        self._failed: dict[_FlightKey, tuple[AdapterError, float]] = {}   # → (error, remembered until)
        self._counts = dict.fromkeys(("requests", "host_hits", "host_misses", "host_evictions", "fetches",
                                      "parses", "resolves", "failures", "negative_hits", "joined"), 0)
        self._seconds = dict.fromkeys(("fetch", "parse", "resolve"), 0.0)

    @classmethod
    def from_config(cls, config: AdapterSourceConfig, parse: Callable[[Path], AdapterWeights]) -> AdapterLoader:
        root = Path(config.disk_cache_dir).expanduser() if config.disk_cache_dir else loraplex_home() / "adapters"
        return cls(build_sources(config), parse, disk=DiskStore(root, config.disk_cache_bytes),
                   host_bytes=config.host_cache_bytes, workers=config.loader_workers,
                   negative_ttl_s=config.negative_ttl_s, revalidate_s=config.revalidate_s)

    def request(self, ref: AdapterRef, token: str | None = None) -> Future[LoadedAdapter]:
        """The adapter `ref` names, as a Future; raises (through the Future) an AdapterError naming it."""
        key = (ref, _token_digest(token))
        now = self._clock()
        with self._lock:
            self._counts["requests"] += 1
            resolved = self._resolved.get(ref)
            if resolved is not None and now < resolved[1] and resolved[0] in self._host:
                self._host.move_to_end(resolved[0])
                self._counts["host_hits"] += 1
                return _done(self._host[resolved[0]])
            failed = self._failed.get(key)
            if failed is not None and now < failed[1]:
                self._counts["negative_hits"] += 1
                return _failed(failed[0])
            pending = self._in_flight.get(key)
            if pending is not None:
                self._counts["joined"] += 1
                return pending
            future = self._pool.submit(self._load, ref, token, key)
            self._in_flight[key] = future
            return future

    def stats(self) -> LoaderStats:
        disk = self._disk.stats() if self._disk is not None else None
        with self._lock:
            c, s = self._counts, self._seconds
            return LoaderStats(
                requests=c["requests"], host_hits=c["host_hits"], host_misses=c["host_misses"],
                host_evictions=c["host_evictions"], host_entries=len(self._host), host_bytes=self._host_used,
                disk_hits=disk.hits if disk else 0, disk_misses=disk.misses if disk else 0,
                disk_evictions=disk.evictions if disk else 0, disk_entries=disk.entries if disk else 0,
                disk_bytes=disk.bytes_resident if disk else 0,
                fetches=c["fetches"], fetch_seconds=s["fetch"], parses=c["parses"], parse_seconds=s["parse"],
                resolves=c["resolves"], resolve_seconds=s["resolve"], failures=c["failures"],
                negative_hits=c["negative_hits"], joined=c["joined"], in_flight=len(self._in_flight))

    def host_entries(self) -> list[LoadedAdapter]:
        """The parsed adapters in the host tier, least recently used first."""
        with self._lock:
            return list(self._host.values())

    def cached(self, ref: AdapterRef) -> LoadedAdapter | None:
        """The host tier's entry for the version `ref` last resolved to, without any I/O."""
        with self._lock:
            resolved = self._resolved.get(ref)
            return self._host.get(resolved[0]) if resolved is not None else None

    def forget(self, identity: AdapterIdentity) -> bool:
        """Drop an adapter from the host tier (requests that hold it keep their copy); False if absent."""
        with self._lock:
            loaded = self._host.pop(identity, None)
            if loaded is None:
                return False
            self._host_used -= loaded.weights.size_bytes
            self._resolved = {r: v for r, v in self._resolved.items() if v[0] != identity}
            return True

    def close(self) -> None:
        """Stop the workers; loads not yet started are cancelled."""
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __enter__(self) -> AdapterLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _load(self, ref: AdapterRef, token: str | None, key: _FlightKey) -> LoadedAdapter:
        try:
            return self._load_uncached(ref, token)
        except Exception as e:
            # Whatever went wrong, it is this adapter's failure: waiters get an AdapterError (HTTP 424),
            # not a bare OSError that would look like the server's; the details go to the log only.
            error = e if isinstance(e, AdapterError) else AdapterFetchError(
                f"adapter {ref}: loading failed ({type(e).__name__}); the server log has the details")
            if error is not e:
                log.error("loading adapter %s failed", ref, exc_info=e)
            with self._lock:
                self._counts["failures"] += 1
                now = self._clock()
                self._failed = {k: v for k, v in self._failed.items() if now < v[1]}
                if self.negative_ttl_s > 0:
                    self._failed[key] = (error, now + self.negative_ttl_s)
            if error is e:
                raise
            raise error from e
        finally:
            # After the host tier or the failure memory is updated, so a request arriving now finds either.
            with self._lock:
                self._in_flight.pop(key, None)

    def _load_uncached(self, ref: AdapterRef, token: str | None) -> LoadedAdapter:
        source = self._sources.get(ref.source)
        if source is None:
            raise AdapterNotFound(f"adapter {ref}: unknown adapter source {ref.source!r}; "
                                  f"this server has {sorted(self._sources)}")
        start = time.perf_counter()
        resolved = source.resolve(ref, token)
        identity = AdapterIdentity(ref.source, resolved.id or ref.id, resolved.version)
        ttl = self.revalidate_s if resolved.ttl_s is None else resolved.ttl_s
        with self._lock:
            self._counts["resolves"] += 1
            self._seconds["resolve"] += time.perf_counter() - start
            self._resolved[ref] = (identity, self._clock() + ttl)  # inf for a pinned version
            cached = self._host.get(identity)
            if cached is not None:
                self._host.move_to_end(identity)
                self._counts["host_hits"] += 1
                return cached
            self._counts["host_misses"] += 1
        if resolved.path is not None:
            return self._parse_into_host(ref, identity, resolved.path, from_disk=False)
        if self._disk is None:
            with tempfile.TemporaryDirectory(prefix="loraplex-adapter-") as folder:
                self._timed_fetch(lambda: source.fetch(ref, resolved, token, Path(folder)))
                return self._parse_into_host(ref, identity, Path(folder), from_disk=False)
        disk = self._disk
        path = disk.get(identity)
        if path is None:
            path = self._timed_fetch(lambda: disk.put(identity, lambda dest: source.fetch(ref, resolved, token, dest)))
        return self._parse_into_host(ref, identity, path, from_disk=True)

    def _timed_fetch(self, fetch: Callable[[], _T]) -> _T:
        start = time.perf_counter()
        result = fetch()
        with self._lock:
            self._counts["fetches"] += 1
            self._seconds["fetch"] += time.perf_counter() - start
        return result

    def _parse_into_host(self, ref: AdapterRef, identity: AdapterIdentity, path: Path,
                         from_disk: bool) -> LoadedAdapter:
        start = time.perf_counter()
        try:
            weights = self._parse(path)
        except AdapterError as e:
            if from_disk and self._disk is not None:
                self._disk.discard(identity)  # so a later attempt fetches it again rather than trusting it
            # The parser names files by path; a client is told the adapter's id, never where it lives.
            raise type(e)(f"adapter {ref}: {str(e).replace(str(path), ref.id)}") from e
        loaded = LoadedAdapter(identity, weights, path)
        with self._lock:
            self._counts["parses"] += 1
            self._seconds["parse"] += time.perf_counter() - start
            self._admit(loaded)
        return loaded

    def _admit(self, loaded: LoadedAdapter) -> None:
        """Into the host tier, evicting least recently used adapters beyond the budget (lock held)."""
        size = loaded.weights.size_bytes  # float32 tensors: sum of numel * 4
        if size > self.host_bytes or loaded.identity in self._host:
            return
        self._host[loaded.identity] = loaded
        self._host_used += size
        while self._host_used > self.host_bytes:
            old, evicted = self._host.popitem(last=False)
            self._host_used -= evicted.weights.size_bytes
            self._counts["host_evictions"] += 1
            self._resolved = {r: v for r, v in self._resolved.items() if v[0] != old}


def _token_digest(token: str | None) -> str | None:
    return hashlib.sha256(token.encode()).hexdigest()[:16] if token else None


def _done(loaded: LoadedAdapter) -> Future[LoadedAdapter]:
    future: Future[LoadedAdapter] = Future()
    future.set_result(loaded)
    return future


def _failed(error: AdapterError) -> Future[LoadedAdapter]:
    # A fresh exception per request: one shared instance would gather every raiser's traceback.
    copy = type(error)(*error.args)
    copy.__cause__ = error.__cause__
    future: Future[LoadedAdapter] = Future()
    future.set_exception(copy)
    return future
