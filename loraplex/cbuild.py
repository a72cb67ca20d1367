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
    version = subprocess.run([cc, "--version"], capture_output=True, text=True, timeout=30).stdout
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
    folder = loraplex_home() / "kernels"
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError:
        folder = Path(tempfile.gettempdir()) / "loraplex-kernels"
        folder.mkdir(parents=True, exist_ok=True)
    return folder


def _build(cc: str, source: Path, flags: Sequence[str], target: Path) -> None:
    # Built under a temporary name and renamed into place: a concurrent process sees all of it or none.
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=target.stem, suffix=".tmp")
    os.close(fd)
    try:
        proc = subprocess.run([cc, *flags, "-o", tmp, str(source)], capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise NativeUnavailable(f"{cc} could not compile {source.name}: {proc.stderr.strip()[-800:]}")
        os.replace(tmp, target)
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
