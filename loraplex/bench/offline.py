"""Offline throughput, side by side in one run: loraplex vs HF transformers on the same workload.

    python -m loraplex.bench.offline [--model demo] [--requests 32] [--new-tokens 64] [--repeats 3]
                                     [--dtype float32|bfloat16]

Prints generated tokens per second for each system (median of the repeats) and the ratio.
Timings on shared machines drift: only the ratio within one run means much.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch

from loraplex.bench.workload import add_workload_arguments, reference_params, reference_prompts


def _time(fn: Callable[[], int], repeats: int) -> tuple[float, list[float]]:
    rates = []
    for _ in range(repeats):
        start = time.perf_counter()
        tokens = fn()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates), rates


def run_loraplex(model: str, prompts: list[str], new_tokens: int, dtype: str) -> Callable[[], int]:
    from loraplex import LLM

    llm = LLM(model, dtype=dtype, device="cpu")
    params = reference_params(new_tokens)
    llm.generate(prompts[:2], params)  # warm-up

    def go() -> int:
        outs = llm.generate(prompts, params)
        assert all(len(o.token_ids) == new_tokens for o in outs)
        return sum(len(o.token_ids) for o in outs)

    return go


def run_hf(model_path: str, prompts: list[str], new_tokens: int, dtype: str) -> Callable[[], int]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=getattr(torch, dtype)).eval()
    batch = tok(prompts, return_tensors="pt", padding=True)

    def go() -> int:
        with torch.inference_mode():
            out = model.generate(**batch, max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                                 pad_token_id=tok.pad_token_id or 0)
        return (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]

    return go


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"],
                    help="both systems run in this dtype on the CPU (bfloat16 is fast on CPUs with AMX)")
    args = ap.parse_args(argv)

    from loraplex.paths import resolve_model

    path = str(resolve_model(args.model))
    prompts = reference_prompts(args.requests)
    print(f"workload: {args.requests} requests, {args.new_tokens} new tokens each, greedy, ignore EOS; "
          f"model {path}; {args.dtype}; torch threads {torch.get_num_threads()}")
    results = {}
    for name, make in (("loraplex", lambda: run_loraplex(path, prompts, args.new_tokens, args.dtype)),
                       ("hf-transformers", lambda: run_hf(path, prompts, args.new_tokens, args.dtype))):
        median, rates = _time(make(), args.repeats)
        results[name] = median
        print(f"{name:16s} {median:8.1f} tokens/s   (runs: {', '.join(f'{r:.1f}' for r in rates)})")
    print(f"ratio loraplex / hf-transformers: {results['loraplex'] / results['hf-transformers']:.2f}x")


if __name__ == "__main__":
    main()
