"""Triton int4 and int8 weight-only matmuls against their torch reference (the weight decoded by
`Int4Weight.dense` / `Int8ChannelWeight.dense`, then a matmul): on CPU through Triton's interpreter, on CUDA
when present."""

from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

# Read when kernels are decorated, triton's own library included, so it must precede importing triton;
# when something imported triton first (a full test run), test_in_fresh_process runs the kernel tests.
# An explicit TRITON_INTERPRET=0 on a GPU machine runs the compiled kernels instead.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")
pytest.importorskip("triton")

from loraplex.model import quant  # noqa: E402
from loraplex.model.quant import Int4Weight, Int8ChannelWeight, quantize_int4, quantize_int8_channel  # noqa: E402
from loraplex.model.triton_quant import int4_linear_triton, int8_linear_triton  # noqa: E402
from tests.tolerances import assert_close  # noqa: E402
from tests.triton_compile import compile_for_cuda  # noqa: E402
from tests.triton_interpreter import SKIP_REASON, kernels_runnable, run_in_fresh_process  # noqa: E402

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
needs_kernels = pytest.mark.skipif(not kernels_runnable(), reason=SKIP_REASON)
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_weight(cols: int, rows: int, group: int, seed: int = 0) -> Int4Weight:
    """An `[in=cols, out=rows]` weight on the 4-bit grid, scaled so outputs stay within ~10."""
    gen = torch.Generator().manual_seed(seed)
    w = quantize_int4(torch.randn(cols, rows, generator=gen) / cols**0.5, group)
    return Int4Weight(w.packed.to(DEVICE), w.scale.to(DEVICE), w.offset.to(DEVICE), group)


def reference(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return torch.nn.functional.linear(x, w.dense().to(x.dtype), bias)


def run(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    return int4_linear_triton(x, w.packed, w.scale, w.offset, w.group, bias)


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "out", "group"), [
    (1, 64, 72, 32),      # one row; outputs past a tile of 64 and not a multiple of it
    (7, 256, 64, 32),     # a decode batch, the inputs split into slices
    (16, 128, 96, 64),    # a full row tile; 64-input steps
    (17, 128, 40, 128),   # one row past a tile; a group of four steps
    (70, 96, 130, 32),    # tiles of 64 rows
])
def test_int4_matmul_matches_torch(dtype: torch.dtype, rows: int, cols: int, out: int, group: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = make_weight(cols, out, group)
    x = torch.randn(rows, cols, generator=gen).to(dtype).to(DEVICE)
    bias = torch.randn(out, generator=gen).to(dtype).to(DEVICE)
    for b in (None, bias):
        got = run(x, w, b)
        assert got.dtype == dtype and got.shape == (rows, out)
        assert_close(got, reference(x, w, b))


@needs_kernels
def test_strided_input_and_checkpoint_grid() -> None:
    """A view of a wider activation (the layers pass slices), and a GPTQ-style grid: integer zeros, so negative
    offsets, and groups of 128 (what `prequantized.int4_grid` keeps)."""
    gen = torch.Generator().manual_seed(3)
    cols, out, group = 256, 48, 128
    q = torch.randint(0, 16, (out, cols), generator=gen, dtype=torch.uint8)
    scale = torch.rand(out, cols // group, generator=gen) / 20 + 0.01
    zero = torch.randint(1, 16, (out, cols // group), generator=gen).float()
    w = Int4Weight((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous().to(DEVICE), scale.to(DEVICE),
                   (-zero * scale).to(DEVICE), group)
    wide = torch.randn(9, cols + 40, generator=gen).to(DEVICE)
    x = wide[:, 8:8 + cols]
    assert not x.is_contiguous()
    assert_close(run(x, w, None), reference(x.contiguous(), w, None))


@needs_kernels
def test_split_inputs_add_in_a_fixed_order() -> None:
    """A decode-sized batch splits the inputs across programs; its result is the same bits on every call."""
    w = make_weight(1024, 64, 32)
    x = torch.randn(2, 1024, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    first = run(x, w, None)
    assert torch.equal(first, run(x, w, None))
    assert_close(first, reference(x, w, None))


@needs_kernels
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("rows", "cols", "out"), [(1, 64, 72), (7, 1024, 64), (17, 96, 40), (70, 128, 130)])
def test_int8_matmul_matches_torch(dtype: torch.dtype, rows: int, cols: int, out: int) -> None:
    gen = torch.Generator().manual_seed(rows)
    w = quantize_int8_channel(torch.randn(cols, out, generator=gen) / cols**0.5)
    w = Int8ChannelWeight(w.weight.to(DEVICE), w.scale.to(DEVICE))
    wide = torch.randn(rows, cols + 8, generator=gen).to(dtype).to(DEVICE)
    x = wide[:, 4:4 + cols]  # a strided view, as the layers pass
    bias = torch.randn(out, generator=gen).to(dtype).to(DEVICE)
    for b in (None, bias):
        got = int8_linear_triton(x, w.weight, w.scale, b)
        assert got.dtype == dtype and got.shape == (rows, out)
        assert_close(got, torch.nn.functional.linear(x, w.dense().to(dtype), b))


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch to the Triton kernel is for CUDA tensors")
def test_int4_linear_dispatches_to_triton_on_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    calls = []

    def spy(*args: object) -> torch.Tensor:
        calls.append(args)
        return int4_linear_triton(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(quant, "_triton_ops", lambda: SimpleNamespace(int4_linear_triton=spy))
    w = make_weight(64, 32, 32)
    x = torch.randn(3, 64, device=DEVICE, dtype=torch.bfloat16)
    assert_close(quant.int4_linear(x, w, None), reference(x, w, None))
    assert len(calls) == 1


def test_kernels_compile_for_cuda(tmp_path: Path) -> None:
    """The kernels go through Triton's GPU compiler (to an sm_90 cubin), which the interpreter skips: 16-bit
    products on tensor cores, float32 ones as IEEE dots; one slice writing the output with its bias, several
    writing float32 partial sums."""
    specs = []
    for dtype in ("bf16", "fp16", "fp32"):
        for block_m, block_k, has_bias, out in ((16, 32, False, "fp32"), (64, 64, True, dtype)):
            common = {"x_ptr": f"*{dtype}", "scale_ptr": "*fp32", "bias_ptr": f"*{dtype}", "out_ptr": f"*{out}"}
            tiles = {"BLOCK_M": block_m, "BLOCK_N": 64, "BLOCK_K": block_k, "HAS_BIAS": has_bias, "UPCAST": False,
                     "PRECISION": "ieee"}
            specs.append(("_int4_linear_kernel", common | {"packed_ptr": "*u8", "offset_ptr": "*fp32"}, {},
                          tiles | {"GROUP": 128}))
            specs.append(("_int8_linear_kernel", common | {"q_ptr": "*i8"}, {}, tiles))
    output = compile_for_cuda("loraplex.model.triton_quant", specs, tmp_path)
    assert output.count("compiled") == len(specs)


@pytest.mark.skipif(kernels_runnable(), reason="the kernels run in this process")
def test_in_fresh_process() -> None:
    """The kernel tests, in a process that imports triton after setting TRITON_INTERPRET=1."""
    run_in_fresh_process(__file__, "matches_torch or strided or split_inputs")  # int4's and int8's
