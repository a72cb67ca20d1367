"""Quantized base weights: `--quantize int8` (calibrated W8A8 on the CPU, weight-only on a GPU), `--quantize int4`
anywhere, `--quantize fp8` on GPUs with fp8 tensor cores.

    int8   on the CPU: weights int8 per output channel, activations int8 per token (dynamic), the product in
           int8 (`torch._int_mm`, oneDNN's VNNI kernels); SmoothQuant smoothing and four float32 outlier
           channels per layer, calibrated at load. On a GPU: weights only, int8 per output channel (symmetric),
           each product decoding them in a Triton kernel (loraplex/model/triton_quant.py); the LM head too
    int4   weights only: 4 bits in groups of 32 inputs, each group of each output channel on the 16-level grid
           from its minimum to its maximum (GGUF's Q4_1 grid; a weight already on it comes back exactly), the
           LM head left in float as GPTQ and AWQ leave it; each product decodes the weight to the activations'
           dtype and multiplies in float (on CUDA in one Triton kernel, the weight read at 4 bits; on the CPU
           up to 8 rows in one C kernel, decoding in registers; above that a C decoder into a reused buffer,
           then oneDNN). A memory saving more than a speed-up on the 2-core CPU: one request alone runs 1.2×
           float32, 32 at once 0.6× (docs/benchmarks.md). A pre-quantized GPTQ / AWQ / compressed-tensors
           4-bit checkpoint keeps its own grid (loraplex/model/prequantized.py)
    fp8    weights float8 e4m3 per output channel, activations float8 e4m3 per token (dynamic), the product
           in fp8 with float32 accumulation (`torch._scaled_mm`, row-wise scales; CUDA compute capability
           8.9+: L4, L40S, H100, H200). e4m3's exponent covers outliers: no smoothing, no calibration

Why this scheme (docs/benchmarks.md, issue 16): at the decode batch sizes of the CPU workload (32 rows)
a float32 GEMM already runs at the cores' FMA peak, so weight-only int8 (int8 weights multiplied in
float) cannot be faster, and torch's CPU weight-only kernels are 40–130× slower than oneDNN's float32;
only an int8 product is (~3×). Rounding activations costs accuracy where a few input channels carry
outliers: per tensor, the demo model's perplexity rose 61 %; per token, 4.7 %. SmoothQuant (Xiao et al.,
2023) moves outliers into the weights: input channel j is divided by `s_j = max|X_j|^α / max|W_j|^(1-α)`
and the weight's row j multiplied by it (the product is unchanged); that left +0.8–1.6 %. The four input
channels that are still largest after smoothing are then left out of the int8 product and multiplied in
float32 (as LLM.int8() does with its outlier columns): −0.05 % and +0.6 % on two texts. `max|X_j|` is
measured when the model loads, on the first 1,024 tokens of loraplex/model/calibration.txt (~2 s).

A LoRA adapter's delta is added to the quantized layer's output from the unsmoothed float input, as
PEFT adds it to a base layer: adapters need no change. DoRA reads the dequantized weight.
"""

from __future__ import annotations

import collections
import ctypes
import functools
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from loraplex.model import gemm

if TYPE_CHECKING:
    from loraplex.model.decoder import CausalLM
    from loraplex.model.layers import PackedLinear

log = logging.getLogger(__name__)

QUANTIZE = ("none", "int8", "int4", "fp8")
FP8_MAX = 448.0
"""The largest float8 e4m3fn value."""
SMOOTH_ALPHA = 0.5
"""SmoothQuant's migration strength: from 0.4 to 0.65 the demo model's perplexity changed by under 0.7 % (without
outlier channels), 0.8 was far worse; 0.5 is the paper's default."""
OUTLIER_CHANNELS = 4
"""Input channels per layer left in float32 (the largest after smoothing): their products are added in float."""
CALIBRATION_TOKENS = 1024
CALIBRATION_CHUNK = 256
"""The calibration text is read as sequences of this many tokens (each sequence's first tokens carry the
largest activations: more of them than one long sequence has); a tokenizer that reads it as fewer tokens
gets the pseudo-random ids instead."""


class QuantizedWeight:
    """A linear layer's quantized weight: how it multiplies, and the float weight it stands for."""

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """`x @ weight + bias` for `x` `[rows, in]`."""
        raise NotImplementedError

    def dense_t(self) -> torch.Tensor:
        """The float weight `[in, out]` this stands for."""
        raise NotImplementedError

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """What it stores (for the byte counts)."""
        raise NotImplementedError


