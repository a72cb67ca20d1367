"""Triton paged attention against the torch path: on CPU through Triton's interpreter, on CUDA when present."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Read when kernels are decorated, triton's own library included, so it must precede importing triton;
# when something imported triton first (a full test run), test_in_fresh_process runs the kernel tests.
# An explicit TRITON_INTERPRET=0 on a GPU machine runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")

from loraplex.model.attention import (  # noqa: E402
    AttentionMetadata,
    PrefillChunk,
    paged_attention,
    write_kv,
)
from loraplex.model.triton_attention import (  # noqa: E402
    paged_attention_triton,
    paged_decode_attention_triton,
    paged_prefill_attention_triton,
    write_kv_triton,
)
from tests.tolerances import assert_close  # noqa: E402
from tests.triton_compile import compile_for_cuda  # noqa: E402
from tests.triton_interpreter import SKIP_REASON, kernels_runnable, run_in_fresh_process  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernels_runnable(), reason=SKIP_REASON)
HEAD_DIM = 32
NUM_BLOCKS = 40
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


class Batch:
    """A step's flat batch over a KV cache whose blocks are handed out in shuffled order."""

    def __init__(self, decode_lens: list[int], prefills: list[tuple[int, int]], heads: int, kv_heads: int,
                 block_size: int, dtype: torch.dtype, seed: int = 0) -> None:
        gen = torch.Generator().manual_seed(seed)
        free = torch.randperm(NUM_BLOCKS, generator=gen).tolist()

        def allocate(num_tokens: int) -> list[int]:
            return [free.pop() for _ in range(-(-num_tokens // block_size))]

        def slot(table: list[int], pos: int) -> int:
            return table[pos // block_size] * block_size + pos % block_size

        def randn(*shape: int) -> torch.Tensor:
            return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)

        decode_tables = [allocate(n) for n in decode_lens]
        slots = [slot(t, n - 1) for t, n in zip(decode_tables, decode_lens, strict=True)]
        chunks, q_start = [], len(decode_lens)
        for q_len, ctx in prefills:
            table = allocate(ctx)
            slots += [slot(table, p) for p in range(ctx - q_len, ctx)]
            chunks.append(PrefillChunk(q_start, q_len, ctx, torch.tensor(table, device=DEVICE)))
            q_start += q_len
        width = max((len(t) for t in decode_tables), default=1)
        padded = [t + [0] * (width - len(t)) for t in decode_tables]
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=DEVICE),
            num_decode=len(decode_lens),
            decode_block_tables=torch.tensor(padded, device=DEVICE).view(len(decode_lens), width),
            decode_context_lens=torch.tensor(decode_lens, device=DEVICE),
            prefills=chunks,
        )
        # Earlier context already in the cache (random), the step's new tokens not yet written.
        self.k_cache = randn(NUM_BLOCKS, block_size, kv_heads, HEAD_DIM)
        self.v_cache = randn(NUM_BLOCKS, block_size, kv_heads, HEAD_DIM)
        self.q = randn(q_start, heads, HEAD_DIM)
        self.k = randn(q_start, kv_heads, HEAD_DIM)
        self.v = randn(q_start, kv_heads, HEAD_DIM)

    def reference(self, window: int | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The torch path's (output, k_cache, v_cache), computed in float32 and rounded to the dtype."""
        dtype = self.q.dtype
        k_cache = self.k_cache.to(torch.float32, copy=True)
        v_cache = self.v_cache.to(torch.float32, copy=True)
        out = paged_attention(self.q.float(), self.k.float(), self.v.float(), k_cache, v_cache, self.meta,
                              HEAD_DIM**-0.5, window)
        return out.to(dtype), k_cache.to(dtype), v_cache.to(dtype)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("window", [None, 7], ids=["full", "window7"])
def test_paged_attention_matches_torch(dtype: torch.dtype, window: int | None) -> None:
    """Decodes of odd lengths (1 token up to three blocks) and prefills (fresh, after cached context,
    longer than one query tile), grouped-query heads, block_size 16."""
    batch = Batch(decode_lens=[1, 17, 33, 5, 16], prefills=[(5, 5), (9, 40), (21, 21)], heads=6, kv_heads=2,
                  block_size=16, dtype=dtype)
    expected, expected_k, expected_v = batch.reference(window)
    k_cache, v_cache = batch.k_cache.clone(), batch.v_cache.clone()
    out = paged_attention_triton(batch.q, batch.k, batch.v, k_cache, v_cache, batch.meta, HEAD_DIM**-0.5,
                                 window)
    assert torch.equal(k_cache, expected_k) and torch.equal(v_cache, expected_v)
    assert_close(out, expected)


@needs_kernels
@pytest.mark.parametrize(("heads", "kv_heads", "block_size"), [(4, 4, 16), (8, 1, 16), (6, 3, 8), (4, 2, 32)])
def test_decode_head_layouts_and_block_sizes(heads: int, kv_heads: int, block_size: int) -> None:
    """Multi-head, multi-query and grouped heads; blocks smaller and larger than a kernel tile."""
    batch = Batch(decode_lens=[3, 31, 40, 9], prefills=[], heads=heads, kv_heads=kv_heads,
                  block_size=block_size, dtype=torch.float32, seed=1)
    expected, _, _ = batch.reference(None)
    write_kv_triton(batch.k_cache, batch.v_cache, batch.k, batch.v, batch.meta.slot_mapping)
    out = paged_decode_attention_triton(batch.q, batch.k_cache, batch.v_cache, batch.meta.decode_block_tables,
                                        batch.meta.decode_context_lens, HEAD_DIM**-0.5, None)
    assert_close(out, expected)


@needs_kernels
@pytest.mark.parametrize("window", [None, 4])
def test_prefill_chunk_over_cached_context(window: int | None) -> None:
    """A 19-token chunk ending a 45-token context: its queries see the cache before it, causally."""
    batch = Batch(decode_lens=[], prefills=[(19, 45)], heads=4, kv_heads=2, block_size=16,
                  dtype=torch.float32, seed=2)
    expected, _, _ = batch.reference(window)
    write_kv(batch.k_cache, batch.v_cache, batch.k, batch.v, batch.meta.slot_mapping)
    chunk = batch.meta.prefills[0]
    out = paged_prefill_attention_triton(batch.q, batch.k_cache, batch.v_cache, chunk.block_table,
                                         chunk.context_len, HEAD_DIM**-0.5, window)
    assert_close(out, expected)


@needs_kernels
def test_write_kv_skips_negative_slots() -> None:
    kv_heads, block_size = 2, 16
    gen = torch.Generator().manual_seed(3)
    k_cache = torch.zeros(4, block_size, kv_heads, HEAD_DIM, device=DEVICE)
    v_cache = torch.zeros_like(k_cache)
    k = torch.randn(3, kv_heads, HEAD_DIM, generator=gen).to(DEVICE)
    v = torch.randn(3, kv_heads, HEAD_DIM, generator=gen).to(DEVICE)
    write_kv_triton(k_cache, v_cache, k, v, torch.tensor([17, -1, 63], device=DEVICE))
    assert torch.equal(k_cache[1, 1], k[0]) and torch.equal(v_cache[3, 15], v[2])
    k_cache[1, 1] = 0
    k_cache[3, 15] = 0
    assert not k_cache.any(), "the padding token (slot -1) was written somewhere"


def test_mismatched_heads_is_a_value_error() -> None:
    cache = torch.zeros(2, 16, 3, HEAD_DIM, device=DEVICE)
    q = torch.zeros(1, 4, HEAD_DIM, device=DEVICE)
    with pytest.raises(ValueError, match=r"\(4\).*\(3\)"):
        paged_decode_attention_triton(q, cache, cache, torch.zeros(1, 1, dtype=torch.long, device=DEVICE),
                                      torch.ones(1, dtype=torch.long, device=DEVICE), 1.0, None)


def test_kernels_compile_for_cuda(tmp_path: Path) -> None:
    """Every kernel goes through Triton's GPU compiler (to an sm_90 cubin), which the interpreter skips."""
    specs = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        ptrs = {name: f"*{dtype}" for name in ("q_ptr", "k_cache_ptr", "v_cache_ptr", "out_ptr")}
        specs.append(("_write_kv_kernel", {"k_ptr": f"*{dtype}", "v_ptr": f"*{dtype}", "k_cache_ptr": f"*{dtype}",
                                           "v_cache_ptr": f"*{dtype}"}, {}, {"BLOCK_H": 8, "BLOCK_D": 64}))
        for has_window in (False, True):
            specs += [
                ("_decode_kernel", ptrs, {"scale": "fp32"},
                 {"GROUP": 4, "BLOCK_G": 16, "BLOCK_N": 16, "BLOCK_D": 64, "HAS_WINDOW": has_window,
                  "PRECISION": precision}),
                ("_prefill_kernel", ptrs, {"scale": "fp32"},
                 {"GROUP": 4, "BLOCK_M": 16, "BLOCK_N": 16, "BLOCK_D": 64, "HAS_WINDOW": has_window,
                  "PRECISION": precision}),
            ]
    output = compile_for_cuda("loraplex.model.triton_attention", specs, tmp_path)
    assert output.count("compiled") == len(specs)


@pytest.mark.skipif(kernels_runnable(), reason="the kernels run in this process")
def test_in_fresh_process() -> None:
    """The kernel tests, in a process that imports triton after setting TRITON_INTERPRET=1."""
    run_in_fresh_process(__file__, "matches_torch or head_layouts or prefill_chunk or write_kv")
