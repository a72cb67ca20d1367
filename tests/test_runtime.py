import os
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from loraplex.runtime import keep_freed_memory, use_one_torch_thread

linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc and glibc malloc")


def _in_thread(fn: Callable[[], object]) -> object:
    result: list[object] = []
    thread = threading.Thread(target=lambda: result.append(fn()))
    thread.start()
    thread.join()
    return result[0]


def _os_threads() -> int:
    return len(os.listdir("/proc/self/task"))


@linux_only
@pytest.mark.skipif(not torch.backends.openmp.is_available(), reason="torch without OpenMP")
def test_a_helper_thread_runs_torch_without_a_team_of_its_own(two_torch_threads: None) -> None:
    def helper() -> tuple[int, int]:
        use_one_torch_thread()
        before = _os_threads()
        x = torch.randn(512, 512)
        (x @ x).sum()
        torch.nn.functional.gelu(torch.randn(1 << 20))  # large enough to go parallel with a team
        return torch.get_num_threads(), _os_threads() - before

    threads, new_os_threads = _in_thread(helper)  # type: ignore[misc]
    assert threads == 1
    assert new_os_threads == 0  # libgomp started no worker for it
    assert torch.get_num_threads() == 2  # the model's thread keeps its team
    assert _in_thread(torch.get_num_threads) == 2  # and threads started later begin as before


_FAULTS_SCRIPT = """
import sys, threading
import torch
import loraplex.engine.engine as engine_module
from loraplex.config import EngineConfig
from loraplex.engine.request import SamplingParams

if sys.argv[2] == "untuned":
    engine_module.keep_freed_memory = lambda device: False
else:
    engine_module.keep_freed_memory(torch.device("cpu"))  # as the server does, before its engine thread starts

def minor_faults():
    return int(open("/proc/self/stat").read().rsplit(")", 1)[1].split()[7])

def run():  # on a thread of its own, as the server's engine runs
    engine = engine_module.Engine(EngineConfig.from_options(model=sys.argv[1], max_loras=0))
    for i in range(32):  # sampled with top-p and logprobs: batch x vocab temporaries every step
        engine.add_request(str(i), engine.tokenizer.encode(f"Request {i}: tell me a story about"),
                           SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=i, ignore_eos=True,
                                          logprobs=0))
    for _ in range(4):
        engine.step()
    before, steps = minor_faults(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    print((minor_faults() - before) / steps)

thread = threading.Thread(target=run)
thread.start()
thread.join()
"""


@linux_only
def test_decode_steps_reuse_freed_memory_instead_of_faulting_it_in(demo_model_path: Path) -> None:
    def faults_per_step(mode: str) -> float:
        proc = subprocess.run([sys.executable, "-c", _FAULTS_SCRIPT, str(demo_model_path), mode],
                              capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-2000:]
        return float(proc.stdout.split()[-1])

    untuned, tuned = faults_per_step("untuned"), faults_per_step("tuned")
    # Untuned glibc unmaps the 6 MB per-step buffers and faults them in again (2,000-6,500 per step here);
    # what is left tuned is first touches of KV blocks as the sequences grow.
    assert tuned < untuned / 4, (tuned, untuned)


def test_only_a_cpu_engine_tunes_malloc() -> None:
    assert not keep_freed_memory(torch.device("meta"))  # its step tensors are not malloc'd
