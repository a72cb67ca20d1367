"""Triton LoRA delta op (the GPU backend); same contract as `add_lora_reference`.

Two kernels per strategy, shrink `h = x · Aᵀ` into a float32 scratch `[num_tokens, r_max]`, then
expand `out += scale · h · Bᵀ` (the scale is fused into the expand's epilogue):

- segments (prefill-shaped batches): one program per (segment, row tile, rank or output tile), all
  rows of a tile sharing one slot, so both products are `tl.dot` tiles.
- gather (decode-shaped batches, vLLM's "bgmv"): one program per (token, rank or output tile), each
  token reading its own slot from `token_slots`; a matrix-vector product, no tile wasted on rows of
  another segment when segments are one token long.

Every program reads its slot's rank from `ranks`: shrink programs whose rank tile starts past the
rank exit at once, and the expand loops over rank tiles only up to the rank, so mixed ranks never pay
for r_max and nothing past a slot's rank is read (its padding may hold anything). Tokens of
EMPTY_SLOT get no program work and their rows of `out` are never written.

Operands are upcast to float32 in registers. bfloat16 and float16 values are exact in tf32, so for
16-bit inputs the shrink's tf32 dot is a 16-bit dot with float32 accumulation; float32 inputs use an
IEEE dot so they match the torch reference to float32 rounding. The expand's left operand is the float32
scratch `h`, which tf32 would round to 10 bits (on an H200 that put a float16 result 1.7e-3 off the
float32 reference, beyond one float16 rounding), so the expand always uses an IEEE dot. (It also avoids triton 3.9's interpreter, which
gets bfloat16 `tl.dot` wrong.) The op is memory bound at LoRA ranks, so the slower tf32 rate does not
show.

On CPU the kernels run only under Triton's interpreter (`TRITON_INTERPRET=1` set before this module
is imported), which is how the tests check them on machines without a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from loraplex.lora.batch import LoRABatch

BLOCK_M = 16  # rows per segment tile: the smallest tl.dot tile
BLOCK_R = 16  # rank tile: a rank-16 adapter is one tile, a rank-64 one four
BLOCK_K = 64  # input features per shrink step
BLOCK_N = 64  # output features per expand program
GATHER_BLOCK_K = 128
GATHER_BLOCK_N = 128
SEGMENT_MIN_MEAN_TOKENS = BLOCK_M // 2
"""Segments kernels when adapter runs average at least half a row tile; gather kernels otherwise."""


@triton.jit
def _shrink_segments_kernel(
    x_ptr, a_ptr, h_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, ranks_ptr, in_features,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ht, stride_hr,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr,
):
    """h[rows, r tile] = x[rows] · a[slot, r tile]ᵀ for one row tile of one segment."""
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    r0 = tl.program_id(2) * BLOCK_R
    seg_len = tl.load(seg_lens_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    # Grids are sized for the longest segment and r_max; shorter ones and lower ranks stop here.
    if m0 < seg_len and r0 < rank:
        start = tl.load(seg_starts_ptr + seg)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        row_mask = offs_m < seg_len
        r_mask = offs_r < rank
        rows = start + offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_R), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < in_features
            x = tl.load(x_ptr + rows[:, None] * stride_xt + k[None, :] * stride_xk,
                        mask=row_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_K]
            a = tl.load(a_ptr + slot * stride_as + offs_r[None, :] * stride_ar + k[:, None] * stride_ak,
                        mask=r_mask[None, :] & k_mask[:, None], other=0.0)  # [BLOCK_K, BLOCK_R]
            acc += tl.dot(x.to(tl.float32), a.to(tl.float32), input_precision=PRECISION)
        tl.store(h_ptr + rows[:, None] * stride_ht + offs_r[None, :] * stride_hr, acc,
                 mask=row_mask[:, None] & r_mask[None, :])


@triton.jit
def _expand_segments_kernel(
    h_ptr, b_ptr, out_ptr, seg_starts_ptr, seg_lens_ptr, seg_slots_ptr, ranks_ptr, scales_ptr,
    out_features,
    stride_ht, stride_hr, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[rows, n tile] += scale[slot] · h[rows, :rank] · b[slot, :rank, n tile]."""
    seg = tl.program_id(0)
    m0 = tl.program_id(1) * BLOCK_M
    n0 = tl.program_id(2) * BLOCK_N
    seg_len = tl.load(seg_lens_ptr + seg)
    slot = tl.load(seg_slots_ptr + seg)
    rank = tl.load(ranks_ptr + slot)
    if m0 < seg_len and rank > 0:
        start = tl.load(seg_starts_ptr + seg)
        scale = tl.load(scales_ptr + slot).to(tl.float32)
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        row_mask = offs_m < seg_len
        n_mask = offs_n < out_features
        rows = start + offs_m
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + offs_r
            r_mask = r < rank
            h = tl.load(h_ptr + rows[:, None] * stride_ht + r[None, :] * stride_hr,
                        mask=row_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_R]
            b = tl.load(b_ptr + slot * stride_bs + offs_n[None, :] * stride_bn + r[:, None] * stride_br,
                        mask=n_mask[None, :] & r_mask[:, None], other=0.0)  # [BLOCK_R, BLOCK_N]
            acc += tl.dot(h, b.to(tl.float32), input_precision=PRECISION)
        out_ptrs = out_ptr + rows[:, None] * stride_ot + offs_n[None, :] * stride_on
        out_mask = row_mask[:, None] & n_mask[None, :]
        current = tl.load(out_ptrs, mask=out_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=out_mask)


