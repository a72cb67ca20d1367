"""The adapter a request names, and the local adapters a server can list."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraplex.lora.adapter import CONFIG_FILE
from loraplex.lora.merge import MergeSpec


@dataclass(frozen=True)
class AdapterSpec:
    id: str
    source: str = "local"
    token: str | None = field(default=None, repr=False)
    merge: MergeSpec | None = None
    """A weighted merge of several adapters (`id` is then a label for metrics)."""


def local_adapter_names(roots: tuple[str, ...] | None) -> list[str]:
    """Adapter ids found under the local roots (folders holding an adapter_config.json, one level deep)."""
    names: list[str] = []
    for root in map(Path, roots or ()):
        if root.is_dir():
            names += sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}") if p.parent.name not in names)
    return names
