"""The disk tier: whole entries only (even across a crash), identity-keyed, LRU within a byte cap."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import threading
from pathlib import Path

import pytest
from filelock import FileLock

from loraplex.adapters.disk_store import MARKER, DiskStore
from loraplex.adapters.ref import AdapterIdentity
from loraplex.lora.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterInvalid
from tests.adapters.adapter_files import adapter_files, parse, write_adapter

KEY = AdapterIdentity("s3", "bucket/a", "etag-1")


def filler(seed: int = 0) -> object:
    return lambda dest: write_adapter(dest, seed)


def entry_size() -> int:
    return sum(len(b) for b in adapter_files().values())


def test_put_then_get_serves_the_complete_adapter(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    assert store.get(KEY) is None
    path = store.put(KEY, filler(seed=3))
    assert store.get(KEY) == path
    assert sorted(p.name for p in path.iterdir()) == sorted([MARKER, CONFIG_FILE, SAFETENSORS_FILE])
    assert parse(path).content_hash == parse(write_adapter(tmp_path / "ref", seed=3)).content_hash
    stats = store.stats()
    assert (stats.hits, stats.misses, stats.entries, stats.bytes_resident) == (1, 1, 1, entry_size())
    assert DiskStore(tmp_path, max_bytes=1 << 30).get(KEY) == path  # another process sees it too


def test_a_new_version_is_a_new_entry(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    old = store.put(KEY, filler(seed=0))
    new_key = AdapterIdentity(KEY.source, KEY.id, "etag-2")
    assert store.get(new_key) is None
    new = store.put(new_key, filler(seed=1))
    assert new != old
    assert parse(store.get(KEY)).content_hash != parse(store.get(new_key)).content_hash  # type: ignore[arg-type]


@pytest.mark.parametrize(("broken", "message"), [
    (lambda d: (d / SAFETENSORS_FILE).unlink(), "has no adapter_model.safetensors"),
    (lambda d: (d / SAFETENSORS_FILE).write_bytes(b""), "adapter_model.safetensors is empty"),
    (lambda d: (d / CONFIG_FILE).unlink(), "has no adapter_config.json"),
    (lambda d: (d / CONFIG_FILE).write_text("{not json"), "not valid JSON"),
    (lambda d: (d / CONFIG_FILE).write_text("[1]"), "JSON object"),
])
def test_an_incomplete_download_is_refused_and_leaves_nothing(tmp_path: Path, broken: object, message: str) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)

    def fill(dest: Path) -> None:
        write_adapter(dest)
        broken(dest)  # type: ignore[operator]

    with pytest.raises(AdapterInvalid, match=message) as info:
        store.put(KEY, fill)
    assert str(KEY) in str(info.value)
    assert store.get(KEY) is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_failing_fetch_leaves_nothing(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)

    def fill(dest: Path) -> None:
        (dest / CONFIG_FILE).write_bytes(adapter_files()[CONFIG_FILE])
        raise ConnectionError("network went away")

    with pytest.raises(ConnectionError):
        store.put(KEY, fill)
    assert store.get(KEY) is None
    assert list((tmp_path / "tmp").iterdir()) == []


def test_a_crash_mid_download_is_never_served_and_is_cleaned_later(tmp_path: Path) -> None:
    # A real crash: a second process dies (os._exit) in the middle of writing the files.
    script = textwrap.dedent(f"""
        import os
        from pathlib import Path
        from loraplex.adapters.disk_store import DiskStore
        from loraplex.adapters.ref import AdapterIdentity
        def fill(dest):
            (dest / "adapter_config.json").write_text('{{"peft_type": "LORA", "r": 4}}')
            (dest / "adapter_model.safetensors").write_bytes(b"\\x00" * 100)  # a truncated weights file
            os._exit(1)
        DiskStore(Path({str(tmp_path)!r}), 1 << 30).put(AdapterIdentity("s3", "bucket/a", "etag-1"), fill)
    """)
    result = subprocess.run([sys.executable, "-c", script], cwd=Path(__file__).parents[2], check=False)
    assert result.returncode == 1
    leftovers = [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()]
    assert len(leftovers) == 1  # the dead writer's temp folder, with its partial files
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    assert store.get(KEY) is None
    assert list((tmp_path / "entries").iterdir()) == []
    # The next write removes the dead writer's folder but not the folder of a writer that is still alive.
    (tmp_path / "tmp" / "alive").mkdir()
    alive = FileLock(str(tmp_path / "tmp" / "alive.lock"))
    with alive:
        store.put(AdapterIdentity("s3", "bucket/b", "etag-9"), filler())
        assert sorted(p.name for p in (tmp_path / "tmp").iterdir() if p.is_dir()) == ["alive"]
    path = store.put(KEY, filler())
    assert parse(path).rank == 4


def test_lru_removal_beyond_the_byte_cap(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=2 * entry_size() + 10)
    keys = [AdapterIdentity("s3", f"bucket/{name}", "etag") for name in "abc"]
    store.put(keys[0], filler())
    store.put(keys[1], filler())
    os.utime(store.path_for(keys[1]) / MARKER, (1, 1))  # b: long unused (the LRU clock is the marker's mtime)
    assert store.get(keys[0]) is not None
    store.put(keys[2], filler())
    assert store.get(keys[1]) is None
    assert store.get(keys[0]) is not None and store.get(keys[2]) is not None
    stats = store.stats()
    assert (stats.evictions, stats.entries, stats.bytes_resident) == (1, 2, 2 * entry_size())


def test_an_entry_above_the_cap_is_kept_alone(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=10)
    first = AdapterIdentity("s3", "bucket/a", "etag")
    store.put(first, filler())
    path = store.put(KEY, filler())
    assert store.get(KEY) == path and store.get(first) is None


def test_concurrent_writers_of_one_key_leave_one_intact_entry(tmp_path: Path) -> None:
    stores = [DiskStore(tmp_path, max_bytes=1 << 30) for _ in range(4)]  # one per "process"
    barrier = threading.Barrier(len(stores))
    paths: list[Path] = []

    def fill(dest: Path) -> None:
        barrier.wait()  # all four are downloading at the same time
        write_adapter(dest)

    threads = [threading.Thread(target=lambda s=s: paths.append(s.put(KEY, fill))) for s in stores]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(set(paths)) == 1 and len(paths) == 4
    assert len(list((tmp_path / "entries").iterdir())) == 1
    assert parse(paths[0]).rank == 4
    assert [p for p in (tmp_path / "tmp").iterdir() if p.is_dir()] == []


def test_discard_removes_an_entry(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    store.put(KEY, filler())
    store.discard(KEY)
    assert store.get(KEY) is None and store.stats().entries == 0


def test_the_store_checks_its_cap_and_a_cap_of_zero_keeps_only_the_newest(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="max_bytes must be >= 0, got -1"):
        DiskStore(tmp_path / "bad", max_bytes=-1)
    store = DiskStore(tmp_path / "nested" / "root", max_bytes=0)  # folders made on the way
    first = AdapterIdentity("s3", "bucket/first", "etag")
    store.put(first, filler())
    store.put(KEY, filler())
    assert store.get(first) is None and store.get(KEY) is not None
    assert (store.stats().entries, store.stats().evictions) == (1, 1)


def test_hits_and_misses_are_counted_one_by_one(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    for _ in range(2):
        assert store.get(KEY) is None
    store.put(KEY, filler())
    for _ in range(3):
        assert store.get(KEY) is not None
    assert (store.stats().hits, store.stats().misses) == (3, 2)


def test_a_reopened_store_counts_its_entries_and_skips_folders_without_a_marker(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    keys = [AdapterIdentity("s3", f"bucket/{name}", "etag") for name in "abc"]
    for key in keys:
        store.put(key, filler())
    for name in ("junk-1", "junk-2", "junk-3"):  # a folder written by hand, and markers that do not parse
        (tmp_path / "entries" / name).mkdir()
    (tmp_path / "entries" / "junk-2" / MARKER).write_text("{not json")
    (tmp_path / "entries" / "junk-3" / MARKER).write_text('{"size": 1}')
    stats = DiskStore(tmp_path, max_bytes=1 << 30).stats()
    assert (stats.entries, stats.bytes_resident, stats.hits, stats.misses) == (3, 3 * entry_size(), 0, 0)


def test_an_entry_is_named_by_source_readable_id_and_digest_and_its_marker_says_what_it_is(tmp_path: Path) -> None:
    import hashlib
    import json
    import time

    store = DiskStore(tmp_path, max_bytes=1 << 30)
    key = AdapterIdentity("hub", "Org/My Model+v2" + "x" * 80, "abc123")
    digest = hashlib.sha256(f"{key.source}\0{key.id}\0{key.version}".encode()).hexdigest()[:24]
    slug = ("Org_My_Model_v2" + "x" * 80)[:64]
    assert store.path_for(key) == tmp_path / "entries" / f"hub--{slug}--{digest}"
    before = time.time()
    path = store.put(key, filler())
    marker = json.loads((path / MARKER).read_text())
    assert {k: marker[k] for k in ("source", "id", "version", "size_bytes")} == {
        "source": "hub", "id": key.id, "version": "abc123", "size_bytes": entry_size()}
    assert before <= marker["stored_at"] <= time.time()
    assert list((tmp_path / "tmp").iterdir()) == []  # the writer's folder and its lock file are gone


def test_a_folder_without_a_marker_in_the_entry_place_is_replaced(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    stale = store.path_for(KEY)
    stale.mkdir(parents=True)
    (stale / CONFIG_FILE).write_text("{}")  # left by hand, or by an old layout: not trusted
    path = store.put(KEY, filler(seed=5))
    assert path == stale and (path / MARKER).is_file()
    assert parse(path).content_hash == parse(write_adapter(tmp_path / "ref", seed=5)).content_hash


def test_an_entry_exactly_at_the_cap_stays_and_evictions_add_up(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=2 * entry_size())
    keys = [AdapterIdentity("s3", f"bucket/{name}", "etag") for name in "abcd"]
    store.put(keys[0], filler())
    store.put(keys[1], filler())
    assert store.stats().evictions == 0 and store.get(keys[0]) is not None
    os.utime(store.path_for(keys[1]) / MARKER, (1, 1))
    store.put(keys[2], filler())
    os.utime(store.path_for(keys[0]) / MARKER, (2, 2))
    store.put(keys[3], filler())
    assert [store.get(k) is not None for k in keys] == [False, False, True, True]
    stats = store.stats()
    assert (stats.evictions, stats.entries, stats.bytes_resident) == (2, 2, 2 * entry_size())


def test_the_new_entry_is_kept_even_when_it_is_the_least_recently_used(tmp_path: Path) -> None:
    import time

    store = DiskStore(tmp_path, max_bytes=2 * entry_size() + 10)
    keys = [AdapterIdentity("s3", f"bucket/{name}", "etag") for name in "abc"]
    store.put(keys[0], filler())
    store.put(keys[1], filler())
    now = time.time()
    os.utime(store.path_for(keys[0]) / MARKER, (now + 100, now + 100))  # both "used" after the new one
    os.utime(store.path_for(keys[1]) / MARKER, (now + 200, now + 200))
    store.put(keys[2], filler())
    assert [store.get(k) is not None for k in keys] == [False, True, True]


def test_one_eviction_pass_may_remove_several_entries(tmp_path: Path) -> None:
    keys = [AdapterIdentity("s3", f"bucket/{name}", "etag") for name in "abc"]
    roomy = DiskStore(tmp_path, max_bytes=1 << 30)
    roomy.put(keys[0], filler())
    roomy.put(keys[1], filler())
    tight = DiskStore(tmp_path, max_bytes=entry_size() + 10)  # another process with a smaller cap
    tight.put(keys[2], filler())
    assert [tight.get(k) is not None for k in keys] == [False, False, True]
    assert (tight.stats().evictions, tight.stats().entries) == (2, 1)


def test_a_writer_waits_for_the_store_lock_before_renaming_in(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    done = threading.Event()
    with FileLock(str(tmp_path / ".lock")):  # another process is renaming in or evicting
        thread = threading.Thread(target=lambda: (store.put(KEY, filler()), done.set()))
        thread.start()
        assert not done.wait(0.5)
        assert store.get(KEY) is None
    thread.join(30)
    assert done.is_set() and store.get(KEY) is not None


def test_leftovers_of_removals_and_dead_writers_are_cleaned_at_the_next_write(tmp_path: Path) -> None:
    store = DiskStore(tmp_path, max_bytes=1 << 30)
    tmp = tmp_path / "tmp"
    for i in range(3):
        (tmp / f"{i}.trash").mkdir()  # a removal interrupted after its rename
        (tmp / f"{i}.trash" / "file").write_bytes(b"x")
        (tmp / f"dead{i}").mkdir()  # writers that died: their lock files are free
        (tmp / f"dead{i}" / "partial").write_bytes(b"x")
    (tmp / "alive").mkdir()
    with FileLock(str(tmp / "alive.lock")):
        store.put(KEY, filler())
        assert sorted(p.name for p in tmp.iterdir() if p.is_dir()) == ["alive"]
