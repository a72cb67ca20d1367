"""The `local` source: adapter folders on this machine, confined to the configured roots.

An id is a folder name relative to a root (the first root holding it wins) or an absolute path inside
one. Confinement is checked on the fully resolved path, so neither `..` nor a symlink can reach a
folder outside every root; the error does not say whether such a folder exists. With no roots
configured (None) any folder is accepted, which suits the offline Python API, not a server.

The version is a digest of the folder's file names, sizes and mtimes: a stat, cheap enough to redo
on every request, and any rewrite of a file changes it.
"""

from __future__ import annotations

import hashlib
import shutil
from pathlib import Path

from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.sources import Resolved
from loraplex.lora.adapter import AdapterInvalid, AdapterNotFound


class LocalSource:
    def __init__(self, roots: tuple[str, ...] | None) -> None:
        self.roots = None if roots is None else tuple(Path(r).expanduser().resolve() for r in roots)

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        if ref.revision is not None:
            raise AdapterInvalid(f"adapter {ref}: local adapters have no revisions")
        folder = self.locate(ref.id)
        stamp = file_stamp(folder)
        if stamp is None:
            raise AdapterNotFound(f"adapter {ref.id!r}: folder {folder} cannot be listed")
        return Resolved(version=stamp, path=folder, ttl_s=0.0)

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        assert resolved.path is not None, "a local adapter always resolves to its folder"
        shutil.copytree(resolved.path, dest, dirs_exist_ok=True)

    def locate(self, adapter_id: str) -> Path:
        """The resolved folder `adapter_id` names; AdapterNotFound when it is missing or outside every root."""
        path = Path(adapter_id).expanduser()
        if not adapter_id or ".." in path.parts:
            raise AdapterNotFound(f"local adapter id {adapter_id!r} is refused: it may not be empty or contain '..'")
        if self.roots is None:
            folder = _real(path, adapter_id)
            if not folder.is_dir():
                raise AdapterNotFound(f"local adapter {adapter_id!r}: folder {folder} does not exist")
            return folder
        candidates = [path] if path.is_absolute() else [root / path for root in self.roots]
        for candidate in candidates:
            folder = _real(candidate, adapter_id)
            if not any(folder.is_relative_to(root) for root in self.roots):
                raise AdapterNotFound(f"local adapter {adapter_id!r} is outside the adapter roots "
                                      f"{[str(r) for r in self.roots]}")
            if folder.is_dir():
                return folder
        raise AdapterNotFound(f"local adapter {adapter_id!r} is not a folder under the adapter roots "
                              f"{[str(r) for r in self.roots]}")


def _real(path: Path, adapter_id: str) -> Path:
    try:
        return path.resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop (Python 3.11)
        raise AdapterNotFound(f"local adapter {adapter_id!r} cannot be resolved: {e}") from None


def file_stamp(folder: Path) -> str | None:
    """Digest of (name, size, mtime_ns) of the folder's files; None when it cannot be listed."""
    try:
        entries = sorted((f.name, st.st_size, st.st_mtime_ns) for f in folder.iterdir()
                         if f.is_file() for st in [f.stat()])
    except OSError:
        return None
    return "stamp-" + hashlib.sha256(repr(entries).encode()).hexdigest()
