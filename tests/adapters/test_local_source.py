"""The local source: ids inside the adapter roots resolve to their folder; nothing outside is reachable."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from loraplex.adapters.local_source import LocalSource
from loraplex.adapters.ref import AdapterRef
from loraplex.lora.adapter import AdapterInvalid, AdapterNotFound
from tests.adapters.adapter_files import write_adapter


@pytest.fixture()
def roots(tmp_path: Path) -> tuple[Path, Path, Path]:
    """Two roots with an adapter each, and a folder outside both that also holds an adapter."""
    first, second, outside = tmp_path / "first", tmp_path / "second", tmp_path / "outside"
    write_adapter(first / "a")
    write_adapter(second / "team" / "b")
    write_adapter(outside / "secret")
    return first, second, outside


def local(*roots: Path) -> LocalSource:
    return LocalSource(tuple(str(r) for r in roots))


def test_relative_id_resolves_under_the_first_root_holding_it(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    source = local(first, second)
    assert source.resolve(AdapterRef("local", "a"), None).path == (first / "a").resolve()
    assert source.resolve(AdapterRef("local", "team/b"), None).path == (second / "team" / "b").resolve()


def test_absolute_id_is_refused_even_inside_a_root(roots: tuple[Path, Path, Path]) -> None:
    # A server names local adapters one way only: by name under its roots.
    first, second, _ = roots
    folder = str((second / "team" / "b").resolve())
    with pytest.raises(AdapterNotFound, match="not by path"):
        local(first, second).resolve(AdapterRef("local", folder), None)


def test_every_spelling_of_one_folder_has_one_canonical_id(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    (first / "alias").symlink_to(second / "team" / "b")  # a link that stays inside the roots
    source = local(first, second)
    ids = {source.resolve(AdapterRef("local", i), None).id for i in ("team/b", "team/b/", "./team/b", "alias")}
    assert ids == {"team/b"}


@pytest.mark.parametrize("adapter_id", ["../outside/secret", "team/../../outside/secret", "a/..", ".."])
def test_dotdot_is_refused_and_named(roots: tuple[Path, Path, Path], adapter_id: str) -> None:
    first, second, _ = roots
    with pytest.raises(AdapterNotFound, match="'..'") as info:
        local(first, second).resolve(AdapterRef("local", adapter_id), None)
    assert repr(adapter_id) in str(info.value)


def test_symlink_escaping_the_root_is_refused(roots: tuple[Path, Path, Path]) -> None:
    first, _, outside = roots
    os.symlink(outside / "secret", first / "escape")
    (first / "inner").symlink_to(first / "a")  # a link that stays inside the root is fine
    source = local(first)
    with pytest.raises(AdapterNotFound, match="outside the adapter roots") as info:
        source.resolve(AdapterRef("local", "escape"), None)
    assert "'escape'" in str(info.value)
    assert str(outside) not in str(info.value) and str(first) not in str(info.value)
    assert source.resolve(AdapterRef("local", "inner"), None).path == (first / "a").resolve()


def test_a_sibling_whose_name_extends_the_root_is_outside(tmp_path: Path) -> None:
    # Confinement compares whole path components: root ROOT does not hold ROOT-evil/x.
    root, evil = tmp_path / "ROOT", tmp_path / "ROOT-evil"
    write_adapter(root / "a")
    write_adapter(evil / "x")
    (root / "x").symlink_to(evil / "x")
    source = local(root)
    with pytest.raises(AdapterNotFound, match="outside the adapter roots"):
        source.resolve(AdapterRef("local", "x"), None)
    assert source.root_of((evil / "x").resolve()) is None
    assert source.root_of((root / "a").resolve()) == root.resolve()


def test_a_file_linking_outside_the_roots_is_refused(roots: tuple[Path, Path, Path]) -> None:
    # The folder is inside the root, but its files are another adapter's, outside every root.
    first, _, outside = roots
    (first / "borrowed").mkdir()
    for file in (outside / "secret").iterdir():
        (first / "borrowed" / file.name).symlink_to(file)
    with pytest.raises(AdapterNotFound, match="links outside the adapter roots") as info:
        local(first).resolve(AdapterRef("local", "borrowed"), None)
    assert str(outside) not in str(info.value)
    (first / "linked").mkdir()  # files linking to another adapter inside the roots are fine
    for file in (first / "a").iterdir():
        (first / "linked" / file.name).symlink_to(file)
    assert local(first).resolve(AdapterRef("local", "linked"), None).id == "linked"


def test_an_unresolvable_id_is_not_found_without_an_os_error(roots: tuple[Path, Path, Path]) -> None:
    first, _, _ = roots
    (first / "loop").symlink_to(first / "loop")
    for adapter_id, message in (("loop", "'loop' cannot be resolved"), ("x" * 300, "is not a folder under"),
                                ("x" * 5000, "local adapter"), ("x\u0000y", "local adapter")):
        with pytest.raises(AdapterNotFound, match=message):  # the id named, never a host path or an OSError
            local(first).resolve(AdapterRef("local", adapter_id), None)
    with pytest.raises(AdapterNotFound, match="loop' cannot be resolved"):  # also without roots (the offline API)
        LocalSource(None).resolve(AdapterRef("local", str(first / "loop")), None)


def test_fetch_copies_the_folder(roots: tuple[Path, Path, Path], tmp_path: Path) -> None:
    # The loader reads a local adapter in place (its resolved path), but the source keeps the protocol.
    first, _, _ = roots
    source = local(first)
    resolved = source.resolve(AdapterRef("local", "a"), None)
    dest = tmp_path / "copy"
    source.fetch(AdapterRef("local", "a"), resolved, None, dest)
    assert sorted(f.name for f in dest.iterdir()) == sorted(f.name for f in (first / "a").iterdir())
    assert all((dest / f.name).read_bytes() == f.read_bytes() for f in (first / "a").iterdir())


def test_missing_folder_is_not_found(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    with pytest.raises(AdapterNotFound, match="'nope'"):
        local(first, second).resolve(AdapterRef("local", "nope"), None)
    (first / "file").write_text("not a folder")
    with pytest.raises(AdapterNotFound, match="'file'"):
        local(first).resolve(AdapterRef("local", "file"), None)


def test_no_roots_accepts_any_folder(roots: tuple[Path, Path, Path]) -> None:
    _, _, outside = roots
    folder = (outside / "secret").resolve()
    resolved = LocalSource(None).resolve(AdapterRef("local", str(folder)), None)
    assert resolved.path == folder and resolved.id == str(folder)
    with pytest.raises(AdapterNotFound):
        LocalSource(None).resolve(AdapterRef("local", str(folder / "missing")), None)


def test_version_changes_when_a_file_changes_and_not_otherwise(roots: tuple[Path, Path, Path]) -> None:
    first, _, _ = roots
    source, ref = local(first), AdapterRef("local", "a")
    before = source.resolve(ref, None).version
    assert source.resolve(ref, None).version == before
    config = first / "a" / "adapter_config.json"
    config.write_bytes(config.read_bytes() + b" ")
    assert source.resolve(ref, None).version != before


def test_copies_of_an_adapter_share_its_version_whatever_their_times(roots: tuple[Path, Path, Path]) -> None:
    # Replicas with their own copies agree on an adapter's identity: the version is its content, not its
    # files' times or its folder's place.
    import os
    import shutil

    first, second, _ = roots
    shutil.copytree(first / "a", second / "copy")
    for file in (second / "copy").iterdir():
        os.utime(file, (1_000_000, 1_000_000))
    assert local(second).resolve(AdapterRef("local", "copy"), None).version == \
        local(first).resolve(AdapterRef("local", "a"), None).version


def test_a_revision_is_refused(roots: tuple[Path, Path, Path]) -> None:
    first, _, _ = roots
    with pytest.raises(AdapterInvalid, match="no revisions"):
        local(first).resolve(AdapterRef("local", "a", "main"), None)


def test_content_digests_are_kept_for_the_most_recent_listings(tmp_path: Path,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.adapters import local_source

    monkeypatch.setattr(local_source, "CONTENT_DIGESTS_KEPT", 2)
    for name in "abc":
        write_adapter(tmp_path / name)
    source = local(tmp_path)
    opened: list[str] = []
    real_open = Path.open

    def counting_open(self: Path, *args: object, **kwargs: object) -> object:
        opened.append(self.parent.name)
        return real_open(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(Path, "open", counting_open)

    def reads(name: str) -> int:
        before = len(opened)
        source.resolve(AdapterRef("local", name), None)
        return len(opened) - before

    assert reads("a") and reads("b")  # first listings: contents read
    assert not reads("a") and not reads("b")  # both kept (2): no read; "a" is now the older
    assert reads("c")  # a third listing: the least recently used ("a") goes, "b" stays
    assert not reads("b") and reads("a")


def test_no_roots_names_the_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(AdapterNotFound, match="nope': no such folder"):
        LocalSource(None).resolve(AdapterRef("local", str(tmp_path / "nope")), None)
