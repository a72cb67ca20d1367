"""Time the CPU LoRA delta strategies against the base matmul they ride on.

    python scripts/bench_lora_ops.py [--dtype float32|bfloat16] [--threads N]

Shapes are the demo model's (hidden 576; q/o 576, MLP 1536, k/v 192) with 32 decode tokens and
512 prefill tokens over S distinct adapters of mixed rank 8/16/64 in r_max=64 slot buffers.
"grouped" token order is what the runner produces; "interleaved" is the worst case for segments.
Strategies (loraplex/lora/ops/cpu.py): segs = segment loop, sort = sort then loop.
Times are medians in microseconds; the x-base columns are LoRA time / base `x @ W.T` time.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from functools import partial

import torch

from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops.cpu import add_lora_segments, add_lora_sorted

IN_FEATURES = 576
NUM_SLOTS = 32
R_MAX = 64
RANK_CYCLE = (8, 16, 64)


def median_us(fn: Callable[[], object], min_time: float = 0.2) -> float:
    for _ in range(3):
        fn()
    samples: list[float] = []
    deadline = time.perf_counter() + min_time
    while time.perf_counter() < deadline or len(samples) < 10:
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
    return statistics.median(samples) * 1e6


def token_slots(num_tokens: int, num_adapters: int, interleaved: bool) -> list[int]:
    if interleaved:
        return [t % num_adapters for t in range(num_tokens)]
    return [t * num_adapters // num_tokens for t in range(num_tokens)]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0 = torch default)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    dtype = getattr(torch, args.dtype)
    torch.manual_seed(0)

    print(
        f"dtype={args.dtype} threads={torch.get_num_threads()} in={IN_FEATURES} slots={NUM_SLOTS} r_max={R_MAX}"
    )
    header = (
        f"{'tokens':>6} {'out':>5} {'S':>3} {'order':>11} {'base_us':>8} {'segs_us':>8}"
        f" {'sort_us':>8} {'segs/base':>9} {'sort/base':>9} {'best':>8}"
    )
    print(header)
    print("-" * len(header))
    ranks = torch.tensor([RANK_CYCLE[i % len(RANK_CYCLE)] for i in range(NUM_SLOTS)])
    scales = torch.rand(NUM_SLOTS) + 0.5
    for num_tokens in (32, 512):
        for out_features in (576, 1536, 192):
            x = torch.randn(num_tokens, IN_FEATURES, dtype=dtype)
            w = torch.randn(out_features, IN_FEATURES, dtype=dtype)
            a = torch.randn(NUM_SLOTS, R_MAX, IN_FEATURES, dtype=dtype)
            b = torch.randn(NUM_SLOTS, out_features, R_MAX, dtype=dtype)
            out = torch.zeros(num_tokens, out_features, dtype=dtype)
            base = median_us(partial(torch.matmul, x, w.T))
            for num_adapters in (1, 8, 32):
                for interleaved in (False, True) if num_adapters > 1 else (False,):
                    slots = token_slots(num_tokens, num_adapters, interleaved)
                    op_args = (out, x, a, b, ranks, scales, LoRABatch.from_token_slots(slots, "cpu"))
                    segs = median_us(partial(add_lora_segments, *op_args))
                    srt = median_us(partial(add_lora_sorted, *op_args))
                    order = "interleaved" if interleaved else "grouped"
                    best = min((segs, "segments"), (srt, "sorted"))[1]
                    print(
                        f"{num_tokens:>6} {out_features:>5} {num_adapters:>3} {order:>11} {base:>8.1f} {segs:>8.1f}"
                        f" {srt:>8.1f} {segs / base:>9.2f} {srt / base:>9.2f} {best:>8}"
                    )


if __name__ == "__main__":
    main()
