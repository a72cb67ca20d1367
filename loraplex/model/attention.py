"""Attention over the paged KV cache: the torch implementation (CPU, and the reference for GPU kernels).

Tokens arrive flat: first `num_decode` single-token decodes (one per sequence, attended to in one
batched call), then prefill chunks (one query run per sequence, attending to everything cached
before it plus itself, causally).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger(__name__)

ATTENTION_BACKENDS = ("auto", "torch", "triton")
"""`torch`: this module (a gather of the cached blocks, then SDPA); `triton`: the paged kernels of
loraplex/model/triton_attention.py (CUDA, or CPU under TRITON_INTERPRET=1); `auto`: triton on CUDA where
triton imports, else torch."""


@dataclass
class PrefillChunk:
    q_start: int          # first token of the chunk in the flat batch
    q_len: int
    context_len: int      # tokens of the sequence in the cache after this step (includes the chunk)
    block_table: torch.Tensor  # [blocks] long


@dataclass
class AttentionMetadata:
    slot_mapping: torch.Tensor          # [tokens] long: block * block_size + offset for each new token
    num_decode: int
    decode_block_tables: torch.Tensor   # [num_decode, max_blocks] long, padded with 0
    decode_context_lens: torch.Tensor   # [num_decode] long
    prefills: list[PrefillChunk]
    kernel_cache: dict[str, Any] = field(default_factory=dict)
    """What a kernel backend derives from this step's metadata once, for all the layers to reuse."""


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    """k_cache: [blocks, block_size, kv_heads, head_dim]; k: [tokens, kv_heads, head_dim]."""
    kv_heads, head_dim = k.shape[1:]
    k_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, k)
    v_cache.view(-1, kv_heads, head_dim).index_copy_(0, slot_mapping, v)


def paged_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor,
                    v_cache: torch.Tensor, meta: AttentionMetadata, scale: float,
                    window: int | None) -> torch.Tensor:
    """q: [tokens, heads, head_dim]; k, v: [tokens, kv_heads, head_dim] → [tokens, heads, head_dim].

    Reference semantics, per sequence s and query token at position p:
        out = softmax(scale * q·K[j]ᵀ for cached keys j ≤ p, and j > p - window when windowed) · V
    """
    write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
    out = torch.empty_like(q)
    d = meta.num_decode
    if d:
        out[:d] = _decode(q[:d], k_cache, v_cache, meta.decode_block_tables, meta.decode_context_lens,
                          scale, window)
    for chunk in meta.prefills:
        rows = slice(chunk.q_start, chunk.q_start + chunk.q_len)
        out[rows] = _prefill(q[rows], k[rows], v[rows], k_cache, v_cache, chunk, scale, window)
    return out


def _gather(cache: torch.Tensor, block_tables: torch.Tensor) -> torch.Tensor:
    """[..., blocks] tables → [..., blocks * block_size, kv_heads, head_dim] keys or values."""
    num_blocks, block_size, kv_heads, head_dim = cache.shape
    # One contiguous row per block: index_select copies whole blocks, far faster than multi-dim indexing.
    rows = cache.view(num_blocks, -1).index_select(0, block_tables.reshape(-1))
    return rows.view(*block_tables.shape[:-1], block_tables.shape[-1] * block_size, kv_heads, head_dim)


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
            context_lens: torch.Tensor, scale: float, window: int | None) -> torch.Tensor:
    keys = _gather(k_cache, block_tables).transpose(1, 2)    # [seqs, kv_heads, max_len, head_dim]
    values = _gather(v_cache, block_tables).transpose(1, 2)
    key_pos = torch.arange(keys.shape[2], device=q.device)
    query_pos = (context_lens - 1).unsqueeze(1)               # [seqs, 1]
    mask = key_pos.unsqueeze(0) <= query_pos                  # [seqs, max_len]
    if window is not None:
        mask &= key_pos.unsqueeze(0) > query_pos - window
    out = F.scaled_dot_product_attention(q.unsqueeze(2), keys, values, attn_mask=mask[:, None, None, :],
                                         scale=scale, enable_gqa=True)  # [seqs, heads, 1, head_dim]
    return out.squeeze(2)


def _prefill(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
             chunk: PrefillChunk, scale: float, window: int | None) -> torch.Tensor:
    # SDPA gets 4-d inputs (a batch of one): with 3-d ones the CPU build takes its math path, 2-3x slower
    # than its flash kernel for these shapes (a 6-token chunk over 150 keys, a 200-token causal prompt).
    n, ctx = chunk.q_len, chunk.context_len
    if ctx == n and window is None:
        # Nothing cached before this chunk: attend to the chunk's own keys, causally.
        out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k.transpose(0, 1)[None],
                                             v.transpose(0, 1)[None], is_causal=True, scale=scale, enable_gqa=True)
        return out[0].transpose(0, 1)
    keys = _gather(k_cache, chunk.block_table)[:ctx].transpose(0, 1)   # [kv_heads, ctx, head_dim]
    values = _gather(v_cache, chunk.block_table)[:ctx].transpose(0, 1)
    query_pos = torch.arange(ctx - n, ctx, device=q.device).unsqueeze(1)  # [n, 1]
    key_pos = torch.arange(ctx, device=q.device).unsqueeze(0)             # [1, ctx]
    mask = key_pos <= query_pos
    if window is not None:
        mask &= key_pos > query_pos - window
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], keys[None], values[None], attn_mask=mask[None, None],
                                         scale=scale, enable_gqa=True)  # [1, heads, n, head_dim]
    return out[0].transpose(0, 1)


PagedAttention = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata,
                           float, int | None], torch.Tensor]
"""`paged_attention`'s signature: (q, k, v, k_cache, v_cache, meta, scale, window) -> out."""


def resolve_attention_backend(backend: str, device: torch.device) -> str:
    """`backend` with `auto` decided for `device`; ValueError for one that cannot run there."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"attention_backend must be one of {', '.join(ATTENTION_BACKENDS)}, got {backend!r}")
    if backend == "auto":
        if device.type != "cuda":
            return "torch"
        try:
            attention_op("triton", device)
        except ValueError as e:
            log.warning("%s; using the torch attention", e)
            return "torch"
        return "triton"
    attention_op(backend, device)
    return backend


def attention_op(backend: str, device: torch.device) -> PagedAttention:
    """The paged attention of a resolved backend (`torch` or `triton`)."""
    if backend == "torch":
        return paged_attention
    try:  # imported on selection only: triton is optional, and importing it costs seconds
        import triton

        from loraplex.model.triton_attention import paged_attention_triton
    except ImportError as e:
        raise ValueError(f"attention backend 'triton' needs the triton package, which failed to import: {e}") from e
    if device.type != "cuda" and not triton.knobs.runtime.interpret:
        raise ValueError("attention backend 'triton' runs on CUDA (or on CPU under TRITON_INTERPRET=1)")
    return paged_attention_triton