@triton.jit
def _shrink_gather_kernel(
    x_ptr, a_ptr, h_ptr, token_slots_ptr, ranks_ptr, in_features,
    stride_xt, stride_xk, stride_as, stride_ar, stride_ak, stride_ht, stride_hr,
    BLOCK_R: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """h[t, r tile] = a[slot_t, r tile] · x[t] for one token t and its own slot."""
    t = tl.program_id(0)
    r0 = tl.program_id(1) * BLOCK_R
    slot = tl.load(token_slots_ptr + t)
    # EMPTY_SLOT (-1) tokens read no rank: the load is masked off and the rank taken as 0.
    rank = tl.load(ranks_ptr + slot, mask=slot >= 0, other=0)
    if r0 < rank:
        offs_r = r0 + tl.arange(0, BLOCK_R)
        offs_k = tl.arange(0, BLOCK_K)
        r_mask = offs_r < rank
        acc = tl.zeros((BLOCK_R,), dtype=tl.float32)
        for k0 in range(0, in_features, BLOCK_K):
            k = k0 + offs_k
            k_mask = k < in_features
            x = tl.load(x_ptr + t * stride_xt + k * stride_xk, mask=k_mask, other=0.0)  # [BLOCK_K]
            a = tl.load(a_ptr + slot * stride_as + offs_r[:, None] * stride_ar + k[None, :] * stride_ak,
                        mask=r_mask[:, None] & k_mask[None, :], other=0.0)  # [BLOCK_R, BLOCK_K]
            acc += tl.sum(a.to(tl.float32) * x.to(tl.float32)[None, :], axis=1)
        tl.store(h_ptr + t * stride_ht + offs_r * stride_hr, acc, mask=r_mask)


@triton.jit
def _expand_gather_kernel(
    h_ptr, b_ptr, out_ptr, token_slots_ptr, ranks_ptr, scales_ptr, out_features,
    stride_ht, stride_hr, stride_bs, stride_bn, stride_br, stride_ot, stride_on,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr,
):
    """out[t, n tile] += scale[slot_t] · h[t, :rank] · b[slot_t, :rank, n tile]."""
    t = tl.program_id(0)
    n0 = tl.program_id(1) * BLOCK_N
    slot = tl.load(token_slots_ptr + t)
    rank = tl.load(ranks_ptr + slot, mask=slot >= 0, other=0)
    if rank > 0:
        scale = tl.load(scales_ptr + slot).to(tl.float32)
        offs_n = n0 + tl.arange(0, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        n_mask = offs_n < out_features
        acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
        for r0 in range(0, rank, BLOCK_R):
            r = r0 + offs_r
            r_mask = r < rank
            h = tl.load(h_ptr + t * stride_ht + r * stride_hr, mask=r_mask, other=0.0)  # [BLOCK_R]
            b = tl.load(b_ptr + slot * stride_bs + offs_n[:, None] * stride_bn + r[None, :] * stride_br,
                        mask=n_mask[:, None] & r_mask[None, :], other=0.0)  # [BLOCK_N, BLOCK_R]
            acc += tl.sum(b.to(tl.float32) * h[None, :], axis=1)
        out_ptrs = out_ptr + t * stride_ot + offs_n * stride_on
        current = tl.load(out_ptrs, mask=n_mask, other=0.0).to(tl.float32)
        tl.store(out_ptrs, (current + scale * acc).to(out_ptr.dtype.element_ty), mask=n_mask)


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_device(x: torch.Tensor) -> None:
    if x.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"the triton LoRA backend runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), "
            f"got tensors on {x.device}"
        )


def add_lora_triton_segments(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Segment kernels: one tile program per (segment, row tile, rank or output tile)."""
    if not batch.has_lora:
        return out
    _check_device(x)
    num_tokens, in_features = x.shape
    r_max = a.shape[1]
    out_features = out.shape[1]
    precision = _dot_precision(x.dtype)
    h = torch.empty(num_tokens, r_max, dtype=torch.float32, device=x.device)  # [num_tokens, r_max]
    num_segments = len(batch.seg_lens_list)
    row_tiles = triton.cdiv(max(batch.seg_lens_list), BLOCK_M)
    _shrink_segments_kernel[(num_segments, row_tiles, triton.cdiv(r_max, BLOCK_R))](
        x, a, h, batch.seg_starts, batch.seg_lens, batch.seg_slots, ranks, in_features,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_K=BLOCK_K, PRECISION=precision,
    )
    _expand_segments_kernel[(num_segments, row_tiles, triton.cdiv(out_features, BLOCK_N))](
        h, b, out, batch.seg_starts, batch.seg_lens, batch.seg_slots, ranks, scales, out_features,
        h.stride(0), h.stride(1), b.stride(0), b.stride(2), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_M=BLOCK_M, BLOCK_R=BLOCK_R, BLOCK_N=BLOCK_N, PRECISION="ieee",  # h is float32: no tf32 (docstring)
    )
    return out


def add_lora_triton_gather(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Gather kernels: one program per (token, rank or output tile), each token with its own slot."""
    if not batch.has_lora:
        return out
    _check_device(x)
    num_tokens, in_features = x.shape
    r_max = a.shape[1]
    out_features = out.shape[1]
    h = torch.empty(num_tokens, r_max, dtype=torch.float32, device=x.device)  # [num_tokens, r_max]
    _shrink_gather_kernel[(num_tokens, triton.cdiv(r_max, BLOCK_R))](
        x, a, h, batch.token_slots, ranks, in_features,
        x.stride(0), x.stride(1), a.stride(0), a.stride(1), a.stride(2), h.stride(0), h.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_K=GATHER_BLOCK_K,
    )
    _expand_gather_kernel[(num_tokens, triton.cdiv(out_features, GATHER_BLOCK_N))](
        h, b, out, batch.token_slots, ranks, scales, out_features,
        h.stride(0), h.stride(1), b.stride(0), b.stride(2), b.stride(1), out.stride(0), out.stride(1),
        BLOCK_R=BLOCK_R, BLOCK_N=GATHER_BLOCK_N,
    )
    return out


def add_lora_triton(
    out: torch.Tensor,  # [num_tokens, out_features], updated in place
    x: torch.Tensor,  # [num_tokens, in_features]
    a: torch.Tensor,  # [num_slots, r_max, in_features]
    b: torch.Tensor,  # [num_slots, r_max, out_features]
    ranks: torch.Tensor,  # [num_slots] long
    scales: torch.Tensor,  # [num_slots] float
    batch: LoRABatch,
    blocks: torch.Tensor | None = None,  # [num_slots, num_blocks, 4]; ignored
) -> torch.Tensor:
    """Add each token's LoRA delta to `out` in place and return it; semantics of `add_lora_reference`.

    Segment kernels when the adapter runs are long enough to fill row tiles (prefill), gather kernels
    when they are mostly single tokens (decode, or an interleaved batch) or unknown on the host (a CUDA
    graph's batch, `LoRABatch.unsegmented`).
    """
    if not batch.has_lora:
        return out
    if not batch.segmented:  # a CUDA graph's batch: each token's slot is known on the device only
        return add_lora_triton_gather(out, x, a, b, ranks, scales, batch)
    mean_run = sum(batch.seg_lens_list) / len(batch.seg_lens_list)
    if mean_run >= SEGMENT_MIN_MEAN_TOKENS:
        return add_lora_triton_segments(out, x, a, b, ranks, scales, batch)
    return add_lora_triton_gather(out, x, a, b, ranks, scales, batch)
