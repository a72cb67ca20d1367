"""Triton LoRA kernels against the torch reference: on CPU through Triton's interpreter, on CUDA when present."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

# Read when kernels are decorated, triton's own library included, so it must precede importing triton;
# when something imported triton first (a full test run), test_in_fresh_process runs the kernel tests.
# An explicit TRITON_INTERPRET=0 on a GPU machine runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")

from loraplex.lora.batch import EMPTY_SLOT, LoRABatch  # noqa: E402
from loraplex.lora.ops import AddLoRA, add_lora_reference, get_lora_op  # noqa: E402
from loraplex.lora.ops.triton_ops import (  # noqa: E402
    add_lora_triton,
    add_lora_triton_gather,
    add_lora_triton_segments,
)
from tests.tolerances import TOLERANCES, assert_close  # noqa: E402
from tests.triton_compile import compile_for_cuda  # noqa: E402
from tests.triton_interpreter import SKIP_REASON, kernels_runnable, run_in_fresh_process  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernels_runnable(), reason=SKIP_REASON)
IN_FEATURES = 40
OUT_FEATURES = 72  # more than one BLOCK_N tile, and not a multiple of it
RANKS = (1, 3, 8, 16, 33, 64, 0)  # the last slot holds no adapter
R_MAX = 64
OPS: dict[str, AddLoRA] = {
    "dispatch": add_lora_triton,
    "segments": add_lora_triton_segments,
    "gather": add_lora_triton_gather,
}
SLOT_CASES = {
    "one_segment": [2] * 9,
    "all_distinct": [0, 1, 2, 3, 4, 5],
    "unsorted_interleaved": [3, 0, 3, 1, 0, 5, 1, 3, 0, 5, 5, 2],
    "no_adapter_tokens_mixed_in": [-1, 2, 2, -1, -1, 0, -1, 2, -1, 5],
    "all_ranks_mixed": [5, -1, 0, 4, 1, 3, -1, 2, 5, 0, 4, 4, 1, -1, 3, 2],
    "long_grouped": [0] * 20 + [-1] * 7 + [5] * 17 + [3] * 3,
    "rank_zero_slot": [6, 6, 1, 6, -1, 1],
}


def make_buffers(dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Slot buffers whose A and B rows past each slot's rank hold NaN: reading them shows."""
    gen = torch.Generator().manual_seed(0)
    num_slots = len(RANKS)
    a = torch.randn(num_slots, R_MAX, IN_FEATURES, generator=gen) / IN_FEATURES**0.5  # [slots, r_max, in]
    b = torch.randn(num_slots, R_MAX, OUT_FEATURES, generator=gen) / 4  # [slots, r_max, out]
    for slot, rank in enumerate(RANKS):
        a[slot, rank:] = float("nan")
        b[slot, rank:] = float("nan")
    scales = torch.rand(num_slots, generator=gen) + 0.5  # [slots]
    return (a.to(dtype).to(DEVICE), b.to(dtype).to(DEVICE), torch.tensor(RANKS, device=DEVICE),
            scales.to(DEVICE))


