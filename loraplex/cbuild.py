"""Building loraplex's C kernels on first use: compiled for this machine, cached under the home, loaded with ctypes.

A kernel's source is compiled with the system C compiler (`$CC`, else `cc`) and the kernel's flags into
`$LORAPLEX_HOME/kernels/`, keyed by the source, the flags, the compiler and the CPU, so a changed kernel or
another machine never loads a stale build. Without a compiler the kernel is unavailable (NativeUnavailable)
and its caller falls back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

from loraplex.paths import loraplex_home

log = logging.getLogger(__name__)


class NativeUnavailable(RuntimeError):
    """A native kernel cannot be built or loaded here; the message says why."""


def compiler() -> str:
    cc = os.environ.get("CC") or "cc"
    path = shutil.which(cc)
    if path is None:
        raise NativeUnavailable(f"no C compiler: {cc!r} is not on PATH (install gcc, or set CC)")
    return path


def build_key(cc: str, source: Path, flags: Sequence[str]) -> str:
    try:
        version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"{cc} --version failed: {e}") from e
    cpu = ""
    if Path("/proc/cpuinfo").is_file():
        cpu = next((line for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith(("flags", "Features"))), "")
    digest = hashlib.sha256()
    for part in (source.read_bytes(), " ".join(flags).encode(), version.encode(), cpu.encode(),
                 platform.machine().encode()):
        digest.update(part)
        digest.update(b"\0")
    return digest.hexdigest()[:16]


def kernel_dir() -> Path:
    """`$LORAPLEX_HOME/kernels`, or where the home is not writable a folder of this user's own in the temp
    folder (mode 0700, owned by this user: a shared folder would let another user plant a library here)."""
    folder = loraplex_home() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        return folder
    except OSError:
        pass
    folder = Path(tempfile.gettempdir()) / f"loraplex-kernels-{os.getuid()}"
    try:
        folder.mkdir(mode=0o700, exist_ok=True)
        info = folder.lstat()
    except OSError as e:
        raise NativeUnavailable(f"no folder to build kernels in: {e}") from e
    if not folder.is_dir() or folder.is_symlink() or info.st_uid != os.getuid() or info.st_mode & 0o077:
        raise NativeUnavailable(f"{folder} is not a private folder of this user (owner {info.st_uid}, mode "
                                f"{oct(info.st_mode & 0o777)}): not loading kernels from it")
    return folder


def _build(cc: str, source: Path, flags: Sequence[str], target: Path) -> None:
    # Built under a temporary name and renamed into place: a concurrent process sees all of it or none.
    try:
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    except OSError as e:
        raise NativeUnavailable(f"cannot write a kernel build into {target.parent}: {e}") from e
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise NativeUnavailable(f"{cc} could not compile {source.name}: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
    except (OSError, subprocess.TimeoutExpired) as e:
        raise NativeUnavailable(f"building {source.name} with {cc} failed: {e}") from e
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def load_library(source: Path, flags: Sequence[str], what: str) -> ctypes.CDLL:
    """`source` compiled with `flags` (built on first use, then reused); raises NativeUnavailable."""
    cc = compiler()
    target = kernel_dir() / f"{source.stem}-{build_key(cc, source, flags)}.so"
    if not target.is_file():
        log.info("compiling %s into %s", what, target)
        _build(cc, source, flags, target)
    try:
        return ctypes.CDLL(str(target))
    except OSError:
        # A damaged build (a full disk, a copied cache folder) is rebuilt once, not trusted forever.
        log.warning("could not load %s; rebuilding it", target)
        _build(cc, source, flags, target)
        try:
            return ctypes.CDLL(str(target))
        except OSError as exc:
            raise NativeUnavailable(f"could not load {target}: {exc}") from exc
