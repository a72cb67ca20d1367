"""The adapter a request names, the check every adapter id from a client passes, and the local
adapters a server can list."""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass, field
from pathlib import Path

from loraplex.adapters.ref import AdapterIdInvalid, AdapterRef, parse_ref
from loraplex.lora.adapter import CONFIG_FILE
from loraplex.lora.merge import MergeSpec


@dataclass(frozen=True)
class AdapterSpec:
    id: str
    source: str = "local"
    token: str | None = field(default=None, repr=False)
    merge: MergeSpec | None = None
    """A weighted merge of several adapters (`id` is then a label for metrics)."""


def request_ref(adapter_id: str, source: str | None, default_source: str, allowed: Collection[str]) -> AdapterRef:
    """The ref a client's (`adapter_id`, `adapter_source`) names, in canonical spelling: every API entry
    point (native, OpenAI `model`, merged parts, admin routes) goes through here before the engine.

    Local adapters are names under the server's roots, never paths; a source other than the server's
    own `default_source` must be in `allowed` (`--allow-request-sources`). AdapterIdInvalid (422) otherwise.
    """
    ref = parse_ref(adapter_id, source, default_source, local_paths=False)
    if ref.source != default_source and ref.source not in allowed:
        raise AdapterIdInvalid(f"adapter source {ref.source!r} is not enabled for requests on this server; "
                               f"requests may name {sorted({default_source, *allowed})}")
    return ref


def local_adapter_names(roots: tuple[str, ...] | None) -> list[str]:
    """Adapter ids found under the local roots (folders holding an adapter_config.json, one level deep)
    that a request can name."""
    names: list[str] = []
    for root in map(Path, roots or ()):
        if root.is_dir():
            names += sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}")
                            if p.parent.name not in names and _nameable(p.parent.name))
    return names


def _nameable(name: str) -> bool:
    try:
        return parse_ref(name, "local", local_paths=False).id == name
    except AdapterIdInvalid:
        return False
