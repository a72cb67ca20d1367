"""Building and loading the native LoRA kernel: cached per machine, and a clear fallback without a compiler."""

from __future__ import annotations

import logging
import os
import shutil
import stat
from collections.abc import Iterator
from pathlib import Path

import pytest

from loraplex.lora.ops import add_lora, get_lora_op, native
from loraplex.lora.ops.native import add_lora_native, load_kernel, native_available


@pytest.fixture
def fresh_build(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    """An empty LORAPLEX_HOME and no cached kernel; the process's kernel is reloaded afterwards."""
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    load_kernel.cache_clear()
    yield tmp_path
    load_kernel.cache_clear()


def test_kernel_is_built_once_into_the_home(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    real_cc = shutil.which(os.environ.get("CC") or "cc")
    if real_cc is None:
        pytest.skip("no C compiler")
    calls = fresh_build / "calls.log"
    logging_cc = fresh_build / "logging-cc"
    logging_cc.write_text(f'#!/bin/sh\necho "$*" >> {calls}\nexec {real_cc} "$@"\n')
    logging_cc.chmod(logging_cc.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(logging_cc))
    assert native_available() is None
    built = list((fresh_build / "kernels").glob("lora_cpu-*.so"))
    assert len(built) == 1
    assert sum("lora_cpu.c" in line for line in calls.read_text().splitlines()) == 1
    # The next process start (a cleared cache) finds the build and compiles nothing.
    load_kernel.cache_clear()
    assert native_available() is None
    assert sum("lora_cpu.c" in line for line in calls.read_text().splitlines()) == 1
    assert list((fresh_build / "kernels").glob("*")) == built  # no temporary file left behind


def test_no_compiler_falls_back_to_torch(fresh_build: Path, monkeypatch: pytest.MonkeyPatch,
                                         caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("CC", "no-such-compiler-anywhere")
    reason = native_available()
    assert reason is not None and "no C compiler" in reason and "no-such-compiler-anywhere" in reason
    with pytest.raises(ValueError, match="'native' is unavailable: no C compiler"):
        get_lora_op("native")
    with caplog.at_level(logging.WARNING, logger="loraplex.lora.ops"):
        assert get_lora_op("auto") is add_lora
    assert "using the 'torch' backend" in caplog.text


def test_compile_error_is_reported(fresh_build: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = fresh_build / "fake-cc"
    fake.write_text("#!/bin/sh\nif [ \"$1\" = --version ]; then echo fake 1.0; exit 0; fi\n"
                    "echo 'lora_cpu.c:1: error: this compiler refuses' >&2\nexit 1\n")
    fake.chmod(fake.stat().st_mode | stat.S_IXUSR)
    monkeypatch.setenv("CC", str(fake))
    reason = native_available()
    assert reason is not None and "this compiler refuses" in reason
    assert not list((fresh_build / "kernels").glob("*"))  # no half-built file left behind
    assert get_lora_op("auto") is add_lora


def test_native_selected_where_it_builds() -> None:
    if native_available() is not None:
        pytest.skip(native_available() or "")
    assert get_lora_op("auto") is add_lora_native


def test_damaged_build_is_rebuilt(fresh_build: Path) -> None:
    cc = shutil.which(os.environ.get("CC") or "cc")
    if cc is None:
        pytest.skip("no C compiler")
    # The build this process would load, damaged before it is loaded (e.g. truncated by a full disk).
    target = native._kernel_dir() / f"lora_cpu-{native._build_key(cc)}.so"
    target.write_bytes(b"not a shared library")
    assert native_available() is None
    assert target.read_bytes()[:4] == b"\x7fELF"


def test_an_unwritable_home_builds_in_a_private_folder_and_refuses_a_shared_one(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex import cbuild

    home = tmp_path / "home"
    home.mkdir()
    (home / "kernels").write_text("a file where the folder should be")  # mkdir fails: not writable as a folder
    monkeypatch.setenv("LORAPLEX_HOME", str(home))
    monkeypatch.setattr(cbuild.tempfile, "gettempdir", lambda: str(tmp_path))
    folder = cbuild.kernel_dir()
    assert folder == tmp_path / f"loraplex-kernels-{os.getuid()}" and stat.S_IMODE(folder.stat().st_mode) == 0o700
    folder.chmod(0o777)  # another user could write into it now
    with pytest.raises(cbuild.NativeUnavailable, match="is not a private folder of this user"):
        cbuild.kernel_dir()
