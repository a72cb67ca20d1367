"""Multi-LoRA offline throughput, side by side in one run: loraplex vs HF transformers + PEFT.

    python -m loraplex.bench.lora [--model demo] [--adapters 8] [--requests 32] [--new-tokens 64]
                                  [--repeats 3] [--skip-hf] [--lora-dtype float32 [bfloat16]]

On the reference workload (shared/BENCHMARKS.md; float32, greedy, ignore EOS) with the benchmark
adapters of `loraplex.bench.adapters`, prints generated tokens per second (median of the repeats) of:

    loraplex base only          every request without an adapter
    loraplex distinct           request i uses adapter i % N
    loraplex one adapter        every request uses adapter 0
    hf+peft distinct            PEFT's mixed batch, `generate(..., adapter_names=[...])`, same assignment
    loraplex distinct, bfloat16 with `--lora-dtype float32 bfloat16`: an engine storing the adapters' weights
                                in bfloat16 (products in float32), same assignment

and the ratios distinct / base only, distinct / hf+peft and one adapter / base only. One `LLM` with
`max_loras=N` serves all three loraplex rows, so every adapter stays resident in a slot; each system is
warmed up once (which also loads the adapters) before timing, and the repeats go round-robin over
the systems.

PEFT's mixed-batch path rejects DoRA adapters, so the mix has none. It does accept adapters with
different ranks, target modules and rsLoRA in one batch: a layer an adapter does not target leaves that
adapter's rows of the batch alone. The adapters are only random-weight stand-ins, so throughput is what
this measures, not output quality. Timings on shared machines drift: only ratios within one run mean much.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from loraplex.bench.adapters import load_peft_adapters, make_bench_adapters
from loraplex.bench.offline import _time
from loraplex.bench.workload import add_workload_arguments, reference_params, reference_prompts

MAX_LORA_RANK = 64
# shared/BENCHMARKS.md
TARGETS = {"distinct / base only": 0.90, "distinct / hf+peft": 6.0}


def run_loraplex(llm: Any, prompts: list[str], new_tokens: int,
                 adapter_ids: Sequence[str | None]) -> Callable[[], int]:
    """A timed call: `llm` generates for every prompt, prompt i with adapter `adapter_ids[i]`."""
    ids = list(adapter_ids)
    llm.generate(prompts, reference_params(2), adapter_id=ids)  # warm-up; loads every adapter used
    params = reference_params(new_tokens)

    def go() -> int:
        outs = llm.generate(prompts, params, adapter_id=ids)
        assert all(len(o.token_ids) == new_tokens for o in outs)
        return sum(len(o.token_ids) for o in outs)

    return go


def run_hf_peft(model_path: str, adapters: list[Path], prompts: list[str], new_tokens: int,
                adapter_index: Sequence[int]) -> Callable[[], int]:
    """A timed call: HF `generate` on one left-padded batch, prompt i with adapter `adapter_index[i]`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_path, padding_side="left")
    base = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32)
    model = load_peft_adapters(base, adapters)
    batch = tok(prompts, return_tensors="pt", padding=True)
    names = [f"a{i}" for i in adapter_index]

    def generate(tokens: int) -> int:
        with torch.inference_mode():
            out = model.generate(**batch, adapter_names=names, max_new_tokens=tokens, min_new_tokens=tokens,
                                 do_sample=False, pad_token_id=tok.pad_token_id or 0)
        return (out.shape[1] - batch.input_ids.shape[1]) * out.shape[0]

    generate(2)  # warm-up
    return lambda: generate(new_tokens)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--adapters", type=int, default=8, help="distinct adapters N; request i uses adapter i %% N")
    ap.add_argument("--skip-hf", action="store_true", help="time loraplex only (HF+PEFT is the slow part)")
    ap.add_argument("--lora-dtype", nargs="+", default=["float32"], choices=["float32", "bfloat16"],
                    help="adapters' weight dtype; each one after the first adds a `distinct` run of an engine "
                         "storing them so, side by side")
    args = ap.parse_args(argv)
    if args.adapters < 1:
        ap.error(f"--adapters must be at least 1, got {args.adapters}")

    from loraplex import LLM
    from loraplex.paths import resolve_model

    path = str(resolve_model(args.model))
    prompts = reference_prompts(args.requests)
    adapters = make_bench_adapters(args.adapters, base=args.model)
    index = [i % args.adapters for i in range(args.requests)]
    print(f"workload: {args.requests} requests, {args.new_tokens} new tokens each, greedy, ignore EOS; "
          f"model {path}; float32; torch threads {torch.get_num_threads()}")
    print(f"adapters: {args.adapters} under {adapters[0].parent}")
    load_before = os.getloadavg()[0]

    def engine(lora_dtype: str) -> LLM:
        return LLM(path, dtype="float32", device="cpu", max_loras=args.adapters, max_lora_rank=MAX_LORA_RANK,
                   lora_dtype=lora_dtype)

    llm = engine(args.lora_dtype[0])
    systems: list[tuple[str, Callable[[], Callable[[], int]]]] = [
        ("loraplex base only", lambda: run_loraplex(llm, prompts, args.new_tokens, [None] * args.requests)),
        ("loraplex distinct", lambda: run_loraplex(llm, prompts, args.new_tokens,
                                                   [str(adapters[i]) for i in index])),
        ("loraplex one adapter", lambda: run_loraplex(llm, prompts, args.new_tokens,
                                                      [str(adapters[0])] * args.requests)),
    ]
    for lora_dtype in args.lora_dtype[1:]:
        other = engine(lora_dtype)
        systems.append((f"loraplex distinct, {lora_dtype}", functools.partial(
            run_loraplex, other, prompts, args.new_tokens, [str(adapters[i]) for i in index])))
    if not args.skip_hf:
        systems.append(("hf+peft distinct", lambda: run_hf_peft(path, adapters, prompts, args.new_tokens, index)))
    # Every system is set up (and warmed up) first, then the repeats go round-robin over them, so a
    # neighbour's load on a shared machine slows every system's runs alike rather than one system's.
    timed = [(name, make()) for name, make in systems]
    rates: dict[str, list[float]] = {name: [] for name, _ in timed}
    for _ in range(args.repeats):
        for name, go in timed:
            rates[name].append(_time(go, 1)[0])
    results = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:22s} {results[name]:8.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in r)})")

    ratios = {"distinct / base only": results["loraplex distinct"] / results["loraplex base only"],
              "one adapter / base only": results["loraplex one adapter"] / results["loraplex base only"]}
    for lora_dtype in args.lora_dtype[1:]:
        ratios[f"distinct, {lora_dtype} / base only"] = results[f"loraplex distinct, {lora_dtype}"] / results[
            "loraplex base only"]
    if "hf+peft distinct" in results:
        ratios["distinct / hf+peft"] = results["loraplex distinct"] / results["hf+peft distinct"]
    for name, value in ratios.items():
        target = f"   (target >= {TARGETS[name]:g})" if name in TARGETS else ""
        print(f"ratio {name:24s} {value:6.2f}x{target}")
    # Other processes' load is the usual reason two runs disagree; this says whether there was any.
    print(f"load average (1 min): {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
