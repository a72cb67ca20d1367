"""Quantized base models, side by side in one run (issue 16): quality and speed of float32 vs int8 and int4.

    python -m loraplex.bench.quant [--model demo] [--adapters 8] [--requests 32] [--new-tokens 64]
                                   [--repeats 3] [--methods none int8 int4] [--solo 4]

For each `--quantize` method: the perplexity of the model on a fixed held-out text (loraplex/bench/
heldout.txt, ~1,300 tokens of English prose that the int8 calibration text does not contain), read in
windows of 512 tokens through the engine's prompt logprobs; then generated tokens per second on the
reference workload (shared/BENCHMARKS.md: 32 requests, ~16-token prompts, 64 greedy tokens) on the base
model and with `--adapters` distinct adapters (request i uses adapter i % N; the benchmark adapters of
`loraplex.bench.adapters`), and `--solo` of its requests one at a time on the base model (batch 1, each
request on every engine in turn). Prints the perplexity change and the speed ratios against float32, with
issue 16's targets: int8 perplexity within 1 %, int4 within 5 %, int8 base ≥ 1.8× float32 base, int8 with
distinct adapters ≥ 0.85× int8 base. (The demo model's decoder linears come from Q4_1 blocks of its GGUF
file, which int4 finds again exactly; its LM head, which int4 leaves in float, from 8-bit ones.) The
repeats go round-robin over the engines, which stay loaded together.
"""

from __future__ import annotations

import argparse
import math
import statistics
import time
from importlib import resources
from typing import Any

from loraplex.bench.adapters import make_bench_adapters
from loraplex.bench.workload import add_workload_arguments, reference_params, reference_prompts

WINDOW = 512


def heldout_text() -> str:
    return resources.files("loraplex.bench").joinpath("heldout.txt").read_text(encoding="utf-8")


def perplexity(llm: Any, text: str) -> tuple[float, int]:
    """exp of the mean negative logprob of every token of `text` after the first of each window."""
    from loraplex import SamplingParams

    ids = llm.engine.tokenizer.encode(text)
    windows = [ids[i:i + WINDOW] for i in range(0, len(ids), WINDOW) if len(ids) - i > 1]
    outs = llm.generate(windows, SamplingParams(max_new_tokens=1, prompt_logprobs=True))
    logprobs = [lp for out in outs for lp in (out.prompt_logprobs or [])[1:] if lp is not None]
    return math.exp(-sum(logprobs) / len(logprobs)), len(logprobs)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_workload_arguments(ap)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--methods", nargs="+", default=["none", "int8", "int4"])
    ap.add_argument("--solo", type=int, default=4, help="requests also run one at a time (batch 1), base model")
    args = ap.parse_args(argv)
    from loraplex import LLM

    prompts = reference_prompts(args.requests)
    params = reference_params(args.new_tokens)
    adapters = [str(p) for p in make_bench_adapters(args.adapters, base=args.model)] if args.adapters else []
    engines, quality = {}, {}
    for method in args.methods:
        start = time.perf_counter()
        llm = LLM(args.model, device="cpu", quantize=method, max_loras=max(1, len(adapters)), max_lora_rank=64)
        loaded = time.perf_counter() - start
        ppl, tokens = perplexity(llm, heldout_text())
        quality[method] = ppl
        sizes = ", ".join(f"{b / 2**20:.0f} MiB {dtype}" for dtype, b in llm.engine.weight_bytes.items())
        print(f"{method:>5}: loaded in {loaded:.1f} s; weights {sizes}; perplexity {ppl:.4f} over {tokens} tokens",
              flush=True)
        engines[method] = llm
    runs: dict[str, list[float]] = {}
    solo: dict[str, list[tuple[int, float]]] = {}
    cases: dict[str, list[str | None]] = {"base": [None] * len(prompts)}
    if adapters:
        cases[f"{len(adapters)} distinct"] = [adapters[i % len(adapters)] for i in range(len(prompts))]
    for llm in engines.values():  # warm-up: loads the adapters into their slots
        for ids in cases.values():
            llm.generate(prompts[:len(adapters) or 2], params, adapter_id=ids[:len(adapters) or 2])
    for _ in range(args.repeats):
        for method, llm in engines.items():
            for case, ids in cases.items():
                start = time.perf_counter()
                outs = llm.generate(prompts, params, adapter_id=ids)
                rate = sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start)
                runs.setdefault(f"{method} {case}", []).append(rate)
        for i in range(args.solo):  # batch 1: each request on every engine in turn
            for method, llm in engines.items():
                start = time.perf_counter()
                out = llm.generate(prompts[i:i + 1], params)[0]
                solo.setdefault(method, []).append((len(out.token_ids), time.perf_counter() - start))
    for method, timed in solo.items():  # batch 1: tokens over time of all its requests, as one rate
        runs[f"{method} batch 1"] = [sum(n for n, _ in timed) / sum(t for _, t in timed)]
    rates = {name: statistics.median(values) for name, values in runs.items()}
    for name, rate in rates.items():
        print(f"{name:<20} {rate:>8.1f} tokens/s   (runs: {', '.join(f'{r:.0f}' for r in runs[name])})")
    if "none" in quality:
        for method in engines:
            if method != "none":
                change = 100 * (quality[method] / quality["none"] - 1)
                target = {"int8": 1.0, "int4": 5.0}.get(method)
                shown = f"   (target <= +{target:g} %)" if target is not None else ""
                print(f"perplexity {method} / float32: {change:+.2f} %{shown}")
                print(f"speed {method} base / float32 base: {rates[f'{method} base'] / rates['none base']:.2f}x"
                      + ("   (target >= 1.8x)" if method == "int8" else ""))
                if solo:
                    print(f"speed {method} batch 1 / float32 batch 1: "
                          f"{rates[f'{method} batch 1'] / rates['none batch 1']:.2f}x")
    for method in engines:
        for case in cases:
            if case != "base":
                print(f"speed {method} {case} / {method} base: {rates[f'{method} {case}'] / rates[f'{method} base']:.2f}x"
                      + ("   (target >= 0.85x)" if method == "int8" else ""))


if __name__ == "__main__":
    main()