def make_inputs(num_tokens: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(num_tokens, IN_FEATURES, generator=gen).to(dtype).to(DEVICE)  # [tokens, in]
    out = torch.randn(num_tokens, OUT_FEATURES, generator=gen).to(dtype).to(DEVICE)  # [tokens, out]
    return x, out


def check_against_reference(op: AddLoRA, slots: list[int], dtype: torch.dtype,
                            batch: LoRABatch | None = None) -> None:
    a, b, ranks, scales = make_buffers(dtype)
    x, out = make_inputs(len(slots), dtype)
    batch = batch or LoRABatch.from_token_slots(slots, DEVICE)
    # The reference runs in float32 on the same inputs: in 16 bits its own rounded intermediates would
    # be further from the exact result than the kernel, which accumulates in float32 and rounds once.
    expected = add_lora_reference(out.to(torch.float32, copy=True), x.float(), a.float(), b.float(), ranks, scales, batch).to(dtype)
    assert torch.isfinite(expected).all(), "reference read a slot's padding past its rank"
    result = out.clone()
    assert op(result, x, a, b, ranks, scales, batch) is result
    assert_close(result, expected)
    # Tokens without an adapter (or with a rank-0 slot) are bitwise untouched; others got a delta.
    untouched = torch.tensor([s == EMPTY_SLOT or RANKS[s] == 0 for s in slots], device=DEVICE)
    assert torch.equal(result[untouched], out[untouched])
    if (~untouched).any():
        atol, rtol = TOLERANCES[dtype]
        assert not torch.allclose(result[~untouched], out[~untouched], atol=atol, rtol=rtol)


@needs_kernels
@pytest.mark.parametrize("case", list(SLOT_CASES))
@pytest.mark.parametrize("op_name", list(OPS))
def test_float32_matches_reference(op_name: str, case: str) -> None:
    check_against_reference(OPS[op_name], SLOT_CASES[case], torch.float32)


@needs_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("case", ["unsorted_interleaved", "long_grouped", "all_ranks_mixed"])
@pytest.mark.parametrize("op_name", ["segments", "gather"])
def test_half_precision_matches_reference(op_name: str, case: str, dtype: torch.dtype) -> None:
    check_against_reference(OPS[op_name], SLOT_CASES[case], dtype)


@pytest.mark.parametrize("op_name", list(OPS))
def test_no_adapter_batch_leaves_out_untouched(op_name: str) -> None:
    a, b, ranks, scales = make_buffers(torch.float32)
    x, out = make_inputs(5, torch.float32)
    before = out.clone()
    batch = LoRABatch.from_token_slots([EMPTY_SLOT] * 5, DEVICE)
    assert OPS[op_name](out, x, a, b, ranks, scales, batch) is out
    assert torch.equal(out, before)


@needs_kernels
def test_zero_length_segment_is_skipped() -> None:
    """A segment of length 0 (not produced by from_token_slots, but legal input) writes nothing."""
    slots = [1, 1, 4, 4, 4]
    built = LoRABatch.from_token_slots(slots, DEVICE)

    def as_tensor(values: list[int]) -> torch.Tensor:
        return torch.tensor(values, dtype=torch.long, device=DEVICE)

    starts, lens, seg_slots = [0, 2, 2], [2, 0, 3], [1, 3, 4]
    batch = LoRABatch(built.token_slots, as_tensor(starts), as_tensor(lens), as_tensor(seg_slots),
                      built.active_slots, starts, lens, seg_slots, built.active_slots_list, True)
    check_against_reference(add_lora_triton_segments, slots, torch.float32, batch)


@needs_kernels
def test_scale_is_applied() -> None:
    """Doubling a slot's scale doubles its delta (the scale is fused into the expand)."""
    a, b, ranks, scales = make_buffers(torch.float32)
    x, out = make_inputs(4, torch.float32)
    batch = LoRABatch.from_token_slots([3, 3, 3, 3], DEVICE)
    once = add_lora_triton(out.clone(), x, a, b, ranks, scales, batch) - out
    twice = add_lora_triton(out.clone(), x, a, b, ranks, scales * 2, batch) - out
    torch.testing.assert_close(twice, 2 * once, atol=1e-5, rtol=1e-5)


def test_registry_selects_triton() -> None:
    assert get_lora_op("triton") is add_lora_triton


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU-only error")
def test_cpu_without_interpreter_is_a_clear_error() -> None:
    """Without CUDA and without the interpreter, selecting the backend fails at config time."""
    code = (
        "from loraplex.config import LoRAConfig\n"
        "try:\n"
        "    LoRAConfig(lora_backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError:" in result.stdout and "CUDA" in result.stdout


def test_missing_triton_fails_only_when_selected() -> None:
    """With triton unimportable, loraplex and the torch backend still work; 'triton' is a ValueError."""
    code = (
        "import sys\n"
        "sys.modules['triton'] = None  # makes `import triton` raise ImportError\n"
        "from loraplex.config import LoRAConfig\n"
        "from loraplex.lora.ops import get_lora_op\n"
        "LoRAConfig()\n"
        "get_lora_op('torch')\n"
        "try:\n"
        "    LoRAConfig(lora_backend='triton')\n"
        "except ValueError as exc:\n"
        "    print('ValueError:', exc)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            cwd=Path(__file__).resolve().parents[2], timeout=120)
    assert result.returncode == 0, result.stderr
    assert "ValueError:" in result.stdout and "needs the triton package" in result.stdout


def test_kernels_compile_for_cuda(tmp_path: Path) -> None:
    """Every kernel goes through Triton's GPU compiler (to an sm_90 cubin), which the interpreter skips."""
    specs = []
    for dtype, precision in (("bf16", "tf32"), ("fp32", "ieee")):
        ptr = f"*{dtype}"
        specs += [
            ("_shrink_segments_kernel", {"x_ptr": ptr, "a_ptr": ptr, "h_ptr": "*fp32"}, {},
             {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_K": 64, "PRECISION": precision}),
            ("_expand_segments_kernel", {"h_ptr": "*fp32", "b_ptr": ptr, "out_ptr": ptr, "scales_ptr": "*fp32"},
             {}, {"BLOCK_M": 16, "BLOCK_R": 16, "BLOCK_N": 64, "PRECISION": precision}),
            ("_shrink_gather_kernel", {"x_ptr": ptr, "a_ptr": ptr, "h_ptr": "*fp32"}, {},
             {"BLOCK_R": 16, "BLOCK_K": 128}),
            ("_expand_gather_kernel", {"h_ptr": "*fp32", "b_ptr": ptr, "out_ptr": ptr, "scales_ptr": "*fp32"},
             {}, {"BLOCK_R": 16, "BLOCK_N": 128}),
        ]
    output = compile_for_cuda("loraplex.lora.ops.triton_ops", specs, tmp_path)
    assert output.count("compiled") == len(specs)


@pytest.mark.skipif(kernels_runnable(), reason="the kernels run in this process")
def test_in_fresh_process() -> None:
    """The kernel tests, in a process that imports triton after setting TRITON_INTERPRET=1."""
    run_in_fresh_process(__file__, "matches_reference or zero_length or scale_is_applied")