@dataclass
class Int8Weight(QuantizedWeight):
    """A linear layer's weight as int8 with a float32 scale per output column, its input smoothed, and its
    few outlier input channels kept apart in float32."""

    weight: torch.Tensor  # [in, out] int8, zero in the outlier rows
    scale: torch.Tensor  # [out] float32: weight · scale is the smoothed float weight
    inv_smooth: torch.Tensor  # [in] float32: the layer multiplies its input by it first
    outliers: torch.Tensor  # [n] long: input channels multiplied in float32
    outlier_mask: torch.Tensor  # [in] uint8: 1 at the outlier channels
    outlier_weight: torch.Tensor  # [n, out] float32: the original (unsmoothed) weight rows of those channels

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.scale, self.inv_smooth, self.outliers, self.outlier_mask, self.outlier_weight

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int8_linear(x, self, bias)

    def dense_t(self) -> torch.Tensor:
        """The float weight `[in, out]` this stands for (smoothing undone, outlier rows put back)."""
        w = self.weight.float() * self.scale * self.inv_smooth[:, None]
        w[self.outliers] = self.outlier_weight
        return w


@dataclass
class Int8ChannelWeight(QuantizedWeight):
    """A linear layer's weight as int8 with a float32 scale per output row, symmetric: weight-only int8 (the GPU
    path of `--quantize int8`); the activations stay in their dtype."""

    weight: torch.Tensor  # [out, in] int8
    scale: torch.Tensor  # [out] float32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.scale

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        ops = _triton_ops()
        if x.is_cuda and ops is not None and x.shape[0] and x.shape[1] % 32 == 0:
            return ops.int8_linear_triton(x, self.weight, self.scale, bias)  # type: ignore[no-any-return]
        return torch.nn.functional.linear(x, self.dense().to(x.dtype), bias)

    def dense(self) -> torch.Tensor:
        """The float weight `[out, in]`."""
        return self.weight.float() * self.scale[:, None]

    def dense_t(self) -> torch.Tensor:
        return self.dense().t()


def quantize_int8_channel(weight_t: torch.Tensor) -> Int8ChannelWeight:
    """`weight_t` `[in, out]` as int8 per output channel, its largest magnitude at 127."""
    w = weight_t.float().t()  # [out, in]
    scale = w.abs().amax(dim=1).clamp(min=1e-12) / 127  # [out]
    q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return Int8ChannelWeight(q.contiguous(), scale.contiguous())


@dataclass
class Fp8Weight(QuantizedWeight):
    """A linear layer's weight as float8 e4m3 with a float32 scale per output row."""

    weight: torch.Tensor  # [out, in] float8_e4m3fn (its transpose is the column-major operand _scaled_mm wants)
    scale: torch.Tensor  # [1, out] float32

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.weight, self.scale

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return fp8_linear(x, self, bias)

    def dense_t(self) -> torch.Tensor:
        return (self.weight.float() * self.scale.t()).t()


@dataclass
class Int4Weight(QuantizedWeight):
    """A linear layer's weight as 4-bit integers, each output row in groups of `group` inputs with a float32
    scale and offset of its own: weight[c, k] = q[c, k] · scale[c, k // group] + offset[c, k // group] (to
    nearest on the grid from the group's minimum to its maximum, as GGUF's Q4_1 blocks; GPTQ's and AWQ's zero
    point z is offset = −z · scale). Two inputs share a byte: input 2i in the low nibble, 2i + 1 in the high.
    Rows of `[out, in]` as oneDNN multiplies a plain weight, and as GGUF and GPTQ's `qweight` transpose
    order them."""

    packed: torch.Tensor  # [out, in / 2] uint8
    scale: torch.Tensor  # [out, in / group] float32
    offset: torch.Tensor  # [out, in / group] float32
    group: int

    def tensors(self) -> tuple[torch.Tensor, ...]:
        return self.packed, self.scale, self.offset

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        return int4_linear(x, self, bias)

    def dense(self) -> torch.Tensor:
        """The float weight `[out, in]`."""
        q = torch.stack((self.packed & 15, self.packed >> 4), dim=2).flatten(1).float()  # [out, in]
        return (q * self.scale.repeat_interleave(self.group, 1)) + self.offset.repeat_interleave(self.group, 1)

    def dense_t(self) -> torch.Tensor:
        return self.dense().t()


