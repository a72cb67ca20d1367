"""Compile Triton kernels for a CUDA target on a machine without a GPU, in a fresh process.

The interpreter runs kernels as numpy and accepts programs the GPU compiler rejects (dtype mismatches
in `tl.dot`, tiles under 16, non-constexpr globals), so the kernel tests also compile every kernel
through Triton's real pipeline down to a cubin for sm_90. No driver is needed for that; the process
runs without TRITON_INTERPRET, with its own cache so nothing compiled earlier is reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

_SCRIPT = r"""
import importlib, json, sys
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

module_name, specs = sys.argv[1], json.loads(sys.argv[2])
module = importlib.import_module(module_name)
for name, ptr_types, scalar_types, constexprs in specs:
    fn = getattr(module, name)
    signature = {}
    for arg in fn.arg_names:
        if arg in constexprs:
            signature[arg] = "constexpr"
        elif arg in ptr_types:
            signature[arg] = ptr_types[arg]
        elif arg.endswith("_ptr"):
            signature[arg] = "*i64"
        else:
            signature[arg] = scalar_types.get(arg, "i32")
    constants = {(fn.arg_names.index(k),): v for k, v in constexprs.items()}
    kernel = triton.compile(ASTSource(fn, signature, constexprs=constants), target=GPUTarget("cuda", 90, 32))
    assert "cubin" in kernel.asm, name
    print("compiled", name)
"""

KernelSpec = tuple[str, dict[str, str], dict[str, str], dict[str, object]]
"""(kernel name, pointer arg -> type like "*bf16" (default *i64), scalar arg -> type (default i32),
constexprs)."""


def compile_for_cuda(module: str, specs: list[KernelSpec], cache_dir: Path) -> str:
    """Compile each kernel of `module` for sm_90; returns the subprocess output, raises on failure."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(cache_dir)
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    result = subprocess.run([sys.executable, "-c", _SCRIPT, module, json.dumps(specs)], env=env,
                            cwd=Path(__file__).resolve().parents[1], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-4000:]
    return result.stdout
