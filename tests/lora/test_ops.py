"""LoRA delta ops: every fast strategy against the pure-torch reference, and LoRABatch segmentation."""

from __future__ import annotations

import pytest
import torch

from loraplex.lora.batch import EMPTY_SLOT, LoRABatch
from loraplex.lora.ops import AddLoRA, add_lora, add_lora_reference, get_lora_op
from loraplex.lora.ops.cpu import add_lora_segments, add_lora_sorted
from loraplex.lora.ops.native import MAX_NATIVE_RUN, add_lora_native, native_available

TOLERANCES: dict[torch.dtype, tuple[float, float]] = {  # dtype -> (atol, rtol)
    torch.float32: (1e-5, 1e-5),
    torch.bfloat16: (2e-2, 2e-2),
}
FAST_OPS = {
    "add_lora": add_lora,
    "segments": add_lora_segments,
    "sorted": add_lora_sorted,
    "native": add_lora_native,  # bfloat16 inputs take its torch fallback
}
IN_FEATURES = 48
OUT_FEATURES = 40
# (in, out) features: odd widths, and widths the native kernel's AVX-512 paths take (in a multiple of
# 32, out of 64) where the machine has them.
FEATURES = {"narrow": (IN_FEATURES, OUT_FEATURES), "vector": (96, 192)}
RANKS = (1, 2, 7, 40, 64, 128)  # 40: a whole and a partial unit of the native kernel's 32 A rows
R_MAX = 128


