"""What a request names (AdapterRef) and what was actually loaded for it (AdapterIdentity).

A ref is the user's words: a source, an id and maybe a revision (a branch or tag can move). An identity
pins a version: the hub's commit sha, the S3 objects' ETags, or a local folder's content digest. The prefix
cache, the slot table and the metrics key on identities, so a changed adapter under the same name is a
different adapter. Tokens are never part of either: they travel beside the ref and are never logged.

`parse_ref` is the one gate every adapter id passes (API fields, merged parts, admin routes, preloaded
ids, the offline API): it refuses what no source could serve (control characters, overlong ids, `..`,
text that breaks the source's naming rules) with AdapterIdInvalid (HTTP 422), before any file system
or network call, and spells what it accepts one way, so `upper`, `./upper` and `upper/` are one ref.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

S3_SCHEME = "s3://"
MAX_ADAPTER_ID_CHARS = 256
"""Longest adapter id accepted (a hub id is at most 96 characters, an S3 bucket 63; a folder name 255 bytes)."""
_SHOWN_CHARS = 40  # how much of a refused id an error message quotes

# A local name's path segment: no leading dot (hidden folders, `..`), nothing a shell or URL treats specially.
_LOCAL_SEGMENT = re.compile(r"[A-Za-z0-9_@+-][A-Za-z0-9_.@+-]*")
# huggingface_hub's REPO_ID_REGEX: alphanumerics, `-`, `_`, `.`, not starting or ending with `-` or `.`.
_HUB_NAME = re.compile(r"\b[\w.-]{1,96}\b")
# A git ref or commit as the hub takes one (`main`, `v1.2`, `refs/pr/3`, a sha).
_HUB_REVISION = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./-]{0,127}")
# S3's bucket naming rules (general purpose buckets): 3-63 lowercase letters, digits, dots and hyphens.
_S3_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


class AdapterIdInvalid(ValueError):
    """An adapter id that no source can serve, or a source a request may not name (HTTP 422)."""


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

    @property
    def request_id(self) -> str:
        """The `adapter_id` that, with `adapter_source` = this ref's source, parses back to this ref."""
        return self.id + (f"@{self.revision}" if self.revision else "")


@dataclass(frozen=True)
class AdapterIdentity:
    source: str
    id: str
    version: str
    """Hub commit sha, digest of the S3 ETags, or digest of a local folder's file names and contents."""

    def __str__(self) -> str:
        return f"{self.source}:{self.id}#{self.version[:12]}"


def parse_ref(adapter_id: str, source: str | None = None, default_source: str = "local", *,
              local_paths: bool = True) -> AdapterRef:
    """The ref that an API's (`adapter_id`, `adapter_source`) pair names, checked and in canonical spelling.

    `s3://bucket/prefix` selects the s3 source whatever the default; a hub id may end in `@revision`.
    Local ids are names under the adapter roots (`team/name`); `local_paths` also accepts absolute
    paths and any printable folder name, for the offline API, whose adapters are plain folders. A
    server passes False: it serves local adapters by name from its roots only.
    Raises AdapterIdInvalid naming the id.
    """
    if not isinstance(adapter_id, str) or not adapter_id:
        raise AdapterIdInvalid(f"an adapter id must be a non-empty string, got {adapter_id!r}")
    if len(adapter_id) > MAX_ADAPTER_ID_CHARS:
        raise AdapterIdInvalid(f"adapter id {shown_id(adapter_id)} has {len(adapter_id)} characters; at most "
                               f"{MAX_ADAPTER_ID_CHARS} are allowed")
    if not adapter_id.isprintable():
        raise AdapterIdInvalid(f"adapter id {shown_id(adapter_id)} contains control characters")
    if source is None:
        source = "s3" if adapter_id.startswith(S3_SCHEME) else default_source
    if source == "local":
        return AdapterRef("local", _local_id(adapter_id, local_paths))
    if source == "hub":
        repo, at, revision = adapter_id.rpartition("@")
        if not at:
            repo, revision = adapter_id, ""
        return AdapterRef("hub", _hub_id(repo, adapter_id), _hub_revision(revision, adapter_id) or None)
    if source == "s3":
        return AdapterRef("s3", _s3_id(adapter_id.removeprefix(S3_SCHEME), adapter_id))
    return AdapterRef(source, adapter_id)  # a registered source: its own naming rules, checked when it resolves


