"""What a request names (AdapterRef) and what was actually loaded for it (AdapterIdentity).

A ref is the user's words: a source, an id and maybe a revision (a branch or tag can move). An identity
pins a version: the hub's commit sha, the S3 objects' ETags, or a local folder's file stamp. The prefix
cache, the slot table and the metrics key on identities, so a changed adapter under the same name is a
different adapter. Tokens are never part of either: they travel beside the ref and are never logged.
"""

from __future__ import annotations

from dataclasses import dataclass

S3_SCHEME = "s3://"


@dataclass(frozen=True)
class AdapterRef:
    source: str
    """Registry name of the source: `local`, `hub`, `s3` or one registered by the user."""
    id: str
    """Source-specific: a folder (local), `org/name` (hub), `bucket/prefix` (s3)."""
    revision: str | None = None
    """Hub branch, tag or commit; None for the default branch. Other sources take none."""

    def __str__(self) -> str:
        return f"{self.source}:{self.id}" + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class AdapterIdentity:
    source: str
    id: str
    version: str
    """Hub commit sha, digest of the S3 ETags, or digest of a local folder's file stamp."""

    def __str__(self) -> str:
        return f"{self.source}:{self.id}#{self.version[:12]}"


def parse_ref(adapter_id: str, source: str | None = None, default_source: str = "local") -> AdapterRef:
    """The ref that an API's (`adapter_id`, `adapter_source`) pair names.

    `s3://bucket/prefix` selects the s3 source whatever the default; a hub id may end in `@revision`.
    """
    if source is None:
        source = "s3" if adapter_id.startswith(S3_SCHEME) else default_source
    if source == "s3" and adapter_id.startswith(S3_SCHEME):
        adapter_id = adapter_id[len(S3_SCHEME):]
    revision = None
    if source == "hub" and "@" in adapter_id:
        adapter_id, revision = adapter_id.rsplit("@", 1)
    return AdapterRef(source, adapter_id, revision or None)
