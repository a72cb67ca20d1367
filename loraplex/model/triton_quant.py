"""Triton weight-only matmuls: int4 (the GPU path of `--quantize int4` and of GPTQ / AWQ / compressed-tensors
4-bit checkpoints) and int8 per output channel (`--quantize int8` on a GPU).

Same contract as `Int4Weight.dense` followed by a matmul (loraplex/model/quant.py, the reference):

    out[m, n] = Σ_k x[m, k] · w[n, k] (+ bias[n]),   w[n, k] = q[n, k] · scale[n, k // group] + offset[n, k // group]

with `q[n, k]` the low nibble of `packed[n, k // 2]` for an even `k`, the high one for an odd `k`; for int8,
`w[n, k] = q[n, k] · scale[n]` (`Int8ChannelWeight.dense`). Each weight
is decoded in float32 and rounded to `x`'s dtype, as the reference rounds the decoded weight before its
matmul; products accumulate in float32. The weight is read at 4 bits (plus a scale and offset per 32 or more
inputs) and never written out decoded: at decode batch sizes the matmul is bound by reading the weight, so
that is the saving over a 16-bit weight.

One program per (row tile, output tile, slice of the inputs). A step over the inputs is one group or a part
of it, so a step reads one scale and one offset per output column; the even and odd inputs of a step are
two products (`x[:, 0::2] · low nibblesᵀ + x[:, 1::2] · high nibblesᵀ`), so no nibble is interleaved in
registers. A decode-sized batch has few row and output tiles, too few programs to keep a GPU's memory busy,
so the inputs are split into slices whose float32 partial sums are added afterwards (in a fixed order: the
result does not depend on scheduling).

On a GPU the products run at `x`'s 16-bit precision on tensor cores. Triton 3.9's interpreter gets 16-bit
`tl.dot` wrong (loraplex/lora/ops/triton_ops.py), so under it (the CPU tests, `TRITON_INTERPRET=1`) the
operands, already rounded to `x`'s dtype, are upcast to float32 and multiplied in tf32, where 16-bit values
are exact; float32 inputs multiply with an IEEE dot everywhere.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

TARGET_PROGRAMS = 512
"""Programs a launch aims for (an H200 has 132 SMs): fewer row and output tiles than this split the inputs."""
MAX_SPLIT = 16


@triton.jit
def _store(out_ptr, bias_ptr, acc, split, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on,
           HAS_BIAS: tl.constexpr):
    """A program's float32 tile into `out` at `split`, plus the bias where HAS_BIAS, in `out`'s dtype: a launch
    of one slice writes the layer's output itself; one of several writes float32 partial sums (`_finish`)."""
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    tl.store(out_ptr + split * stride_os + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on,
             acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _int4_linear_kernel(
    x_ptr, packed_ptr, scale_ptr, offset_ptr, bias_ptr, out_ptr, M, N, steps_per_split,
    stride_xm, stride_xk, stride_pn, stride_pk, stride_sn, stride_sg, stride_os, stride_om, stride_on,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    HAS_BIAS: tl.constexpr, UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[split, rows, cols] = x[rows, inputs of the split] · w[cols, the same inputs]ᵀ (`_store`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, BLOCK_K // 2)
    m_mask = offs_m < M
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = split * steps_per_split * BLOCK_K
    for step in range(0, steps_per_split):
        k0 = k_first + step * BLOCK_K
        # BLOCK_K divides the group: one scale and one offset per output column for this step.
        g = k0 // GROUP
        scale = tl.load(scale_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)  # [BLOCK_N]
        offset = tl.load(offset_ptr + offs_n * stride_sn + g * stride_sg, mask=n_mask, other=0.0)
        p = tl.load(packed_ptr + offs_n[None, :] * stride_pn + (k0 // 2 + half)[:, None] * stride_pk,
                    mask=n_mask[None, :], other=0)  # [BLOCK_K / 2, BLOCK_N] uint8
        low = (p & 15).to(tl.float32) * scale[None, :] + offset[None, :]
        high = (p >> 4).to(tl.float32) * scale[None, :] + offset[None, :]
        x_even = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * half)[None, :] * stride_xk,
                         mask=m_mask[:, None], other=0.0)  # [BLOCK_M, BLOCK_K / 2]
        x_odd = tl.load(x_ptr + offs_m[:, None] * stride_xm + (k0 + 2 * half + 1)[None, :] * stride_xk,
                        mask=m_mask[:, None], other=0.0)
        low = low.to(x_ptr.dtype.element_ty)  # the decoded weight rounded to x's dtype, as the reference
        high = high.to(x_ptr.dtype.element_ty)
        if UPCAST:
            acc += tl.dot(x_even.to(tl.float32), low.to(tl.float32), input_precision=PRECISION)
            acc += tl.dot(x_odd.to(tl.float32), high.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x_even, low, input_precision=PRECISION)
            acc += tl.dot(x_odd, high, input_precision=PRECISION)
    _store(out_ptr, bias_ptr, acc, split, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on, HAS_BIAS)


@triton.jit
def _int8_linear_kernel(
    x_ptr, q_ptr, scale_ptr, bias_ptr, out_ptr, M, N, steps_per_split,
    stride_xm, stride_xk, stride_qn, stride_qk, stride_os, stride_om, stride_on,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, HAS_BIAS: tl.constexpr,
    UPCAST: tl.constexpr, PRECISION: tl.constexpr,
):
    """out[split, rows, cols] = x[rows, inputs of the split] · w[cols, the same inputs]ᵀ (`_store`)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    split = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    m_mask = offs_m < M
    n_mask = offs_n < N
    scale = tl.load(scale_ptr + offs_n, mask=n_mask, other=0.0)  # [BLOCK_N]
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_first = split * steps_per_split * BLOCK_K
    for step in range(0, steps_per_split):
        k = k_first + step * BLOCK_K + offs_k
        q = tl.load(q_ptr + offs_n[None, :] * stride_qn + k[:, None] * stride_qk, mask=n_mask[None, :],
                    other=0)  # [BLOCK_K, BLOCK_N] int8
        w = (q.to(tl.float32) * scale[None, :]).to(x_ptr.dtype.element_ty)  # rounded to x's dtype, as the reference
        x = tl.load(x_ptr + offs_m[:, None] * stride_xm + k[None, :] * stride_xk, mask=m_mask[:, None], other=0.0)
        if UPCAST:
            acc += tl.dot(x.to(tl.float32), w.to(tl.float32), input_precision=PRECISION)
        else:
            acc += tl.dot(x, w, input_precision=PRECISION)
    _store(out_ptr, bias_ptr, acc, split, offs_m, offs_n, m_mask, n_mask, stride_os, stride_om, stride_on, HAS_BIAS)


BLOCK_N = 64


@dataclass
class _Launch:
    """What both kernels' launches share: the grid, where the programs write (the output itself for one slice of
    the inputs, else float32 partial sums, `[split, rows, out]` either way), the steps of BLOCK_K inputs per
    program, the row tile, and whether the interpreter needs 16-bit operands upcast."""

    grid: tuple[int, int, int]
    out: torch.Tensor  # [split, rows, out]
    steps_per_split: int
    block_m: int
    upcast: bool

    def args(self, bias: torch.Tensor | None) -> tuple[object, ...]:
        """The kernels' (bias, out, ..., strides of out) arguments; the bias is added in the kernel for one slice."""
        o = self.out
        return bias if bias is not None else o, o, o.stride(0), o.stride(1), o.stride(2)

    def has_bias(self, bias: torch.Tensor | None) -> bool:
        return bias is not None and self.out.shape[0] == 1


def _launch(x: torch.Tensor, out_features: int, block_k: int) -> _Launch:
    rows, cols = x.shape
    block_m = 16 if rows <= 16 else 32 if rows <= 32 else 64
    tiles = triton.cdiv(rows, block_m) * triton.cdiv(out_features, BLOCK_N)
    steps = cols // block_k
    split = 1  # slices of the inputs: a power of two dividing `steps`, up to TARGET_PROGRAMS programs in all
    while split * 2 <= MAX_SPLIT and tiles * split * 2 <= TARGET_PROGRAMS and steps % (split * 2) == 0:
        split *= 2
    out = torch.empty(split, rows, out_features, dtype=x.dtype if split == 1 else torch.float32, device=x.device)
    return _Launch((triton.cdiv(rows, block_m), triton.cdiv(out_features, BLOCK_N), split), out, steps // split,
                   block_m, bool(triton.knobs.runtime.interpret) and x.dtype != torch.float32)


def int4_linear_triton(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, offset: torch.Tensor, group: int,
                       bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ w.T + bias` for `x` `[rows, in]` and the 4-bit weight `packed` `[out, in / 2]` uint8 with float32
    `scale` and `offset` `[out, in / group]` (`group` a multiple of 32); the result in `x`'s dtype."""
    rows, cols = x.shape
    out_features = packed.shape[0]
    assert packed.shape[1] * 2 == cols and group % 32 == 0 and cols % group == 0, (x.shape, packed.shape, group)
    assert scale.shape == offset.shape == (out_features, cols // group), (scale.shape, offset.shape)
    block_k = 64 if group % 64 == 0 else 32
    run = _launch(x, out_features, block_k)
    bias_arg, out, stride_os, stride_om, stride_on = run.args(bias)
    _int4_linear_kernel[run.grid](
        x, packed, scale, offset, bias_arg, out, rows, out_features, run.steps_per_split,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        stride_os, stride_om, stride_on, GROUP=group, BLOCK_M=run.block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        HAS_BIAS=run.has_bias(bias), UPCAST=run.upcast, PRECISION="tf32" if run.upcast else "ieee",
    )
    return _finish(run.out, bias, x.dtype)


def int8_linear_triton(x: torch.Tensor, q: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ w.T + bias` for `x` `[rows, in]` and the int8 weight `q` `[out, in]` with a float32 `scale` `[out]`
    per output channel (`in` a multiple of 32); the result in `x`'s dtype."""
    rows, cols = x.shape
    out_features = q.shape[0]
    assert q.shape[1] == cols and cols % 32 == 0 and scale.shape == (out_features,), (x.shape, q.shape, scale.shape)
    block_k = 64 if cols % 64 == 0 else 32
    run = _launch(x, out_features, block_k)
    bias_arg, out, stride_os, stride_om, stride_on = run.args(bias)
    _int8_linear_kernel[run.grid](
        x, q, scale, bias_arg, out, rows, out_features, run.steps_per_split, x.stride(0), x.stride(1), q.stride(0),
        q.stride(1), stride_os, stride_om, stride_on, BLOCK_M=run.block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        HAS_BIAS=run.has_bias(bias), UPCAST=run.upcast, PRECISION="tf32" if run.upcast else "ieee",
    )
    return _finish(run.out, bias, x.dtype)


def _finish(out: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
    """The layer's output `[rows, out]` in `dtype`: the kernels wrote it whole for one slice; for several, their
    float32 partial sums added in order, then the bias (in place), then `dtype`."""
    if out.shape[0] == 1:
        return out[0]
    summed = out.sum(dim=0)  # [rows, out] float32
    if bias is not None:
        summed.add_(bias)
    return summed.to(dtype)