INT4_GROUP = 32
"""Input rows per scale and offset of `--quantize int4`: GGUF's Q4_0/Q4_1 block, the finest group GPTQ and AWQ
checkpoints use. A layer whose input size it does not divide stays in float."""


def quantize_int4(weight_t: torch.Tensor, group: int = INT4_GROUP) -> Int4Weight:
    """`weight_t` `[in, out]` on each group's 16-level grid from its minimum to its maximum, each weight to
    the nearest level."""
    rows, cols = weight_t.shape
    w = weight_t.float().t().reshape(cols, rows // group, group)
    low = w.amin(dim=2)  # [out, groups]
    scale = ((w.amax(dim=2) - low) / 15).clamp_(min=1e-12)
    q = torch.round((w - low[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.uint8).reshape(cols, rows)
    return Int4Weight((q[:, 0::2] | (q[:, 1::2] << 4)).contiguous(), scale.contiguous(), low.contiguous(), group)


INT4_FUSED_ROWS = 8
"""Up to this many rows an int4 product on the CPU runs quant_cpu.c's fused kernel (each weight decoded in
registers); above it, the decoded weight goes through oneDNN (docs/benchmarks.md: at 8 rows the two cost
about the same as float32, at 1 row the fused kernel reads 4 bits a weight and is 1.7× faster)."""


def int4_linear(x: torch.Tensor, w: Int4Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight + bias`: the weight decoded to `x`'s dtype, then multiplied. On CUDA a Triton kernel decodes
    the weight as it multiplies (loraplex/model/triton_quant.py). On the CPU in float32, a few
    rows run a C kernel that decodes and multiplies at once; more rows have the weight decoded by a C kernel
    into a buffer reused from call to call and multiplied by oneDNN where torch has it (3× faster than ATen's
    matmul of a plain weight on the CPUs measured, docs/benchmarks.md)."""
    if x.is_cuda and w.group % 32 == 0 and x.shape[0]:
        ops = _triton_ops()
        if ops is not None:
            return ops.int4_linear_triton(x, w.packed, w.scale, w.offset, w.group, bias)  # type: ignore[no-any-return]
    kernels = _kernels()
    if kernels is None or not x.is_cpu or x.dtype != torch.float32 or w.group % 32:  # the C decoder's unit: 32
        return torch.nn.functional.linear(x, w.dense().to(x.dtype), bias)
    rows, cols = w.packed.shape[0], w.packed.shape[1] * 2
    if x.shape[0] <= INT4_FUSED_ROWS:
        xe, xo = x[:, 0::2].contiguous(), x[:, 1::2].contiguous()
        out = torch.empty(x.shape[0], rows, dtype=torch.float32)
        kernels.int4_rows(w.packed.data_ptr(), rows, cols, w.scale.data_ptr(), w.offset.data_ptr(), w.group, xe.data_ptr(),
                   xo.data_ptr(), x.shape[0], None if bias is None else bias.data_ptr(), out.data_ptr())
        return out
    weight = _scratch(rows * cols)[:rows * cols].view(rows, cols)
    kernels.int4_decode(w.packed.data_ptr(), rows, cols, w.scale.data_ptr(), w.offset.data_ptr(), w.group, weight.data_ptr())
    if _onednn():
        return gemm.linear(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


@functools.cache
def _triton_ops() -> Any:
    """loraplex/model/triton_quant.py (imported on first use: importing triton costs seconds); None, with a
    warning, where triton does not import."""
    try:
        from loraplex.model import triton_quant
    except ImportError as e:
        log.warning("triton does not import (%s); int4 and int8 layers on this GPU decode their weight for every "
                    "product (slower)", e)
        return None
    return triton_quant


@functools.cache
def _onednn() -> bool:
    return gemm.onednn_supported(torch.device("cpu"), torch.float32)


_local = threading.local()


def _scratch(size: int) -> torch.Tensor:
    """A float32 buffer of at least `size` elements, this thread's own, kept for the next call (so each thread
    that multiplies int4 layers of more than INT4_FUSED_ROWS rows holds the largest one's float32 size)."""
    buffer: torch.Tensor | None = getattr(_local, "buffer", None)
    if buffer is None or buffer.numel() < size:
        buffer = _local.buffer = torch.empty(size, dtype=torch.float32)
    return buffer


def quantize_fp8(weight_t: torch.Tensor) -> Fp8Weight:
    """`weight_t` `[in, out]` as float8 e4m3 with one scale per output column (its largest value maps to 448)."""
    w = weight_t.float().t()  # [out, in]
    scale = (w.abs().amax(dim=1, keepdim=True).clamp(min=1e-12) / FP8_MAX)  # [out, 1]
    q = (w / scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return Fp8Weight(q.contiguous(), scale.t().contiguous())


def fp8_linear(x: torch.Tensor, w: Fp8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight + bias` with each row of `x` rounded to float8 e4m3 at its own scale, the product in fp8
    (`torch._scaled_mm`, row-wise scales: on CUDA its output is bfloat16, then cast to `x`'s dtype)."""
    xf = x.float()
    x_scale = xf.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(FP8_MAX)  # [rows, 1]
    xq = (xf / x_scale).clamp_(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    out_dtype = torch.bfloat16 if x.is_cuda else torch.float32
    out = torch._scaled_mm(xq, w.weight.t(), scale_a=x_scale, scale_b=w.scale, out_dtype=out_dtype).to(x.dtype)
    return out if bias is None else out.add_(bias)


def quantize_int8(weight_t: torch.Tensor, smooth: torch.Tensor, outliers: torch.Tensor) -> Int8Weight:
    """`weight_t` `[in, out]` (float) as int8 per output column after multiplying input row j by `smooth[j]`,
    except the rows `outliers`, kept in float32."""
    w = weight_t.float() * smooth[:, None]
    w[outliers] = 0
    scale = w.abs().amax(dim=0).clamp(min=1e-12) / 127  # [out]
    q = torch.round(w / scale).clamp_(-127, 127).to(torch.int8)
    mask = torch.zeros(weight_t.shape[0], dtype=torch.uint8)
    mask[outliers] = 1
    return Int8Weight(q.contiguous(), scale.contiguous(), (1.0 / smooth).float().contiguous(),
                      outliers.contiguous(), mask, weight_t.float()[outliers].contiguous())


def int8_linear(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`x @ weight + bias` for `x` `[rows, in]` (float32): each row, smoothed and without its outlier
    channels, rounded to int8 with its own scale; the outlier channels' products added in float32.

    The rounding before and the scaling after the integer product run in the C kernels of quant_cpu.c where
    they build (one pass each instead of a dozen torch ops: the product is then most of the layer at
    decode batch sizes), else as `int8_linear_torch`; both give the same bits."""
    kernels = _kernels()
    if kernels is None or x.stride(1) != 1 or not x.is_cpu or x.dtype != torch.float32:
        return int8_linear_torch(x, w, bias)
    quantize, dequantize = kernels.quantize_rows, kernels.dequantize_rows
    rows, cols = x.shape
    n = w.outliers.numel()
    xq = torch.empty(rows, cols, dtype=torch.int8)
    x_scale = torch.empty(rows, dtype=torch.float32)
    x_out = torch.empty(rows, n, dtype=torch.float32)
    quantize(x.data_ptr(), rows, cols, x.stride(0), w.inv_smooth.data_ptr(), w.outlier_mask.data_ptr(),
             w.outliers.data_ptr(), n, xq.data_ptr(), x_scale.data_ptr(), x_out.data_ptr())
    acc = torch._int_mm(xq, w.weight)  # [rows, out] int32
    out = torch.empty(acc.shape, dtype=torch.float32)
    dequantize(acc.data_ptr(), rows, acc.shape[1], x_scale.data_ptr(), w.scale.data_ptr(),
               None if bias is None else bias.data_ptr(), x_out.data_ptr(), w.outlier_weight.data_ptr(), n,
               out.data_ptr())
    return out


def int8_linear_torch(x: torch.Tensor, w: Int8Weight, bias: torch.Tensor | None) -> torch.Tensor:
    """`int8_linear` in torch ops (the reference for its C kernels, and the path where they do not build)."""
    x_out = x[:, w.outliers]  # [rows, n]
    x = (x * w.inv_smooth).masked_fill_(w.outlier_mask.bool(), 0.0)
    x_scale = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12).div_(127)  # [rows, 1]
    xq = (x / x_scale).round_().to(torch.int8)
    out = torch._int_mm(xq, w.weight).to(torch.float32).mul_(x_scale).mul_(w.scale)  # [rows, out]
    if bias is not None:
        out.add_(bias)
    for k in range(w.outliers.numel()):  # one channel at a time, in the C kernel's order
        out.add_(x_out[:, k:k + 1] * w.outlier_weight[k])
    return out


KERNEL_SOURCE = Path(__file__).with_name("quant_cpu.c")
KERNEL_FLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC", "-ffp-contract=off")


class Kernels(NamedTuple):
    """quant_cpu.c's functions (each documented there)."""

    quantize_rows: Callable[..., None]
    dequantize_rows: Callable[..., None]
    int4_decode: Callable[..., None]
    int4_rows: Callable[..., None]


@functools.cache
def _kernels() -> Kernels | None:
    """quant_cpu.c's kernels, built on first use; None where it cannot build."""
    from loraplex.cbuild import NativeUnavailable, load_library

    try:
        library = load_library(KERNEL_SOURCE, KERNEL_FLAGS, "the int8 and int4 kernels")
    except NativeUnavailable as e:
        log.warning("%s; int8 layers round and scale their rows, int4 layers decode, with torch ops (slower)", e)
        return None
    i64, ptr = ctypes.c_int64, ctypes.c_void_p
    quantize = library.loraplex_quantize_rows
    quantize.argtypes = [ptr, i64, i64, i64, ptr, ptr, ptr, i64, ptr, ptr, ptr]
    quantize.restype = None
    dequantize = library.loraplex_dequantize_rows
    dequantize.argtypes = [ptr, i64, i64, ptr, ptr, ptr, ptr, ptr, i64, ptr]
    dequantize.restype = None
    decode = library.loraplex_int4_decode
    decode.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr]
    decode.restype = None
    rows = library.loraplex_int4_linear_rows
    rows.argtypes = [ptr, i64, i64, ptr, ptr, i64, ptr, ptr, i64, ptr, ptr]
    rows.restype = None
    return Kernels(quantize, dequantize, decode, rows)


def calibration_ids(tokenizer: Any, vocab_size: int) -> list[int]:
    """Token ids of the calibration text (`loraplex/model/calibration.txt`), or, for a checkpoint without a
    tokenizer, a fixed pseudo-random sequence over its vocabulary."""
    if tokenizer is not None:
        text = resources.files("loraplex.model").joinpath("calibration.txt").read_text(encoding="utf-8")
        ids = list(tokenizer.encode(text))
        if len(ids) >= CALIBRATION_CHUNK:
            return ids[:CALIBRATION_TOKENS]
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, vocab_size, (CALIBRATION_TOKENS,), generator=generator).tolist()


def input_absmax(model: CausalLM, token_ids: list[int]) -> dict[torch.nn.Module, torch.Tensor]:
    """Per linear layer, the largest magnitude of each input channel while the model reads `token_ids` (one
    step, `run_prefill`, in sequences of CALIBRATION_CHUNK tokens)."""
    from loraplex.model.layers import PackedLinear
    from loraplex.model.prefill import run_prefill

    seen: dict[torch.nn.Module, torch.Tensor] = {}

    def record(module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> None:
        peak = args[0].detach().abs().amax(dim=0).float()
        seen[module] = torch.maximum(seen[module], peak) if module in seen else peak

    hooks = [m.register_forward_pre_hook(record) for m in model.modules() if isinstance(m, PackedLinear)]
    try:
        run_prefill(model, token_ids, sequence=CALIBRATION_CHUNK)
    finally:
        for hook in hooks:
            hook.remove()
    return seen


def calibrated(method: str, device: torch.device) -> bool:
    """Whether `method` calibrates on the whole float model (int8 on the CPU); every other method quantizes each
    layer alone (`quantize_linear`), so a load can quantize layers as they arrive."""
    return method == "int8" and device.type == "cpu"


def quantize_model(model: CausalLM, method: str, tokenizer: Any) -> None:
    """Quantize every linear layer of a loaded, finalized model in place (`method` of QUANTIZE)."""
    from loraplex.model.layers import PackedLinear

    if method == "none":
        return
    if method not in QUANTIZE:
        raise ValueError(f"quantize must be one of {', '.join(QUANTIZE)}, got {method!r}")
    start = time.perf_counter()
    if not calibrated(method, model.model.embed_tokens.weight.device):
        kept = [why for layer in model.modules() if isinstance(layer, PackedLinear)
                if (why := quantize_linear(layer, method, head=layer is model.lm_head)) is not None]
        log_quantized(method, time.perf_counter() - start, 0, kept)
        return
    peaks = input_absmax(model, calibration_ids(tokenizer, model.config.vocab_size))
    layers = [m for m in model.modules() if isinstance(m, PackedLinear)]
    for layer in layers:
        weight_t = layer.dense_t()
        x_max = peaks[layer].clamp(min=1e-5)
        w_max = weight_t.abs().amax(dim=1).float().clamp(min=1e-5)
        smooth = (x_max.pow(SMOOTH_ALPHA) / w_max.pow(1 - SMOOTH_ALPHA)).clamp(min=1e-5)  # [in]
        outliers = (x_max / smooth).topk(min(OUTLIER_CHANNELS, x_max.numel())).indices.sort().values
        layer.use_quantized(quantize_int8(weight_t, smooth, outliers))
    log.info("quantized %d linear layers to int8 (SmoothQuant, calibrated on %d tokens) in %.1f s", len(layers),
             CALIBRATION_TOKENS, time.perf_counter() - start)


def quantize_linear(layer: PackedLinear, method: str, own: Int4Weight | None = None, head: bool = False) -> str | None:
    """Quantize one finalized linear layer in place by a method without calibration (`int4`, `fp8`, and `int8`
    off the CPU: weight-only), to `own` where given (a pre-quantized checkpoint's 4-bit grid); None when done,
    else why the layer stays in float."""
    if method == "fp8":
        # CUDA's fp8 matmul needs both dimensions of the weight to be multiples of 16 (a vocabulary of 32,001
        # tokens is not).
        if layer.in_features % 16 or sum(layer.shard_sizes) % 16:
            return "a dimension not a multiple of 16"
        layer.use_quantized(quantize_fp8(layer.dense_t()))
        return None
    if method == "int8":
        if layer.in_features % 32:  # the Triton kernel's input step
            return "an input size not a multiple of 32"
        layer.use_quantized(quantize_int8_channel(layer.dense_t()))
        return None
    assert method == "int4", method
    if head:
        # The LM head stays in float, as GPTQ and AWQ leave it (llama.cpp's Q4_K files keep it in 6 bits): the
        # demo model's, 8-bit in its GGUF file, costs +4.5 % perplexity on 4 bits (docs/benchmarks.md).
        return "the LM head"
    if own is not None:
        layer.use_quantized(own)
    elif layer.in_features % INT4_GROUP:
        return f"an input size not a multiple of {INT4_GROUP}"
    else:
        layer.use_quantized(quantize_int4(layer.dense_t()))
    return None


def log_quantized(method: str, seconds: float, own: int, kept: list[str]) -> None:
    """The load's line about its quantized layers (`kept`: why each layer left in float stayed so)."""
    reasons = ", ".join(f"{n}: {why}" for why, n in collections.Counter(kept).items())
    log.info("quantized the linear layers to %s in %.1f s%s%s", method, seconds,
             f" ({own} on the checkpoint's own 4-bit grid)" if own else "",
             f"; {len(kept)} left in float ({reasons})" if kept else "")


def weight_bytes(model: torch.nn.Module) -> dict[str, int]:
    """Bytes of the model's weights by storage dtype (linear layers as stored for their backend)."""
    from loraplex.model.layers import PackedLinear

    totals: dict[str, int] = {}

    def add(t: torch.Tensor | None) -> None:
        if t is not None and t.numel():
            name = str(t.dtype).removeprefix("torch.")
            totals[name] = totals.get(name, 0) + t.numel() * t.element_size()

    for module in model.modules():
        if isinstance(module, PackedLinear):
            add(module.weight_t)
            if module.packed is not None:  # oneDNN's blocked layout: as many elements as the weight, and padding
                name = str(module.packed.dtype).removeprefix("torch.")
                size = module.in_features * sum(module.shard_sizes) * module.packed.element_size()
                totals[name] = totals.get(name, 0) + size
            if module.quantized is not None:
                for t in module.quantized.tensors():
                    add(t)
            add(module.bias)
        else:
            for p in module.parameters(recurse=False):
                add(p)
    return totals
