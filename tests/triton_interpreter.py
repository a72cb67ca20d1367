"""Running Triton kernel tests on CPU through the interpreter, whatever the test process imported first.

`TRITON_INTERPRET=1` only takes effect for functions decorated after it is set, and that includes
triton's own library (`tl.sum`, `tl.max`, `tl.cdiv` ...), decorated when `triton.language` is first
imported. In a full test run something else (peft, for one) imports triton before the kernel test
modules can set the variable, so those library functions stay compiled-only and kernels calling them
fail under the interpreter. The kernel test modules then skip their tests in that process and run
themselves once more in a fresh one, where they import triton first.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import torch

SKIP_REASON = "triton was imported before TRITON_INTERPRET=1; test_in_fresh_process runs this"


def kernels_runnable() -> bool:
    """Whether Triton kernels run in this process: on CUDA, or interpreted along with triton's library."""
    if torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        return True
    import triton.language as tl
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(tl.standard.sum, InterpretedFunction)


def run_in_fresh_process(test_file: str, tests: str) -> None:
    """Run the default (not slow) tests of `test_file` matching the `-k` expression `tests` in a new
    interpreter-mode pytest process."""
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    root = Path(__file__).resolve().parents[1]
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-k", tests,
                             test_file], env=env, cwd=root, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