def shown_id(adapter_id: str) -> str:
    """An adapter id as an error message or a log line quotes it (ids come from clients): escaped, so no
    control character reaches a log, and cut short."""
    return repr(adapter_id[:_SHOWN_CHARS]) + ("..." if len(adapter_id) > _SHOWN_CHARS else "")


def _segments(path: str, adapter_id: str) -> list[str]:
    """`path`'s '/'-separated names, without empty and `.` ones (`./a//b/` is `a/b`); `..` is refused."""
    parts = [p for p in path.split("/") if p not in ("", ".")]
    if ".." in parts:
        raise AdapterIdInvalid(f"adapter id {shown_id(adapter_id)} may not contain '..'")
    if not parts:
        raise AdapterIdInvalid(f"adapter id {shown_id(adapter_id)} names no folder")
    return parts


def _local_id(adapter_id: str, paths: bool) -> str:
    absolute = adapter_id.startswith(("/", "~"))
    if absolute and not paths:
        raise AdapterIdInvalid(f"local adapter {shown_id(adapter_id)} is a path; this server serves local adapters "
                               f"by name (a folder under its adapter roots, e.g. 'team/name')")
    parts = _segments(adapter_id, adapter_id)
    if not paths:
        bad = next((p for p in parts if not _LOCAL_SEGMENT.fullmatch(p)), None)
        if bad is not None:
            raise AdapterIdInvalid(f"local adapter id {shown_id(adapter_id)}: the name {shown_id(bad)} may use only "
                                   f"letters, digits and '_', '-', '.', '+', '@', and may not start with '.'")
    return ("/" if adapter_id.startswith("/") else "") + "/".join(parts)


def _hub_id(repo: str, adapter_id: str) -> str:
    names = repo.split("/")
    if not 1 <= len(names) <= 2 or len(repo) > 96 or not all(_HUB_NAME.fullmatch(n) for n in names) \
            or "--" in repo or ".." in repo or repo.endswith(".git"):
        raise AdapterIdInvalid(f"hub adapter id {shown_id(adapter_id)} is not a Hugging Face repo id: 'org/name' "
                               f"(letters, digits, '-', '_', '.', at most 96 characters) with an optional "
                               f"'@revision'")
    return repo


def _hub_revision(revision: str, adapter_id: str) -> str:
    if revision and (not _HUB_REVISION.fullmatch(revision) or ".." in revision or revision.endswith(("/", ".lock"))):
        raise AdapterIdInvalid(f"hub adapter id {shown_id(adapter_id)}: {shown_id(revision)} is not a branch, tag "
                               f"or commit name")
    return revision


def _s3_id(path: str, adapter_id: str) -> str:
    bucket, _, prefix = path.partition("/")
    if not _S3_BUCKET.fullmatch(bucket) or ".." in bucket:
        raise AdapterIdInvalid(f"s3 adapter id {shown_id(adapter_id)}: {shown_id(bucket)} is not an S3 bucket name "
                               f"(3-63 lowercase letters, digits, '.' and '-')")
    if not prefix.strip("/"):
        return bucket
    if "//" in prefix.strip("/") or any(p in (".", "..") for p in prefix.split("/")):
        raise AdapterIdInvalid(f"s3 adapter id {shown_id(adapter_id)}: the prefix may not hold empty, '.' or '..' parts")
    return f"{bucket}/{prefix.strip('/')}"
