"""The vLLM-CPU side-by-side runs its worker protocol end to end (a stand-in worker here: vLLM lives in
another virtual environment), alternates the two systems and prints the ratio."""

from __future__ import annotations

import re
import stat
import sys
from pathlib import Path

import pytest
import torch

from loraplex.bench import vllm_cpu
from loraplex.model import gemm

FAKE_WORKER = """#!{python}
import json, sys
# Called as: python -c SCRIPT MODEL NEW_TOKENS lora|base; answers as the vLLM worker does.
assert sys.argv[1] == "-c" and sys.argv[5] in ("lora", "base"), sys.argv
prompts = json.loads(sys.stdin.readline())
print("INFO a log line on stdout is skipped", flush=True)
print(json.dumps({{"ready": True}}), flush=True)
for line in sys.stdin:
    print(json.dumps({{"tokens": len(prompts) * int(sys.argv[4]), "seconds": 0.5}}), flush=True)
"""


@pytest.mark.parametrize("backends", [[], ["aten", "auto"]], ids=["default", "two-linear-backends"])
def test_alternates_with_the_worker_and_prints_the_ratio(demo_model_path: Path, tmp_path: Path, backends: list[str],
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    worker = tmp_path / "python"
    worker.write_text(FAKE_WORKER.format(python=sys.executable))
    worker.chmod(worker.stat().st_mode | stat.S_IEXEC)
    vllm_cpu.main(["--model", str(demo_model_path), "--requests", "2", "--new-tokens", "3", "--repeats", "2",
                   "--vllm-python", str(worker), *(["--linear-backends", *backends] if backends else [])])
    out = capsys.readouterr().out
    assert re.search(r"vllm-cpu +12\.0 tokens/s   \(runs: 12\.0, 12\.0\)", out)  # 2 requests x 3 tokens / 0.5 s
    if not backends:
        assert "ratio loraplex / vllm-cpu: " in out and "pairs" in out
    else:  # one engine per backend, each timed in every round, each with its own ratio
        auto = gemm.resolve("auto", torch.device("cpu"), torch.float32)
        for name in ("aten", auto):
            assert re.search(rf"loraplex {name} +[0-9.]+ tokens/s   \(runs: [0-9.]+, [0-9.]+\)", out), name
            assert f"ratio loraplex {name} / vllm-cpu: " in out
