"""Triton paged attention (the GPU backend): KV-cache write, batched decode and batched prefill.

Same semantics and cache layout as the torch path in `loraplex.model.attention` (the reference):
caches are `[num_blocks, block_size, kv_heads, head_dim]` (one layer of `KVCache`), token slot
`block * block_size + offset`, head `h` reads kv head `h // (heads // kv_heads)` (grouped-query).

Both attention kernels walk the block table one KV block at a time with an online softmax (running
max, running sum, rescaled accumulator), so no sequence's keys are ever gathered into a contiguous
copy, and blocks wholly outside the causal or sliding window are never read. The running max starts
at a finite floor rather than -inf: a row whose first blocks are all masked (sliding window) then
rescales by exp(0) instead of producing NaN from -inf - -inf.

A step's attention is three launches per layer whatever its mix: the KV write, every decode, and every
prefill chunk (a chunk per program-grid slice; the chunks' metadata is built once per step and reused by
every layer through `AttentionMetadata.kernel_cache`).

Operands are upcast to float32 in registers, as in `loraplex.lora.ops.triton_ops` (16-bit values are
exact in tf32; float32 inputs use an IEEE dot). On CPU the kernels run only under Triton's
interpreter (`TRITON_INTERPRET=1` set before this module is imported).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from loraplex.model.attention import AttentionMetadata, PrefillChunk

PREFILL_BLOCK_M = 16  # query rows per prefill program
MIN_DOT = 16  # tl.dot needs every tile dimension >= 16


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, kv_heads, head_dim, block_size,
    stride_kt, stride_kh, stride_kd, stride_vt, stride_vh, stride_vd,
    stride_cb, stride_cp, stride_ch, stride_cd,
    BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """k_cache[slot // block_size, slot % block_size] = k[t] (and v alike) for one token t."""
    t = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + t)
    # A negative slot is a padding token (a CUDA-graph batch padded to a captured size): no write.
    if slot >= 0:
        offs_h = tl.arange(0, BLOCK_H)
        offs_d = tl.arange(0, BLOCK_D)
        mask = (offs_h < kv_heads)[:, None] & (offs_d < head_dim)[None, :]
        cache_off = ((slot // block_size) * stride_cb + (slot % block_size) * stride_cp
                     + offs_h[:, None] * stride_ch + offs_d[None, :] * stride_cd)  # [BLOCK_H, BLOCK_D]
        k = tl.load(k_ptr + t * stride_kt + offs_h[:, None] * stride_kh + offs_d[None, :] * stride_kd,
                    mask=mask)
        v = tl.load(v_ptr + t * stride_vt + offs_h[:, None] * stride_vh + offs_d[None, :] * stride_vd,
                    mask=mask)
        tl.store(k_cache_ptr + cache_off, k.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + cache_off, v.to(v_cache_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _online_softmax(s, v, m_i, l_i, acc, PRECISION: tl.constexpr):
    """One key block into the running softmax: scores `s` [rows, keys] (masked ones -inf), values `v`
    [keys, head_dim]; returns the new running max, sum and accumulator."""
    m_new = tl.maximum(m_i, tl.max(s, axis=1))
    alpha = tl.exp(m_i - m_new)
    p = tl.exp(s - m_new[:, None])
    l_i = l_i * alpha + tl.sum(p, axis=1)
    acc = acc * alpha[:, None] + tl.dot(p, v, input_precision=PRECISION)
    return m_new, l_i, acc


@triton.jit
def _decode_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, block_tables_ptr, context_lens_ptr, out_ptr, scale, window,
    head_dim, block_size,
    stride_qs, stride_qh, stride_qd, stride_bts, stride_btb,
    stride_cb, stride_cp, stride_ch, stride_cd, stride_os, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """One sequence's last token, all query heads of one kv head: out[seq, heads of kvh]."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    ctx = tl.load(context_lens_ptr + seq)
    offs_g = tl.arange(0, BLOCK_G)
    offs_n = tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    g_mask = offs_g < GROUP
    d_mask = offs_d < head_dim
    heads = kvh * GROUP + offs_g
    q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :] * stride_qd,
                mask=g_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_G, BLOCK_D]
    q = q.to(tl.float32) * scale
    query_pos = ctx - 1
    first_key = 0
    if HAS_WINDOW:
        first_key = tl.maximum(query_pos - window + 1, 0)
    m_i = tl.full((BLOCK_G,), -1.0e30, dtype=tl.float32)
    l_i = tl.zeros((BLOCK_G,), dtype=tl.float32)
    acc = tl.zeros((BLOCK_G, BLOCK_D), dtype=tl.float32)
    for blk in range(first_key // block_size, tl.cdiv(ctx, block_size)):
        physical = tl.load(block_tables_ptr + seq * stride_bts + blk * stride_btb)
        key_pos = blk * block_size + offs_n
        key_mask = (offs_n < block_size) & (key_pos < ctx) & (key_pos >= first_key)
        kv_off = (physical * stride_cb + offs_n[:, None] * stride_cp + kvh * stride_ch
                  + offs_d[None, :] * stride_cd)  # [BLOCK_N, BLOCK_D]
        kv_mask = key_mask[:, None] & d_mask[None, :]
        k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_G, BLOCK_N]
        s = tl.where(key_mask[None, :], s, float("-inf"))
        v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
        m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PRECISION)
    out = acc / l_i[:, None]
    tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :] * stride_od,
             out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None] & d_mask[None, :])


@triton.jit
def _prefill_kernel(
    q_ptr, k_cache_ptr, v_cache_ptr, tables_ptr, q_starts_ptr, q_lens_ptr, ctx_lens_ptr, out_ptr, scale, window,
    head_dim, block_size,
    stride_qt, stride_qh, stride_qd, stride_cb, stride_cp, stride_ch, stride_cd, stride_tc, stride_tb,
    stride_ot, stride_oh, stride_od,
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
    HAS_WINDOW: tl.constexpr, PRECISION: tl.constexpr,
):
    """One tile of one chunk's queries for one head, causally over its sequence's cached keys. Every
    prefill chunk of a step is in one launch: program axis 2 is the chunk; tiles past a chunk's length exit."""
    m0 = tl.program_id(0) * BLOCK_M
    head = tl.program_id(1)
    chunk = tl.program_id(2)
    q_len = tl.load(q_lens_ptr + chunk)
    if m0 < q_len:
        q_start = tl.load(q_starts_ptr + chunk)
        ctx = tl.load(ctx_lens_ptr + chunk)
        block_table_ptr = tables_ptr + chunk * stride_tc
        kvh = head // GROUP
        offs_m = m0 + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        m_mask = offs_m < q_len
        d_mask = offs_d < head_dim
        rows = q_start + offs_m
        q = tl.load(q_ptr + rows[:, None] * stride_qt + head * stride_qh + offs_d[None, :] * stride_qd,
                    mask=m_mask[:, None] & d_mask[None, :], other=0.0)  # [BLOCK_M, BLOCK_D]
        q = q.to(tl.float32) * scale
        query_pos = ctx - q_len + offs_m  # [BLOCK_M]
        # Keys past the tile's last query, or before its first query's window, are never read.
        last_key = tl.minimum(ctx - q_len + m0 + BLOCK_M, ctx)
        first_key = 0
        if HAS_WINDOW:
            first_key = tl.maximum(ctx - q_len + m0 - window + 1, 0)
        m_i = tl.full((BLOCK_M,), -1.0e30, dtype=tl.float32)
        l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)
        acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
        for blk in range(first_key // block_size, tl.cdiv(last_key, block_size)):
            physical = tl.load(block_table_ptr + blk * stride_tb)
            key_pos = blk * block_size + offs_n  # [BLOCK_N]
            key_valid = (offs_n < block_size) & (key_pos < ctx)
            kv_off = (physical * stride_cb + offs_n[:, None] * stride_cp + kvh * stride_ch
                      + offs_d[None, :] * stride_cd)  # [BLOCK_N, BLOCK_D]
            kv_mask = key_valid[:, None] & d_mask[None, :]
            k = tl.load(k_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            s = tl.dot(q, tl.trans(k), input_precision=PRECISION)  # [BLOCK_M, BLOCK_N]
            mask = key_valid[None, :] & (key_pos[None, :] <= query_pos[:, None])
            if HAS_WINDOW:
                mask = mask & (key_pos[None, :] > query_pos[:, None] - window)
            s = tl.where(mask, s, float("-inf"))
            v = tl.load(v_cache_ptr + kv_off, mask=kv_mask, other=0.0).to(tl.float32)
            m_i, l_i, acc = _online_softmax(s, v, m_i, l_i, acc, PRECISION)
        # Rows past q_len are not stored; keep their divisor nonzero so they stay finite.
        out = acc / tl.where(l_i > 0, l_i, 1.0)[:, None]
        tl.store(out_ptr + rows[:, None] * stride_ot + head * stride_oh + offs_d[None, :] * stride_od,
                 out.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & d_mask[None, :])


def _tile(n: int) -> int:
    return max(MIN_DOT, triton.next_power_of_2(n))


def _dot_precision(dtype: torch.dtype) -> str:
    return "ieee" if dtype == torch.float32 else "tf32"


def _check_inputs(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor) -> None:
    if q.device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError(
            f"triton attention runs on CUDA tensors (or on CPU under TRITON_INTERPRET=1), got {q.device}"
        )
    if k_cache.shape != v_cache.shape or k_cache.stride() != v_cache.stride():
        raise ValueError(
            f"key and value caches must share shape and strides, got {tuple(k_cache.shape)} "
            f"{k_cache.stride()} and {tuple(v_cache.shape)} {v_cache.stride()}"
        )
    heads, kv_heads = q.shape[1], k_cache.shape[2]
    if heads % kv_heads:
        raise ValueError(f"query heads ({heads}) must be a multiple of kv heads ({kv_heads})")


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    """k_cache: [blocks, block_size, kv_heads, head_dim]; k: [tokens, kv_heads, head_dim]; like `write_kv`.

    Tokens whose slot is negative are skipped (`write_kv` has no such tokens).
    """
    _check_inputs(k, k_cache, v_cache)
    num_tokens, kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    _write_kv_kernel[(num_tokens,)](
        k, v, k_cache, v_cache, slot_mapping, kv_heads, head_dim, k_cache.shape[1],
        k.stride(0), k.stride(1), k.stride(2), v.stride(0), v.stride(1), v.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        BLOCK_H=triton.next_power_of_2(kv_heads), BLOCK_D=triton.next_power_of_2(head_dim),
    )


def paged_decode_attention_triton(
    q: torch.Tensor,  # [seqs, heads, head_dim], each sequence's newest token
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim], holding that token's key already
    v_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim]
    block_tables: torch.Tensor,  # [seqs, max_blocks] long
    context_lens: torch.Tensor,  # [seqs] long, each >= 1
    scale: float,
    window: int | None,
    out: torch.Tensor | None = None,  # [seqs, heads, head_dim], written when given
) -> torch.Tensor:
    """Attention of each sequence's last token over its cached keys; the torch path's batched decode."""
    _check_inputs(q, k_cache, v_cache)
    num_seqs, heads, head_dim = q.shape
    _, block_size, kv_heads, _ = k_cache.shape
    if out is None:
        out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    group = heads // kv_heads
    _decode_kernel[(num_seqs, kv_heads)](
        q, k_cache, v_cache, block_tables, context_lens, out, scale, window or 0, head_dim, block_size,
        q.stride(0), q.stride(1), q.stride(2), block_tables.stride(0), block_tables.stride(1),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group, BLOCK_G=_tile(group), BLOCK_N=_tile(block_size), BLOCK_D=_tile(head_dim),
        HAS_WINDOW=window is not None, PRECISION=_dot_precision(q.dtype),
    )
    return out


def paged_prefill_attention_triton(
    q: torch.Tensor,  # [q_len, heads, head_dim], one sequence's chunk
    k_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim], holding the chunk's keys already
    v_cache: torch.Tensor,  # [blocks, block_size, kv_heads, head_dim]
    block_table: torch.Tensor,  # [blocks] long, the sequence's blocks
    context_len: int,  # tokens of the sequence in the cache, the chunk included
    scale: float,
    window: int | None,
    out: torch.Tensor | None = None,  # [q_len, heads, head_dim], written when given
) -> torch.Tensor:
    """A chunk's queries (the last q_len positions) over the cached keys, causally; the torch `_prefill`."""
    q_len = q.shape[0]
    if not q_len <= context_len:
        raise ValueError(f"a chunk of {q_len} tokens cannot end a context of {context_len}")
    chunks = PrefillChunks.of([PrefillChunk(0, q_len, context_len, block_table)], q.device)
    return _prefill(q, k_cache, v_cache, chunks, scale, window, torch.empty_like(q) if out is None else out)


@dataclass
class PrefillChunks:
    """A step's prefill chunks as the one-launch kernel reads them: [chunks] tensors and padded tables."""

    q_starts: torch.Tensor  # [chunks] int32
    q_lens: torch.Tensor  # [chunks] int32
    ctx_lens: torch.Tensor  # [chunks] int32
    tables: torch.Tensor  # [chunks, max_blocks] long, padded with 0
    max_q_len: int

    @staticmethod
    def of(chunks: list[PrefillChunk], device: torch.device) -> PrefillChunks:
        tables = torch.nn.utils.rnn.pad_sequence([c.block_table for c in chunks], batch_first=True)  # pads with 0
        # One copy to the device; each row contiguous, as the kernel indexes them by chunk.
        info = torch.tensor([[c.q_start for c in chunks], [c.q_len for c in chunks], [c.context_len for c in chunks]],
                            dtype=torch.int32).to(device)
        return PrefillChunks(info[0], info[1], info[2], tables, max(c.q_len for c in chunks))


def _prefill(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunks: PrefillChunks, scale: float,
             window: int | None, out: torch.Tensor) -> torch.Tensor:
    """Every chunk's queries (rows q_start .. q_start + q_len of `q`) in one launch, into the same rows of `out`."""
    _check_inputs(q, k_cache, v_cache)
    heads, head_dim = q.shape[1:]
    _, block_size, kv_heads, _ = k_cache.shape
    if chunks.max_q_len == 0:
        return out
    grid = (triton.cdiv(chunks.max_q_len, PREFILL_BLOCK_M), heads, chunks.q_lens.numel())
    _prefill_kernel[grid](
        q, k_cache, v_cache, chunks.tables, chunks.q_starts, chunks.q_lens, chunks.ctx_lens, out, scale,
        window or 0, head_dim, block_size,
        q.stride(0), q.stride(1), q.stride(2),
        k_cache.stride(0), k_cache.stride(1), k_cache.stride(2), k_cache.stride(3),
        chunks.tables.stride(0), chunks.tables.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=heads // kv_heads, BLOCK_M=PREFILL_BLOCK_M, BLOCK_N=_tile(block_size),
        BLOCK_D=_tile(head_dim), HAS_WINDOW=window is not None, PRECISION=_dot_precision(q.dtype),
    )
    return out


def paged_attention_triton(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                           v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                           window: int | None) -> torch.Tensor:
    """Drop-in for `loraplex.model.attention.paged_attention`, same arguments and result.

    q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] → [tokens, heads, head_dim].
    """
    write_kv_triton(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decode
    if d:
        paged_decode_attention_triton(q[:d], k_cache, v_cache, meta.decode_block_tables,
                                      meta.decode_context_lens, scale, window, out=out[:d])
    if meta.prefills:
        # Built once per step (the first layer's call) and kept on the step's metadata for the others.
        chunks = meta.kernel_cache.get("triton_prefills")
        if chunks is None:
            chunks = meta.kernel_cache["triton_prefills"] = PrefillChunks.of(meta.prefills, q.device)
        _prefill(q, k_cache, v_cache, chunks, scale, window, out)
    return out
