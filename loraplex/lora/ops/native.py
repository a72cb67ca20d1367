"""Native CPU LoRA delta op (the `native` backend); same contract as `add_lora_reference`.

The torch backend pays a Python-dispatched matmul pair per adapter segment per layer, 10-25 µs a pair
however few tokens the segment holds; with 8 adapters in a decode step that is most of the LoRA cost.
This backend hands all of a layer's short segments to one C call (`lora_cpu.c`), which is bound by
reading the adapters' weights once, and reads only the non-zero blocks of a packed layer's B.
Segments longer than `MAX_NATIVE_RUN` tokens (prefill chunks) go to the torch path, where MKL's
blocked GEMMs beat the C loops.

The C file is compiled on first use with the system C compiler (`$CC`, else `cc`) for this machine
(`-march=native`) into `$LORAPLEX_HOME/kernels/`, keyed by the source, the flags, the compiler and
the CPU, so a changed kernel or another machine never loads a stale build. Without a compiler the
backend is unavailable and `auto` uses the torch backend. float32 CPU activations, with float32 adapter
weights or bfloat16 ones (`--lora-dtype bfloat16`: a second build that widens each weight as it loads it);
anything else (bfloat16 activations, CUDA) takes the torch path.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import platform
from collections.abc import Callable
from pathlib import Path

import torch

from loraplex import cbuild
from loraplex.cbuild import NativeUnavailable
from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops.cpu import add_lora, add_segment

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("lora_cpu.c")
FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC") + (
    # GCC's x86 default of 256-bit vectors leaves AVX-512 machines ~20 % slower on this kernel.
    ("-mprefer-vector-width=512",) if platform.machine() in ("x86_64", "AMD64") else ())
MAX_NATIVE_RUN = 16
"""Longest segment (tokens) the C kernel takes; longer ones are compute bound and go to MKL."""


def _build_key(cc: str) -> str:
    return cbuild.build_key(cc, SOURCE, FLAGS)


_kernel_dir = cbuild.kernel_dir


BF16_WEIGHTS = ("-DLORAPLEX_BF16_WEIGHTS",)
"""The build for bfloat16 adapter weights (`--lora-dtype bfloat16`): x and the sums stay float32."""


@functools.cache
def load_kernel(bf16_weights: bool = False) -> Callable[..., int]:
    """The compiled `loraplex_add_lora_f32` (for float32 adapter weights, or bfloat16 ones), built on first use;
    raises NativeUnavailable."""
    library = cbuild.load_library(SOURCE, FLAGS + (BF16_WEIGHTS if bf16_weights else ()), "the native LoRA kernel")
    fn = library.loraplex_add_lora_f32
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    fn.argtypes = [ptr, i64, ptr, i64,  # out, x
                   ptr, i64, i64, ptr, i64, i64,  # a, b
                   ptr, ptr, i64, i64,  # ranks, scales, in, out features
                   ptr, i64,  # blocks
                   ptr, ptr, ptr, i64,  # segments
                   i64, i64, ctypes.c_int]  # tokens, r_max, threads
    fn.restype = ctypes.c_int
    return fn  # type: ignore[no-any-return]


def native_available() -> str | None:
    """None when the native kernel works here, else why not."""
    try:
        load_kernel()
    except NativeUnavailable as exc:
        return str(exc)
    return None


class _Runs:
    """A batch's segments split at MAX_NATIVE_RUN: short ones as C arrays, long ones as a list."""

    def __init__(self, batch: LoRABatch) -> None:
        segments = list(zip(batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list, strict=True))
        short = [i for i, (_, length, _) in enumerate(segments) if length <= MAX_NATIVE_RUN]
        self.starts, self.lens, self.slots = batch.seg_starts, batch.seg_lens, batch.seg_slots
        if len(short) < len(segments):
            index = torch.tensor(short, dtype=torch.long)
            self.starts, self.lens, self.slots = (t.index_select(0, index) for t in (self.starts, self.lens,
                                                                                      self.slots))
        self.num_short = len(short)
        self.long = [seg for seg in segments if seg[1] > MAX_NATIVE_RUN]  # (start, length, slot)


_last_runs: tuple[LoRABatch, _Runs] | None = None


def _runs(batch: LoRABatch) -> _Runs:
    # Every wrapped layer of a step sees the same batch: split it once per step, not once per layer.
    global _last_runs
    cached = _last_runs
    if cached is not None and cached[0] is batch:
        return cached[1]
    runs = _Runs(batch)
    _last_runs = (batch, runs)
    return runs


WEIGHT_DTYPES = (torch.float32, torch.bfloat16)


def _fits(out: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, ranks: torch.Tensor,
          scales: torch.Tensor) -> bool:
    """Whether the C kernel can take these operands (checked every call, so kept to cheap attributes)."""
    f32 = torch.float32
    return (out.dtype is f32 and x.dtype is f32 and a.dtype in WEIGHT_DTYPES and b.dtype is a.dtype and scales.dtype is f32
            and ranks.dtype is torch.long and out.is_cpu and x.is_cpu and a.is_cpu and b.is_cpu
            and ranks.is_cpu and scales.is_cpu and out.stride(1) == 1 and x.stride(1) == 1
            and a.stride(2) == 1 and b.stride(2) == 1 and ranks.is_contiguous() and scales.is_contiguous())


def add_lora_native(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4] long: B's non-zero blocks
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return it; semantics of `add_lora_reference`."""
    if not batch.has_lora:
        return out
    assert batch.segmented, "this LoRA op reads segments; a CUDA graph's batch has none"
    if not _fits(out, x, a, b, ranks, scales):
        return add_lora(out, x, a, b, ranks, scales, batch)
    runs = _runs(batch)
    if runs.num_short:
        block_table, num_blocks = None, 0
        if blocks is not None and blocks.dtype is torch.long and blocks.is_cpu and blocks.is_contiguous():
            block_table, num_blocks = blocks.data_ptr(), blocks.shape[1]
        rc = load_kernel(a.dtype is torch.bfloat16)(
            out.data_ptr(), out.stride(0), x.data_ptr(), x.stride(0),
            a.data_ptr(), a.stride(0), a.stride(1), b.data_ptr(), b.stride(0), b.stride(1),
            ranks.data_ptr(), scales.data_ptr(), x.shape[1], out.shape[1],
            block_table, num_blocks,
            runs.starts.data_ptr(), runs.lens.data_ptr(), runs.slots.data_ptr(), runs.num_short,
            x.shape[0], a.shape[1], torch.get_num_threads(),
        )
        if rc != 0:
            raise MemoryError("the native LoRA kernel could not allocate its scratch memory")
    for start, length, slot in runs.long:
        rows = slice(start, start + length)
        add_segment(out[rows], x[rows], a, b, slot, int(ranks[slot]), float(scales[slot]))
    return out
