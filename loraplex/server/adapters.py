"""Which adapter folder an API request's `adapter_id` names.

A request never names a path on the server's disk directly: ids are looked up under the configured
adapter roots (the bundled examples first), and an id that does not resolve inside a root is unknown.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from loraplex.lora.adapter import CONFIG_FILE, AdapterNotFound


@dataclass(frozen=True)
class AdapterSpec:
    id: str
    source: str = "local"
    token: str | None = field(default=None, repr=False)


class AdapterResolver:
    def __init__(self, roots: list[Path]) -> None:
        self.roots = [r.resolve() for r in roots]

    def known(self) -> list[str]:
        """Adapter ids found under the roots (folders holding an adapter_config.json, one level deep)."""
        names: list[str] = []
        for root in self.roots:
            if root.is_dir():
                names += sorted(p.parent.name for p in root.glob(f"*/{CONFIG_FILE}") if p.parent.name not in names)
        return names

    async def resolve(self, spec: AdapterSpec) -> str:
        if spec.source != "local":
            raise AdapterNotFound(f"adapter {spec.id!r}: source {spec.source!r} is not available on this server")
        parts = Path(spec.id).parts
        if not parts or Path(spec.id).is_absolute() or ".." in parts:
            raise AdapterNotFound(f"adapter {spec.id!r} not found: ids are names under the adapter roots")
        for root in self.roots:
            folder = (root / spec.id).resolve()
            if folder.is_relative_to(root) and (folder / CONFIG_FILE).is_file():
                return str(folder)
        raise AdapterNotFound(f"adapter {spec.id!r} not found under the adapter roots")