def make_buffers(
    ranks: tuple[int, ...], dtype: torch.dtype, r_max: int = R_MAX, seed: int = 0,
    features: tuple[int, int] = (IN_FEATURES, OUT_FEATURES),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random slot buffers whose A and B rows past each slot's rank hold NaN garbage."""
    gen = torch.Generator().manual_seed(seed)
    num_slots, (in_features, out_features) = len(ranks), features
    a = torch.randn(num_slots, r_max, in_features, generator=gen) / in_features**0.5  # [slots, r_max, in]
    b = torch.randn(num_slots, r_max, out_features, generator=gen) / 4  # [slots, r_max, out]
    for slot, rank in enumerate(ranks):
        a[slot, rank:] = float("nan")
        b[slot, rank:] = float("nan")
    scales = torch.rand(num_slots, generator=gen) + 0.5  # [slots]
    return a.to(dtype), b.to(dtype), torch.tensor(ranks), scales


def make_inputs(num_tokens: int, dtype: torch.dtype, seed: int = 1,
                features: tuple[int, int] = (IN_FEATURES, OUT_FEATURES)) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(num_tokens, features[0], generator=gen).to(dtype)  # [tokens, in]
    out = torch.randn(num_tokens, features[1], generator=gen).to(dtype)  # [tokens, out]
    return x, out


SLOT_CASES = {
    "one_segment": [2] * 9,
    "all_distinct": [0, 1, 2, 3, 4, 5],
    "unsorted_interleaved": [3, 0, 3, 1, 0, 5, 1, 3, 0, 5, 5, 2],
    "empty_slots_in_buffer": [4, 4, 1, 1, 4],
    "no_adapter_tokens_mixed_in": [-1, 2, 2, -1, -1, 0, -1, 2, -1, 5],
    "all_no_adapter": [-1] * 5,
    "all_ranks_mixed": [5, -1, 0, 4, 1, 3, -1, 2, 5, 0, 4, 4, 1, -1, 3, 2],
    "long_grouped": [0] * 20 + [-1] * 7 + [5] * 30 + [3] * 11,
    # Runs on both sides of the native kernel's cut: the longest it takes, one more (torch), and short.
    "runs_around_native_cut": [1] * MAX_NATIVE_RUN + [4] * (MAX_NATIVE_RUN + 1) + [2, 2, -1, 3] + [5] * 3,
}


def run_case(
    op: AddLoRA, slots: list[int], dtype: torch.dtype, scales_override: dict[int, float] | None = None,
    features: tuple[int, int] = (IN_FEATURES, OUT_FEATURES),
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out before, reference result, fast result, what the fast op returned)."""
    a, b, ranks, scales = make_buffers(RANKS, dtype, features=features)
    for slot, scale in (scales_override or {}).items():
        scales[slot] = scale
    x, out = make_inputs(len(slots), dtype, features=features)
    batch = LoRABatch.from_token_slots(slots, "cpu")
    expected = add_lora_reference(out.clone(), x, a, b, ranks, scales, batch)
    result = out.clone()
    returned = op(result, x, a, b, ranks, scales, batch)
    return out, expected, result, returned


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("dtype", list(TOLERANCES), ids=str)
@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("op_name", list(FAST_OPS))
def test_fast_op_matches_reference(op_name: str, case: str, dtype: torch.dtype, features: str) -> None:
    slots = SLOT_CASES[case]
    out, expected, result, returned = run_case(FAST_OPS[op_name], slots, dtype, features=FEATURES[features])
    assert returned is result
    assert torch.isfinite(expected).all(), "reference read a slot's padding past its rank"
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(result, expected, atol=atol, rtol=rtol)
    empty = torch.tensor(slots) == EMPTY_SLOT
    # Tokens without an adapter are bitwise untouched; tokens with one really got a delta.
    assert torch.equal(result[empty], out[empty])
    if (~empty).any():
        assert not torch.allclose(result[~empty], out[~empty], atol=atol, rtol=rtol)


@pytest.mark.parametrize("features", list(FEATURES))
@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("op_name", list(FAST_OPS))
def test_bfloat16_weights_with_float32_activations(op_name: str, case: str, features: str) -> None:
    """`--lora-dtype bfloat16` on a float32 model: each weight is widened exactly, so the float32 products and
    sums match the reference's on the same weights, to float32 rounding."""
    slots, dims = SLOT_CASES[case], FEATURES[features]
    a, b, ranks, scales = make_buffers(RANKS, torch.float32, features=dims)
    a, b = a.bfloat16(), b.bfloat16()
    x, out = make_inputs(len(slots), torch.float32, features=dims)
    batch = LoRABatch.from_token_slots(slots, "cpu")
    expected = add_lora_reference(out.clone(), x, a, b, ranks, scales, batch)
    assert expected.dtype == torch.float32 and torch.isfinite(expected).all()
    torch.testing.assert_close(expected, add_lora_reference(out.clone(), x, a.float(), b.float(), ranks, scales, batch))
    result = FAST_OPS[op_name](out.clone(), x, a, b, ranks, scales, batch)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(native_available() is not None, reason="no C compiler here")
def test_native_takes_bfloat16_weights_itself(monkeypatch: pytest.MonkeyPatch) -> None:
    from loraplex.lora.ops import native

    def refuse(*args: object) -> None:
        raise AssertionError("the native op handed bfloat16 weights to the torch path")

    monkeypatch.setattr(native, "add_lora", refuse)
    a, b, ranks, scales = make_buffers(RANKS, torch.float32, features=FEATURES["vector"])
    x, out = make_inputs(6, torch.float32, features=FEATURES["vector"])
    batch = LoRABatch.from_token_slots([0, 1, 2, 3, 4, 5], "cpu")
    result = add_lora_native(out.clone(), x, a.bfloat16(), b.bfloat16(), ranks, scales, batch)
    torch.testing.assert_close(result, add_lora_reference(out.clone(), x, a.bfloat16(), b.bfloat16(), ranks, scales,
                                                          batch), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("op_name", list(FAST_OPS))
def test_zero_scale_slot_adds_nothing(op_name: str) -> None:
    slots = [1, 1, 3, 3, 1, -1, 3]
    out, expected, result, _ = run_case(FAST_OPS[op_name], slots, torch.float32, scales_override={3: 0.0})
    atol, rtol = TOLERANCES[torch.float32]
    torch.testing.assert_close(result, expected, atol=atol, rtol=rtol)
    zero_scale = torch.tensor(slots) == 3
    torch.testing.assert_close(result[zero_scale], out[zero_scale], atol=0, rtol=0)
    assert not torch.allclose(result[~zero_scale][:2], out[~zero_scale][:2])


def test_reference_matches_dense_formula() -> None:
    """The reference on one token equals scale * B[:, :r] @ A[:r] @ x written out densely."""
    a, b, ranks, scales = make_buffers(RANKS, torch.float32)
    x, out = make_inputs(1, torch.float32)
    slot = 3
    rank = RANKS[slot]
    batch = LoRABatch.from_token_slots([slot], "cpu")
    expected = out[0] + scales[slot] * (b[slot, :rank].T @ (a[slot, :rank] @ x[0]))
    result = add_lora_reference(out.clone(), x, a, b, ranks, scales, batch)
    torch.testing.assert_close(result[0], expected, atol=1e-5, rtol=1e-5)


def test_no_adapter_batch_returns_out_untouched() -> None:
    a, b, ranks, scales = make_buffers(RANKS, torch.float32)
    x, out = make_inputs(4, torch.float32)
    batch = LoRABatch.from_token_slots([EMPTY_SLOT] * 4, "cpu")
    before = out.clone()
    for op in FAST_OPS.values():
        assert op(out, x, a, b, ranks, scales, batch) is out
        assert torch.equal(out, before)


def test_get_lora_op_registry() -> None:
    assert get_lora_op("torch") is add_lora
    assert get_lora_op("reference") is add_lora_reference
    with pytest.raises(ValueError, match="'triton-nope'"):
        get_lora_op("triton-nope")


@pytest.mark.parametrize(
    ("slots", "starts", "lens", "seg_slots", "active"),
    [
        ([0, 0, -1, 1, 1, 0], [0, 3, 5], [2, 2, 1], [0, 1, 0], [0, 1]),
        ([-1, -1, 3, 3, 3, -1, 7], [2, 6], [3, 1], [3, 7], [3, 7]),
        ([5, 2, 5, 2], [0, 1, 2, 3], [1, 1, 1, 1], [5, 2, 5, 2], [2, 5]),
        ([4] * 6, [0], [6], [4], [4]),
        ([-1, -1], [], [], [], []),
        ([], [], [], [], []),
    ],
)
def test_lora_batch_segments(
    slots: list[int], starts: list[int], lens: list[int], seg_slots: list[int], active: list[int]
) -> None:
    batch = LoRABatch.from_token_slots(slots, "cpu")
    assert batch.token_slots.tolist() == slots
    assert batch.token_slots.dtype == torch.long
    assert (batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list) == (starts, lens, seg_slots)
    assert (batch.seg_starts.tolist(), batch.seg_lens.tolist(), batch.seg_slots.tolist()) == (
        starts,
        lens,
        seg_slots,
    )
    assert batch.active_slots_list == active
    assert batch.active_slots.tolist() == active
    assert batch.has_lora == bool(active)
    assert batch.num_tokens == len(slots)


def test_lora_batch_rejects_bad_slot() -> None:
    with pytest.raises(ValueError, match="-2"):
        LoRABatch.from_token_slots([0, -2], "cpu")


@pytest.fixture
def native_kernel() -> None:
    reason = native_available()
    if reason is not None:
        pytest.skip(reason)


SHARD_COLUMNS = {  # (column start, columns) of the three shards, and the layer's (in, out) features
    "narrow": (((0, 16), (16, 8), (24, 16)), (IN_FEATURES, OUT_FEATURES)),
    "vector": (((0, 320), (320, 64), (384, 128)), (96, 512)),  # the AVX-512 paths, units across shards
}


def block_diagonal_buffers(layout: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A packed three-shard layer: slot s stacks shard ranks (r_q, r_k, r_v) (0 = shard absent), B is
    block-diagonal, and NaN fills everything outside the blocks: reading it shows."""
    shard_cols, (in_features, out_features) = SHARD_COLUMNS[layout]
    shard_ranks = [(3, 0, 5), (16, 16, 16), (0, 0, 1), (0, 0, 0), (7, 2, 0)]
    gen = torch.Generator().manual_seed(3)
    num_slots, r_max = len(shard_ranks), 48
    a = torch.randn(num_slots, r_max, in_features, generator=gen) / in_features**0.5  # [slots, r_max, in]
    b = torch.full((num_slots, r_max, out_features), float("nan"))  # [slots, r_max, out]
    blocks = torch.zeros(num_slots, 3, 4, dtype=torch.long)  # [slots, shards, 4]
    ranks = torch.zeros(num_slots, dtype=torch.long)
    for slot, per_shard in enumerate(shard_ranks):
        b[slot, :sum(per_shard)] = float("nan")
        offset = 0
        for i, (r, (col, cols)) in enumerate(zip(per_shard, shard_cols, strict=True)):
            b[slot, offset:offset + r] = 0.0
            b[slot, offset:offset + r, col:col + cols] = torch.randn(r, cols, generator=gen)
            blocks[slot, i] = torch.tensor([offset, r, col, cols])
            offset += r
        ranks[slot] = offset
    return a, b, ranks, torch.rand(num_slots, generator=gen) + 0.5, blocks


@pytest.mark.usefixtures("native_kernel")
@pytest.mark.parametrize("layout", list(SHARD_COLUMNS))
@pytest.mark.parametrize("slots", [[0, 1, 1, 2, -1, 4, 3, 0], [1] * 40 + [4] * 3, [4, 0, 4, 2, 1],
                                   [1] * 4 + [4] * 4 + [0] * 5 + [2] * 4])
def test_native_reads_only_the_blocks(slots: list[int], layout: str) -> None:
    a, b, ranks, scales, blocks = block_diagonal_buffers(layout)
    x, out = make_inputs(len(slots), torch.float32, features=SHARD_COLUMNS[layout][1])
    batch = LoRABatch.from_token_slots(slots, "cpu")
    # The reference sees the zeros the blocks promise; the native op sees NaN there and must skip it.
    expected = add_lora_reference(out.clone(), x, a, torch.nan_to_num(b, nan=0.0), ranks, scales, batch)
    long_runs = any(n > MAX_NATIVE_RUN for n in batch.seg_lens_list)
    b_for_native = torch.nan_to_num(b, nan=0.0) if long_runs else b  # long runs go to torch: no blocks
    result = add_lora_native(out.clone(), x, a, b_for_native, ranks, scales, batch, blocks)
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=1e-5)


@pytest.mark.usefixtures("native_kernel")
def test_native_takes_torch_path_off_its_turf() -> None:
    """Non-contiguous operands, float64 and bfloat16 still give the reference's answer."""
    a, b, ranks, scales = make_buffers(RANKS, torch.float32)
    slots = SLOT_CASES["all_ranks_mixed"]
    batch = LoRABatch.from_token_slots(slots, "cpu")
    x_wide = torch.randn(len(slots), IN_FEATURES * 2)
    x = x_wide[:, ::2]  # [tokens, in] with stride 2
    _, out = make_inputs(len(slots), torch.float32)
    expected = add_lora_reference(out.clone(), x, a, b, ranks, scales, batch)
    torch.testing.assert_close(add_lora_native(out.clone(), x, a, b, ranks, scales, batch), expected,
                               atol=1e-5, rtol=1e-5)
    a64, b64, x64, out64 = (t.double() for t in (a, b, x, out))
    torch.testing.assert_close(add_lora_native(out64.clone(), x64, a64, b64, ranks, scales, batch),
                               add_lora_reference(out64.clone(), x64, a64, b64, ranks, scales, batch))
