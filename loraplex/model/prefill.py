"""One prefill step run outside the engine, on a KV cache of its own: what load-time work that needs a real
forward uses (the int8 calibration, the KV cache's sizing from a forward's peak memory)."""

from __future__ import annotations

import torch

from loraplex.kv.block_pool import KVCache
from loraplex.model.attention import AttentionMetadata, PrefillChunk
from loraplex.model.context import ForwardContext, forward_context
from loraplex.model.decoder import CausalLM

BLOCK = 16


def run_prefill(model: CausalLM, token_ids: list[int] | torch.Tensor, rows: int | None = None,
                sequence: int | None = None) -> int:
    """Read `token_ids` in one step as sequences of `sequence` tokens (at most the model's positions, the
    default), then the LM head over the first `rows` tokens (all when None). Returns the bytes of the KV
    cache it allocated for them (freed on return)."""
    weight = model.model.embed_tokens.weight
    device, cfg = weight.device, model.config
    ids = torch.as_tensor(token_ids, dtype=torch.long).to(device)
    tokens, max_len = ids.numel(), min(sequence or model.rope.max_positions, model.rope.max_positions)
    lengths = [min(max_len, tokens - start) for start in range(0, tokens, max_len)]
    blocks = [-(-n // BLOCK) for n in lengths]
    kv = KVCache(cfg.num_layers, sum(blocks), BLOCK, cfg.num_kv_heads, cfg.head_dim, weight.dtype, device)
    chunks, slots, positions, first_block = [], [], [], 0
    for q_start, n, b in zip(range(0, tokens, max_len), lengths, blocks, strict=True):
        chunks.append(PrefillChunk(q_start, n, n, torch.arange(first_block, first_block + b, device=device)))
        slots.append(torch.arange(n, device=device) + first_block * BLOCK)
        positions.append(torch.arange(n, device=device))
        first_block += b
    attn = AttentionMetadata(slot_mapping=torch.cat(slots), num_decode=0,
                             decode_block_tables=torch.zeros(0, 1, dtype=torch.long, device=device),
                             decode_context_lens=torch.zeros(0, dtype=torch.long, device=device), prefills=chunks)
    with torch.inference_mode(), forward_context(ForwardContext(attn=attn, kv_cache=kv)):
        hidden = model(ids, torch.cat(positions))
        model.compute_logits(hidden if rows is None else hidden[:rows])
    return kv.data.numel() * kv.data.element_size()
