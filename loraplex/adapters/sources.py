"""Where adapter folders come from: the source protocol and the registry of sources by name.

A source answers two questions. `resolve` says which version a ref names now (cheap: a stat, one
metadata request) and, for sources whose files are already on this machine, where they are. `fetch`
writes that version's files into an empty folder; the disk store gives it a temp folder and renames
it into place only when complete. Sources map their library's errors onto the AdapterError family
(AdapterNotFound, AdapterAccessDenied, AdapterFetchError, AdapterInvalid), naming the adapter.

Built-in sources are `local`, `hub` and `s3`; `register_source` adds more (a factory taking the
AdapterSourceConfig). Factories import their client library only when called.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from loraplex.adapters.ref import AdapterRef
from loraplex.config import AdapterSourceConfig


@dataclass(frozen=True)
class Resolved:
    version: str
    """What the identity pins: commit sha, ETag digest, a local folder's content digest."""
    path: Path | None = None
    """The adapter folder when it is already on this machine (no fetch, no disk tier)."""
    ttl_s: float | None = None
    """How long this answer may be reused before asking again: None, the loader's revalidate_s; 0 for a
    cheap check (a stat); math.inf when the ref can never name another version (a pinned commit)."""
    id: str | None = None
    """The adapter's canonical id when several spellings reach one adapter (a local folder through a
    symlink, say), so they share one identity; None: the ref's id."""


class AdapterSource(Protocol):
    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        """The version `ref` names now; raises AdapterNotFound / AdapterAccessDenied / AdapterFetchError."""
        ...

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        """Write the files of `resolved` into the existing empty folder `dest` (only when resolved.path is None)."""
        ...


SourceFactory = Callable[[AdapterSourceConfig], AdapterSource]


def _local(config: AdapterSourceConfig) -> AdapterSource:
    from loraplex.adapters.local_source import LocalSource

    return LocalSource(config.adapter_roots)


def _hub(config: AdapterSourceConfig) -> AdapterSource:
    from loraplex.adapters.hub_source import HubSource

    return HubSource(config)


def _s3(config: AdapterSourceConfig) -> AdapterSource:
    from loraplex.adapters.s3_source import S3Source

    return S3Source(config)


_REGISTRY: dict[str, SourceFactory] = {"local": _local, "hub": _hub, "s3": _s3}


def register_source(name: str, factory: SourceFactory) -> None:
    """Make `name` usable as an adapter source; a later registration under the same name replaces it."""
    if not name or not name.isidentifier():
        raise ValueError(f"adapter source names are identifiers, got {name!r}")
    _REGISTRY[name] = factory


def source_names() -> tuple[str, ...]:
    return tuple(sorted(_REGISTRY))


def build_sources(config: AdapterSourceConfig) -> dict[str, AdapterSource]:
    """One instance of each source that `config.sources` enables."""
    unknown = [name for name in config.sources if name not in _REGISTRY]
    if unknown:
        raise ValueError(f"unknown adapter sources {unknown}; registered: {list(source_names())}")
    return {name: _REGISTRY[name](config) for name in config.sources}


def fetch_error_detail(error: Exception) -> str:
    """What a client is told of a remote source's failure. An OSError's text names local files (the disk
    cache, a temp folder), so only its kind and reason go out; the log has the rest."""
    if isinstance(error, OSError):
        return f"{type(error).__name__}: {error.strerror or 'I/O error'}"
    return f"{type(error).__name__}: {error}"
