"""The disk tier: fetched adapter folders keyed by identity, written atomically, capped by bytes (LRU).

Layout under the root:

    entries/<source>--<id slug>--<digest>/   one complete adapter; .loraplex-entry.json is written last
    tmp/<name>/ + tmp/<name>.lock           a download in progress, locked by its writer for its lifetime
    .lock                                   held while an entry is renamed in or entries are evicted

An entry becomes visible only by a rename of a finished, verified folder, so a crash mid-download
leaves a temp folder that is never served; the next writer removes temp folders whose lock no live
process holds. Reads take no lock: the rename is atomic and a read bumps the marker's mtime, which
is the LRU clock (shared by every process using the root).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from filelock import FileLock, Timeout

from loraplex.adapters.ref import AdapterIdentity
from loraplex.lora.adapter import BIN_FILE, CONFIG_FILE, SAFETENSORS_FILE, AdapterInvalid
from loraplex.lora.medusa import HEADS_FILE

MARKER = ".loraplex-entry.json"


@dataclass(frozen=True)
class DiskStats:
    hits: int
    misses: int
    evictions: int
    entries: int
    bytes_resident: int


class DiskStore:
    def __init__(self, root: Path, max_bytes: int) -> None:
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.root = Path(root)
        self.max_bytes = max_bytes
        self._entries = self.root / "entries"
        self._tmp = self.root / "tmp"
        self._entries.mkdir(parents=True, exist_ok=True)
        self._tmp.mkdir(parents=True, exist_ok=True)
        self._lock = FileLock(str(self.root / ".lock"))
        self._mutex = threading.Lock()  # guards the counters below
        self._hits = self._misses = self._evictions = 0
        self._count, self._bytes = self._scan_totals()

    def path_for(self, key: AdapterIdentity) -> Path:
        digest = hashlib.sha256(f"{key.source}\0{key.id}\0{key.version}".encode()).hexdigest()[:24]
        slug = re.sub(r"[^A-Za-z0-9._-]+", "_", key.id)[:64]
        return self._entries / f"{key.source}--{slug}--{digest}"

    def get(self, key: AdapterIdentity) -> Path | None:
        """The complete entry for `key`, marked as just used; None when it is not stored."""
        path = self.path_for(key)
        try:
            os.utime(path / MARKER)
        except FileNotFoundError:
            with self._mutex:
                self._misses += 1
            return None
        with self._mutex:
            self._hits += 1
        return path

    def put(self, key: AdapterIdentity, fill: Callable[[Path], None]) -> Path:
        """Store the adapter that `fill` writes into the empty folder it is given; returns the entry.

        The folder is verified (config parses, weights present and non-empty) before it is renamed into
        place. If another writer stored the same key meanwhile, that entry wins and ours is dropped.
        """
        name = uuid.uuid4().hex
        work = self._tmp / name
        work_lock = FileLock(str(self._tmp / f"{name}.lock"))
        work_lock.acquire()  # before the folder exists, so a cleaner never sees it unlocked
        try:
            work.mkdir()
            fill(work)
            verify_adapter_folder(work, str(key))
            size = _folder_bytes(work)
            marker = {"source": key.source, "id": key.id, "version": key.version, "size_bytes": size,
                      "stored_at": time.time()}
            (work / MARKER).write_text(json.dumps(marker))
            final = self.path_for(key)
            with self._lock:
                if (final / MARKER).is_file():
                    return final
                if final.exists():  # no marker: not ours to trust (written by hand or by an old layout)
                    self._remove(final)
                work.rename(final)
                self._remove_stale_work()
                self._evict(keep=final)
            return final
        finally:
            shutil.rmtree(work, ignore_errors=True)
            work_lock.release()
            Path(work_lock.lock_file).unlink(missing_ok=True)

    def discard(self, key: AdapterIdentity) -> None:
        """Remove the entry for `key` (its files did not parse), so a later load fetches it again."""
        with self._lock:
            path = self.path_for(key)
            if path.exists():
                self._remove(path)
            self._count, self._bytes = self._scan_totals()

    def stats(self) -> DiskStats:
        with self._mutex:
            return DiskStats(self._hits, self._misses, self._evictions, self._count, self._bytes)

    def _evict(self, keep: Path) -> None:
        """Remove least recently used entries (other than `keep`) until the store fits max_bytes."""
        entries = []
        for path in self._entries.iterdir():
            try:
                used = (path / MARKER).stat().st_mtime_ns
                size = int(json.loads((path / MARKER).read_text())["size_bytes"])
            except (OSError, ValueError, KeyError, TypeError):
                continue
            entries.append((used, path, size))
        entries.sort()
        total = sum(size for _, _, size in entries)
        evicted = 0
        for _, path, size in entries:
            if total <= self.max_bytes:
                break
            if path == keep:
                continue
            self._remove(path)
            total -= size
            evicted += 1
        with self._mutex:
            self._evictions += evicted
            self._count, self._bytes = len(entries) - evicted, total

    def _remove(self, path: Path) -> None:
        # Renamed away first, so the entry disappears at once even if the deletion is interrupted.
        trash = self._tmp / f"{uuid.uuid4().hex}.trash"
        path.rename(trash)
        shutil.rmtree(trash, ignore_errors=True)

    def _remove_stale_work(self) -> None:
        """Delete temp folders of writers that died (their lock is free); called with the store lock held."""
        for path in self._tmp.iterdir():
            if path.suffix == ".lock" or not path.is_dir():
                continue
            if path.suffix == ".trash":
                shutil.rmtree(path, ignore_errors=True)
                continue
            lock = FileLock(str(self._tmp / f"{path.name}.lock"))
            try:
                lock.acquire(timeout=0)
            except Timeout:
                continue  # a live writer is still downloading
            try:
                shutil.rmtree(path, ignore_errors=True)
            finally:
                lock.release()
                Path(lock.lock_file).unlink(missing_ok=True)

    def _scan_totals(self) -> tuple[int, int]:
        count = total = 0
        for path in self._entries.iterdir():
            try:
                total += int(json.loads((path / MARKER).read_text())["size_bytes"])
                count += 1
            except (OSError, ValueError, KeyError, TypeError):
                continue
        return count, total


def verify_adapter_folder(folder: Path, label: str) -> None:
    """Cheap completeness check of a downloaded adapter (full validation happens when it is parsed)."""
    if (folder / HEADS_FILE).is_file() and not (folder / CONFIG_FILE).is_file():
        return  # Medusa heads alone (loraplex.lora.medusa checks them when parsed)
    config = folder / CONFIG_FILE
    try:
        parsed = json.loads(config.read_bytes())
    except FileNotFoundError:
        raise AdapterInvalid(f"adapter {label} has no {CONFIG_FILE}") from None
    except (OSError, ValueError) as e:
        raise AdapterInvalid(f"adapter {label}: {CONFIG_FILE} is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise AdapterInvalid(f"adapter {label}: {CONFIG_FILE} must hold a JSON object")
    weights = [folder / name for name in (SAFETENSORS_FILE, BIN_FILE) if (folder / name).is_file()]
    if not weights:
        raise AdapterInvalid(f"adapter {label} has no {SAFETENSORS_FILE} (nor a legacy {BIN_FILE})")
    if weights[0].stat().st_size == 0:
        raise AdapterInvalid(f"adapter {label}: {weights[0].name} is empty")


def _folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
