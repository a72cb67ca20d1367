"""The adapter exchange: sources (local, hub, s3) → disk tier → asynchronous loader with a host tier."""

from loraplex.adapters.disk_store import DiskStats, DiskStore
from loraplex.adapters.loader import AdapterLoader, LoadedAdapter, LoaderStats
from loraplex.adapters.ref import AdapterIdentity, AdapterRef, parse_ref
from loraplex.adapters.sources import AdapterSource, Resolved, build_sources, register_source, source_names

__all__ = [
    "AdapterIdentity",
    "AdapterLoader",
    "AdapterRef",
    "AdapterSource",
    "DiskStats",
    "DiskStore",
    "LoadedAdapter",
    "LoaderStats",
    "Resolved",
    "build_sources",
    "parse_ref",
    "register_source",
    "source_names",
]
