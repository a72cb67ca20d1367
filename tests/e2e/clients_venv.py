"""A virtual environment holding the published LoRAX and TGI clients, made once per machine.

`lorax-client` and `text-generation` pin huggingface-hub < 1.0, which conflicts with transformers 5,
so they cannot share loraplex's environment; the tests run them from this one as subprocesses.
"""

from __future__ import annotations

import json
import subprocess
import sys
import venv
from pathlib import Path

from filelock import FileLock

from loraplex.paths import loraplex_home

CLIENT_REQUIREMENTS = ["lorax-client==0.6.3", "text-generation==0.7.0"]


def clients_python() -> Path:
    """Python of the clients' venv (under $LORAPLEX_HOME/e2e), created and installed on first use."""
    root = loraplex_home() / "e2e" / "clients-venv"
    python = root / "bin" / "python"
    stamp = root / "installed.json"
    root.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(root) + ".lock"):
        if stamp.is_file() and json.loads(stamp.read_text()) == CLIENT_REQUIREMENTS and python.is_file():
            return python
        venv.EnvBuilder(clear=True, with_pip=True).create(root)
        subprocess.run([str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check",
                        *CLIENT_REQUIREMENTS], check=True, stdout=sys.stderr)
        stamp.write_text(json.dumps(CLIENT_REQUIREMENTS))
    return python


def run_client_script(script: str, *args: str) -> dict:
    """Run `script` with the clients' python; it prints one JSON object, returned here."""
    proc = subprocess.run([str(clients_python()), "-c", script, *args], capture_output=True, text=True, timeout=600)
    if proc.returncode != 0:
        raise AssertionError(f"client script failed:\n{proc.stdout}\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])
