"""LoRA op micro-benchmark on a GPU: the Triton kernels vs the pure-torch `add_lora`.

    python -m loraplex.bench.kernels [--hidden 2048] [--rank 16] [--slots 8]

One square LoRA layer of a 1B-size model (hidden 2048 in and out, rank 16, bfloat16, 8 resident
slots), at batch sizes 1 to 64, for two slot assignments:

    distinct    token i uses slot i % slots (a decode step of many adapters, interleaved)
    shared      every token uses slot 0 (one adapter, one segment)

Prints the median time per call of each op (`triton.testing.do_bench`: warm-up, cache flush between
runs) and torch / triton. Needs CUDA; elsewhere it says so and exits 0.
"""

from __future__ import annotations

import argparse

import torch

from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops import AddLoRA, add_lora

BATCH_SIZES = (1, 2, 4, 8, 16, 32, 64)
DTYPE = torch.bfloat16


def time_op(op: AddLoRA, batch_size: int, slots_of: str, hidden: int, rank: int, num_slots: int) -> float:
    """Median milliseconds of one `op` call on random CUDA inputs."""
    import triton.testing

    gen = torch.Generator(device="cuda").manual_seed(0)

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=gen, device="cuda", dtype=DTYPE)

    a = randn(num_slots, rank, hidden) / hidden**0.5  # [slots, rank, hidden]
    b = randn(num_slots, rank, hidden) / rank  # [slots, rank, hidden]
    ranks = torch.full((num_slots,), rank, dtype=torch.long, device="cuda")  # [slots]
    scales = torch.ones(num_slots, device="cuda")  # [slots]
    x = randn(batch_size, hidden)  # [batch, hidden]
    out = randn(batch_size, hidden)  # [batch, hidden]
    token_slots = [i % num_slots for i in range(batch_size)] if slots_of == "distinct" else [0] * batch_size
    batch = LoRABatch.from_token_slots(token_slots, "cuda")
    return float(triton.testing.do_bench(lambda: op(out, x, a, b, ranks, scales, batch, None), return_mode="median"))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        print("loraplex.bench.kernels times GPU kernels and needs a CUDA device; none found, nothing to do.")
        return
    from loraplex.lora.ops.triton_ops import add_lora_triton

    print(f"LoRA op, hidden {args.hidden}, rank {args.rank}, {args.slots} slots, {DTYPE}, "
          f"{torch.cuda.get_device_name()}")
    print(f"{'batch':>5}  {'slots':<8}  {'torch ms':>9}  {'triton ms':>9}  {'torch/triton':>12}")
    for batch_size in BATCH_SIZES:
        for slots_of in ("distinct", "shared"):
            torch_ms = time_op(add_lora, batch_size, slots_of, args.hidden, args.rank, args.slots)
            triton_ms = time_op(add_lora_triton, batch_size, slots_of, args.hidden, args.rank, args.slots)
            print(f"{batch_size:>5}  {slots_of:<8}  {torch_ms:>9.4f}  {triton_ms:>9.4f}  "
                  f"{torch_ms / triton_ms:>11.2f}x")


if __name__ == "__main__":
    main()
