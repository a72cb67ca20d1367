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


def test_absolute_id_inside_a_root_resolves(roots: tuple[Path, Path, Path]) -> None:
    first, second, _ = roots
    folder = (second / "team" / "b").resolve()
    assert local(first, second).resolve(AdapterRef("local", str(folder)), None).path == folder


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
    assert source.resolve(AdapterRef("local", "inner"), None).path == (first / "a").resolve()


def test_absolute_path_outside_every_root_is_refused(roots: tuple[Path, Path, Path]) -> None:
    first, second, outside = roots
    secret = str((outside / "secret").resolve())
    with pytest.raises(AdapterNotFound, match="outside the adapter roots") as info:
        local(first, second).resolve(AdapterRef("local", secret), None)
    assert secret in str(info.value)


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
    assert LocalSource(None).resolve(AdapterRef("local", str(folder)), None).path == folder
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


def test_a_revision_is_refused(roots: tuple[Path, Path, Path]) -> None:
    first, _, _ = roots
    with pytest.raises(AdapterInvalid, match="no revisions"):
        local(first).resolve(AdapterRef("local", "a", "main"), None)
