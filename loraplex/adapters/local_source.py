"""The `local` source: adapter folders on this machine, confined to the configured roots.

With roots, an id is a folder name relative to a root (the first root holding it wins); an absolute
path is refused, so one folder has one name. Confinement is checked on the fully resolved path, as a
path (never a string prefix: root `/a` does not hold `/a-evil`), so no symlink reaches a folder outside
every root, and no file of an adapter may link outside them either. The identity's id is the folder's
resolved name under its root, so every spelling of one folder (`upper`, `./upper`, a symlink to it) is
one adapter. Errors name the id, never a host path, and do not say whether a folder outside exists.
With no roots configured (None) any folder is accepted, named by its resolved path, which suits the
offline Python API, not a server.

The version is a digest of the folder's file names and contents, so every replica that holds a copy of
an adapter (its own volume, synced, its files' times differing) names it with one identity, and prefix
caches, disk tiers and the admin listing agree across replicas. The contents are read once per change:
each request only lists the folder (names, sizes, mtimes) and finds the digest of that listing in a
cache; any rewrite of a file changes the listing, and the contents are read again.
"""

from __future__ import annotations

import hashlib
import shutil
import threading
from collections import OrderedDict
from pathlib import Path

from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.sources import Resolved
from loraplex.lora.adapter import AdapterInvalid, AdapterNotFound

CONTENT_DIGESTS_KEPT = 4096
"""Folder listings whose content digest a LocalSource remembers (a few hundred bytes each)."""


class LocalSource:
    def __init__(self, roots: tuple[str, ...] | None) -> None:
        self.roots = None if roots is None else tuple(Path(r).expanduser().resolve() for r in roots)
        self._digests: OrderedDict[str, str] = OrderedDict()  # listing digest → content digest, LRU
        self._lock = threading.Lock()  # resolve runs on the loader's worker threads

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        if ref.revision is not None:
            raise AdapterInvalid(f"adapter {ref}: local adapters have no revisions")
        folder, name = self.locate(ref.id)
        return Resolved(version=self._version(folder, ref.id), path=folder, ttl_s=0.0, id=name)

    def _version(self, folder: Path, adapter_id: str) -> str:
        """The digest of the folder's file names and contents, read again only when its listing changed."""
        stamp = self._stamp(folder, adapter_id)
        with self._lock:
            known = self._digests.get(stamp)
            if known is not None:
                self._digests.move_to_end(stamp)
                return known
        digest = hashlib.sha256()
        try:
            for f in sorted((f for f in folder.iterdir() if f.is_file()), key=lambda f: f.name):
                content = hashlib.sha256()
                with f.open("rb") as stream:
                    while chunk := stream.read(1 << 20):
                        content.update(chunk)
                digest.update(f"{f.name}\0{content.hexdigest()}\0".encode())
        except OSError:
            raise AdapterNotFound(f"local adapter {adapter_id!r}: its files cannot be read") from None
        version = "sha256-" + digest.hexdigest()
        if self._stamp(folder, adapter_id) == stamp:  # not rewritten while it was read: the digest is its
            with self._lock:
                self._digests[stamp] = version
                while len(self._digests) > CONTENT_DIGESTS_KEPT:
                    self._digests.popitem(last=False)
        return version

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        assert resolved.path is not None, "a local adapter always resolves to its folder"
        shutil.copytree(resolved.path, dest, dirs_exist_ok=True)

    def locate(self, adapter_id: str) -> tuple[Path, str]:
        """The resolved folder `adapter_id` names and its canonical id; AdapterNotFound when it is missing
        or outside every root."""
        path = Path(adapter_id).expanduser()
        if not adapter_id or ".." in path.parts:
            raise AdapterNotFound(f"local adapter id {adapter_id!r} is refused: it may not be empty or contain '..'")
        if self.roots is None:
            folder = _real(path, adapter_id)
            if not _is_dir(folder):
                raise AdapterNotFound(f"local adapter {adapter_id!r}: no such folder")
            return folder, str(folder)
        if path.is_absolute():
            raise AdapterNotFound(f"local adapter {adapter_id!r}: local adapters are named relative to the "
                                  f"adapter roots, not by path")
        for root in self.roots:
            folder = _real(root / path, adapter_id)
            holder = self.root_of(folder)
            if holder is None:
                raise AdapterNotFound(f"local adapter {adapter_id!r} is outside the adapter roots")
            if _is_dir(folder):
                return folder, folder.relative_to(holder).as_posix()
        raise AdapterNotFound(f"local adapter {adapter_id!r} is not a folder under the adapter roots")

    def root_of(self, path: Path) -> Path | None:
        """The root holding the resolved `path`: a whole-component test, so root /a does not hold /a-evil."""
        return next((root for root in self.roots or () if path.is_relative_to(root)), None)

    def _stamp(self, folder: Path, adapter_id: str) -> str:
        """Digest of (name, size, mtime_ns) of the folder's files, from one listing; with roots, a file
        that links outside them is refused."""
        try:
            files = [f for f in folder.iterdir() if f.is_file()]
            entries = sorted((f.name, st.st_size, st.st_mtime_ns) for f in files for st in [f.stat()])
        except OSError:
            raise AdapterNotFound(f"local adapter {adapter_id!r}: its folder cannot be listed") from None
        if self.roots is not None:
            outside = next((f for f in files if self.root_of(_real(f, adapter_id)) is None), None)
            if outside is not None:
                raise AdapterNotFound(f"local adapter {adapter_id!r}: its file {outside.name!r} links outside "
                                      f"the adapter roots")
        return hashlib.sha256(f"{folder}\0{entries!r}".encode()).hexdigest()


def _real(path: Path, adapter_id: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError, ValueError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise AdapterNotFound(f"local adapter {adapter_id!r} cannot be resolved ({type(e).__name__})") from None


def _is_dir(path: Path) -> bool:
    try:
        return path.is_dir()
    except (OSError, ValueError):  # a name too long for the file system, say
        return False

