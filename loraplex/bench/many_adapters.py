"""Many adapters through few device slots: 1,000 adapters with Zipf popularity vs one adapter.

    python -m loraplex.bench.many_adapters [--model demo] [--adapters 1000] [--slots 32] [--requests 256]
                                           [--new-tokens 64] [--zipf 1.5] [--repeats 1]

Both systems run the same requests (the reference prompts of shared/BENCHMARKS.md, cycled; greedy,
ignore EOS) on an engine with `max_loras=slots` device slots:

    one adapter     every request uses adapter 0
    many adapters   request i uses adapter k with probability ∝ 1 / (k + 1)^zipf, k < adapters

and prints generated tokens per second (median of the repeats) and many / one (target >= 0.85,
shared/BENCHMARKS.md). Each timed run gets a fresh engine, so it reads every adapter it uses from disk
(through the exchange's host tier) and loads it into a slot, and the scheduler rotates the
adapters through the slots; that is the cost measured. Runs of the two systems alternate, so load
from other processes on a shared machine slows both alike.

The adapters are rank 8 on q_proj and v_proj: adapter 0 of `loraplex.bench.adapters` (a real PEFT
adapter) and copies of it with weights redrawn per adapter (same shapes and spread, seed = index), written
to a temporary folder that is removed at the end.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path

import torch

from loraplex.bench.adapters import ATTENTION_QV, adapter_spec, make_bench_adapters
from loraplex.bench.workload import reference_params, reference_prompts

TARGET = 0.85  # shared/BENCHMARKS.md: 1,000 adapters over 32 slots ÷ 1 adapter


def make_many_adapters(n: int, out_dir: Path, base: str = "demo") -> list[Path]:
    """`n` rank-8 q/v adapters under `out_dir`: the benchmark's adapter 0 with weights redrawn per index."""
    from safetensors.torch import load_file, save_file

    spec = adapter_spec(0)
    if (spec.rank, spec.targets) != (8, ATTENTION_QV):
        raise RuntimeError(f"bench adapter 0 is expected to be rank 8 on q/v, got {spec}")
    template = make_bench_adapters(1, base=base)[0]
    tensors = load_file(template / "adapter_model.safetensors")
    spread = {name: t.float().std().item() for name, t in tensors.items()}
    paths = []
    for i in range(n):
        dest = out_dir / str(i)
        dest.mkdir(parents=True)
        shutil.copy(template / "adapter_config.json", dest)
        gen = torch.Generator().manual_seed(i)
        save_file({name: (torch.randn(t.shape, generator=gen) * spread[name]).to(t.dtype)
                   for name, t in tensors.items()}, dest / "adapter_model.safetensors")
        paths.append(dest)
    return paths


def zipf_assignment(num_requests: int, num_adapters: int, exponent: float, seed: int = 0) -> list[int]:
    """Adapter index of each request, drawn with probability ∝ 1 / (k + 1)^exponent."""
    weights = [1.0 / (k + 1) ** exponent for k in range(num_adapters)]
    return random.Random(seed).choices(range(num_adapters), weights=weights, k=num_requests)


def timed_run(model: str, slots: int, prompts: list[str], adapter_ids: list[str], new_tokens: int) -> tuple[float, str]:
    """Tokens per second of one generate() over every prompt on a fresh engine (built before the clock),
    and what the scheduler did."""
    from loraplex import LLM

    llm = LLM(model, dtype="float32", device="cpu", max_loras=slots, max_lora_rank=8)
    llm.generate(prompts[:2], reference_params(2))  # warm-up without adapters: they stay cold
    sched, lora = llm.engine.scheduler, llm.engine.lora
    assert lora is not None
    steps, loads = sched.num_steps, lora.loads
    start = time.perf_counter()
    outs = llm.generate(prompts, reference_params(new_tokens), adapter_id=adapter_ids)
    elapsed = time.perf_counter() - start
    assert all(len(o.token_ids) == new_tokens for o in outs)
    stats = (f"{sched.num_steps - steps} steps, {lora.loads - loads} slot loads, {sched.num_parks} parks, "
             f"{sched.num_preemptions} preemptions")
    return sum(len(o.token_ids) for o in outs) / elapsed, stats


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--adapters", type=int, default=1000)
    ap.add_argument("--slots", type=int, default=32, help="device slots (max_loras)")
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--zipf", type=float, default=1.5, help="popularity exponent (shared/BENCHMARKS.md: 1.5)")
    ap.add_argument("--repeats", type=int, default=1)
    args = ap.parse_args(argv)
    if args.adapters < 1 or args.slots < 1 or args.requests < 1:
        ap.error("--adapters, --slots and --requests must be at least 1")

    from loraplex.paths import resolve_model

    path = str(resolve_model(args.model))
    prompts = reference_prompts(args.requests)
    assignment = zipf_assignment(args.requests, args.adapters, args.zipf)
    counts = Counter(assignment)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-many-adapters-") as tmp:
        start = time.perf_counter()
        adapters = make_many_adapters(args.adapters, Path(tmp), base=args.model)
        print(f"made {args.adapters} rank-8 q/v adapters in {time.perf_counter() - start:.1f}s under {tmp}")
        print(f"workload: {args.requests} requests, {args.new_tokens} new tokens each, greedy, ignore EOS; "
              f"model {path}; float32; {args.slots} slots; torch threads {torch.get_num_threads()}")
        print(f"zipf {args.zipf}: {len(counts)} distinct adapters used, the most popular by "
              f"{counts.most_common(1)[0][1]} requests, {sum(1 for c in counts.values() if c == 1)} by one")
        systems = {"one adapter": [str(adapters[0])] * args.requests,
                   "many adapters": [str(adapters[k]) for k in assignment]}
        rates: dict[str, list[float]] = {name: [] for name in systems}
        stats: dict[str, str] = {}
        for _ in range(args.repeats):
            for name, ids in systems.items():
                rate, stats[name] = timed_run(path, args.slots, prompts, ids, args.new_tokens)
                rates[name].append(rate)
    results = {name: statistics.median(r) for name, r in rates.items()}
    for name, r in rates.items():
        print(f"{name:14s} {results[name]:8.1f} tokens/s   (runs: {', '.join(f'{x:.1f}' for x in r)}; "
              f"last: {stats[name]})")
    ratio = results["many adapters"] / results["one adapter"]
    pairs = [m / o for m, o in zip(rates["many adapters"], rates["one adapter"], strict=True)]
    print(f"ratio many / one {ratio:6.2f}x   (target >= {TARGET:g}; pairs {', '.join(f'{x:.2f}' for x in pairs)})")
    print(f"load average (1 min): {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
