"""Pre-quantized checkpoints: GPTQ, AWQ and compressed-tensors linears decoded to float weights at load (and
4-bit ones also kept as they are for `--quantize int4`).

A checkpoint whose `config.json` carries a `quantization_config` stores each quantized linear layer as
packed integers and scales instead of a `weight`. `dequantizing` reads them from the checkpoint's tensor
stream and yields each layer's float `weight` `[out, in]` in their place, so the rest of the loader (and
`--quantize int8` after it) sees a float checkpoint; everything else passes through. The formats:

    gptq                AutoGPTQ / GPTQModel: `qweight` int32 [in / (32/bits), out] packed along the input,
                        `qzeros` int32 [groups, out / (32/bits)] packed along the output, `scales`
                        [groups, out], `g_idx` int32 [in] (each input row's group; desc_act reorders them).
                        w[i, o] = scales[g, o] · (q[i, o] - z[g, o]) with g = g_idx[i]; the `gptq`
                        checkpoint format stores z - 1 (AutoGPTQ's convention), `gptq_v2` stores z.
                        Bits 2, 4, 8 (3-bit packing crosses words: refused).
    awq                 AutoAWQ's GEMM layout: `qweight` int32 [in, out / 8] and `qzeros` int32
                        [groups, out / 8] packed along the output in the order 0 2 4 6 1 3 5 7, `scales`
                        [groups, out]; w[i, o] = (q[i, o] - z[g, o]) · scales[g, o], g = i // group_size.
    compressed-tensors  see loraplex/model/compressed_tensors.py (llm-compressor's formats).

With `--quantize int4` the loader also asks for each 4-bit GPTQ / AWQ / compressed-tensors layer as an Int4Weight (`Format.int4`,
`dequantizing(int4=...)`): its own integers, scales and zeros, where its groups are runs of a multiple of 32
inputs in order; the model then serves those instead of rounding the decoded weight anew.

The packed tensors are kept until the stream ends (a layer's parts may lie in different shards, in any
order), then decoded one layer at a time: they are a fraction of the float weights' size. A missing or
misshapen part, an unknown method or an unsupported setting is a CheckpointError that names the tensor or
the `quantization_config` field and its value; nothing is loaded wrong.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch

from loraplex.model.errors import CheckpointError
from loraplex.model.quant import Int4Weight

METHODS = ("gptq", "awq", "compressed-tensors")
AWQ_REVERSE_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)
"""Where AutoAWQ's packing order (0 2 4 6 1 3 5 7) put each of eight consecutive output columns."""


@dataclass(frozen=True)
class Format:
    """One checkpoint's quantization: which tensor names are parts of a quantized layer, and its decoder."""

    method: str
    parts: frozenset[str]
    required: frozenset[str]
    decode: Callable[[str, dict[str, torch.Tensor]], torch.Tensor]  # (layer prefix, parts) -> weight [out, in]
    is_part: Callable[[str, torch.Tensor], bool] | None = None  # for names shared with float layers ("weight")
    int4: Callable[[str, dict[str, torch.Tensor]], Int4Weight | None] | None = None
    """(layer prefix, parts) -> the layer's own 4-bit grid as an Int4Weight, where it is one (`--quantize int4`
    keeps it instead of rounding the decoded weight anew); None where it is not (other bits, act-order)."""

    def holds(self, part: str, tensor: torch.Tensor) -> bool:
        if part not in self.parts:
            return False
        return self.is_part is None or self.is_part(part, tensor)


def checkpoint_format(hf_config: Any) -> Format | None:
    """The quantization of a checkpoint from its config's `quantization_config`; None for a float one."""
    config = getattr(hf_config, "quantization_config", None)
    if config is None:
        return None
    if not isinstance(config, dict):
        config = config.to_dict() if hasattr(config, "to_dict") else vars(config)
    method = config.get("quant_method")
    if method == "gptq":
        return _gptq_format(config)
    if method == "awq":
        return _awq_format(config)
    if method == "compressed-tensors":
        from loraplex.model.compressed_tensors import compressed_tensors_format

        return compressed_tensors_format(config)
    raise CheckpointError(f"quantization_config.quant_method {method!r} is not supported; "
                          f"supported: {', '.join(METHODS)}")


def dequantizing(tensors: Iterator[tuple[str, torch.Tensor]], fmt: Format,
                 int4: dict[str, Int4Weight] | None = None) -> Iterator[tuple[str, torch.Tensor]]:
    """`tensors` with each quantized layer's parts replaced by its float `weight` (yielded after the rest).
    With `int4`, each layer whose integers are 4-bit groups Int4Weight holds (groups of a multiple of 32
    inputs in order) is also put there as one, under the name of its `weight`."""
    layers: dict[str, dict[str, torch.Tensor]] = {}
    passed: set[str] = set()  # the float weights that went by, to refuse a layer stored both ways
    for name, tensor in tensors:
        prefix, _, part = name.rpartition(".")
        if fmt.holds(part, tensor):
            layer = layers.setdefault(prefix, {})
            if part in layer:
                raise CheckpointError(f"{name} appears twice in the checkpoint")
            layer[part] = tensor
        else:
            if part == "weight":
                passed.add(prefix)
            yield name, tensor
    for prefix, parts in layers.items():
        missing = sorted(fmt.required - parts.keys())
        if missing:
            raise CheckpointError(f"{prefix}: the {fmt.method} layer lacks {', '.join(missing)} "
                                  f"(has {', '.join(sorted(parts))})")
        if prefix in passed:
            raise CheckpointError(f"{prefix} is stored both as a float weight and as {fmt.method} tensors")
        for part, tensor in parts.items():
            if tensor.is_floating_point() and not torch.isfinite(tensor.float()).all():
                raise CheckpointError(f"{prefix}.{part} holds NaN or infinite values")
        weight = fmt.decode(prefix, parts)
        if int4 is not None and fmt.int4 is not None:
            grid = fmt.int4(prefix, parts)
            if grid is not None:
                int4[f"{prefix}.weight"] = grid
        yield f"{prefix}.weight", weight


def _int_field(config: dict[str, Any], names: tuple[str, ...], allowed: tuple[int, ...] | None = None,
               default: int | None = None) -> int:
    name = next((n for n in names if n in config), names[0])
    value = config.get(name, default)
    if isinstance(value, bool) or not isinstance(value, int):
        raise CheckpointError(f"quantization_config.{name} must be an integer, got {value!r}")
    if allowed is not None and value not in allowed:
        raise CheckpointError(f"quantization_config.{name} = {value} is not supported; "
                              f"supported: {', '.join(map(str, allowed))}")
    return value


def _group_size(config: dict[str, Any], names: tuple[str, ...]) -> int:
    size = _int_field(config, names, default=-1)
    if size != -1 and not 1 <= size <= 1 << 24:
        raise CheckpointError(f"quantization_config.{names[0]} must be -1 or in [1, 2^24], got {size}")
    return size


def unpack_int32(packed: torch.Tensor, bits: int, dim: int) -> torch.Tensor:
    """int32 words holding 32/bits unsigned values each, lowest bits first, unpacked along `dim` (int32)."""
    per_word = 32 // bits
    shifts = torch.arange(0, 32, bits, dtype=torch.int32)  # [per_word]
    # int32 throughout (half the memory of int64 for a large layer): an arithmetic shift of a negative
    # word drags its sign bit down, and the mask cuts it off again.
    words = packed.to(torch.int32)
    values = (words.unsqueeze(dim + 1) >> shifts.view([-1] + [1] * (packed.dim() - dim - 1))) & ((1 << bits) - 1)
    shape = list(packed.shape)
    shape[dim] *= per_word
    return values.reshape(shape)


def expect(prefix: str, part: str, tensor: torch.Tensor, shape: tuple[int, ...],
            dtypes: tuple[torch.dtype, ...] | None = None) -> None:
    if tuple(tensor.shape) != shape:
        raise CheckpointError(f"{prefix}.{part} has shape {tuple(tensor.shape)}, expected {shape}")
    if dtypes is not None and tensor.dtype not in dtypes:
        raise CheckpointError(f"{prefix}.{part} is {tensor.dtype}, expected "
                              f"{' or '.join(str(d) for d in dtypes)}")


def _gptq_format(config: dict[str, Any]) -> Format:
    bits = _int_field(config, ("bits",), (2, 4, 8))
    group_size = _group_size(config, ("group_size",))
    desc_act = bool(config.get("desc_act", False))
    checkpoint = config.get("checkpoint_format", "gptq")
    if checkpoint not in ("gptq", "gptq_v2"):
        raise CheckpointError(f"quantization_config.checkpoint_format {checkpoint!r} is not supported; "
                              "supported: gptq, gptq_v2")
    zero_offset = 1 if checkpoint == "gptq" else 0

    def unpack(prefix: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(q [in, out], zeros [groups, out], scales [groups, out] float32, g_idx [in]), checked."""
        per_word = 32 // bits
        qweight = parts["qweight"]
        if qweight.dim() != 2 or qweight.dtype != torch.int32:
            raise CheckpointError(f"{prefix}.qweight must be a 2-D int32 tensor, got {qweight.dtype} "
                                  f"{tuple(qweight.shape)}")
        in_features, out_features = qweight.shape[0] * per_word, qweight.shape[1]
        if out_features % per_word:
            raise CheckpointError(f"{prefix}: {out_features} output features do not pack into "
                                  f"{bits}-bit zeros")
        if "g_idx" in parts:
            if parts["g_idx"].is_floating_point():
                raise CheckpointError(f"{prefix}.g_idx must hold integers, got {parts['g_idx'].dtype}")
            g_idx = parts["g_idx"].to(torch.int64)
            expect(prefix, "g_idx", g_idx, (in_features,))
        elif group_size == -1:
            g_idx = torch.zeros(in_features, dtype=torch.int64)
        else:
            g_idx = torch.arange(in_features) // group_size
        groups = parts["scales"].shape[0] if parts["scales"].dim() == 2 else -1
        expected_groups = 1 if group_size == -1 else -(-in_features // group_size)
        if groups != expected_groups:
            raise CheckpointError(f"{prefix}.scales has {groups} groups, expected {expected_groups} "
                                  f"({in_features} inputs in groups of {group_size})")
        expect(prefix, "scales", parts["scales"], (groups, out_features))
        expect(prefix, "qzeros", parts["qzeros"], (groups, out_features // per_word), (torch.int32,))
        if g_idx.numel() and (int(g_idx.min()) < 0 or int(g_idx.max()) >= groups):
            raise CheckpointError(f"{prefix}.g_idx names groups outside [0, {groups})")
        q = unpack_int32(qweight, bits, 0)  # [in, out]
        zeros = unpack_int32(parts["qzeros"], bits, 1) + zero_offset  # [groups, out]
        return q, zeros, parts["scales"].float(), g_idx

    def decode(prefix: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        q, zeros, scales, g_idx = unpack(prefix, parts)
        weight = scales[g_idx] * (q - zeros[g_idx]).float()  # [in, out]
        return weight.t().contiguous()

    def int4(prefix: str, parts: dict[str, torch.Tensor]) -> Int4Weight | None:
        q, zeros, scales, g_idx = unpack(prefix, parts)
        return int4_grid(q, zeros, scales, g_idx) if bits == 4 else None

    required = {"qweight", "qzeros", "scales"} | ({"g_idx"} if desc_act else set())
    return Format("gptq", frozenset({"qweight", "qzeros", "scales", "g_idx"}), frozenset(required), decode,
                  int4=int4)


def _awq_format(config: dict[str, Any]) -> Format:
    _int_field(config, ("bits", "w_bit"), (4,))
    group_size = _group_size(config, ("group_size", "q_group_size"))
    version = str(config.get("version", "gemm")).lower()
    if version != "gemm":
        raise CheckpointError(f"quantization_config.version {config.get('version')!r} is not supported; "
                              "supported: gemm (AutoAWQ's default packing)")
    if config.get("zero_point", True) is not True:
        raise CheckpointError(f"quantization_config.zero_point {config.get('zero_point')!r} is not "
                              "supported; supported: true")
    order = torch.tensor(AWQ_REVERSE_ORDER)

    def unpack(packed: torch.Tensor) -> torch.Tensor:
        rows, words = packed.shape
        values = unpack_int32(packed, 4, 1).view(rows, words, 8)
        return values[:, :, order].reshape(rows, words * 8)

    def integers(prefix: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(q [in, out], zeros [groups, out], scales [groups, out] float32, each input's group [in]), checked."""
        qweight = parts["qweight"]
        if qweight.dim() != 2 or qweight.dtype != torch.int32:
            raise CheckpointError(f"{prefix}.qweight must be a 2-D int32 tensor, got {qweight.dtype} "
                                  f"{tuple(qweight.shape)}")
        in_features, out_features = qweight.shape[0], qweight.shape[1] * 8
        groups = 1 if group_size == -1 else -(-in_features // group_size)
        expect(prefix, "qzeros", parts["qzeros"], (groups, out_features // 8), (torch.int32,))
        expect(prefix, "scales", parts["scales"], (groups, out_features))
        g = torch.zeros(in_features, dtype=torch.int64) if group_size == -1 else torch.arange(in_features) // group_size
        return unpack(qweight), unpack(parts["qzeros"]), parts["scales"].float(), g

    def decode(prefix: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        q, zeros, scales, g = integers(prefix, parts)
        return ((q - zeros[g]).float() * scales[g]).t().contiguous()

    def int4(prefix: str, parts: dict[str, torch.Tensor]) -> Int4Weight | None:
        return int4_grid(*integers(prefix, parts))

    return Format("awq", frozenset({"qweight", "qzeros", "scales"}), frozenset({"qweight", "qzeros", "scales"}), decode,
                  int4=int4)


def int4_grid(q: torch.Tensor, zeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor) -> Int4Weight | None:
    """The Int4Weight of a layer whose weight is scales[g] · (q - zeros[g]), g = g_idx[input] (q [in, out] 4-bit,
    zeros [groups, out], scales [groups, out]): its own grid, offset −zeros · scales; None unless the
    groups are runs of a multiple of 32 inputs in order (act-order permutes them; Int4Weight decodes 32 at once)."""
    in_features, groups = q.shape[0], scales.shape[0]
    group = in_features // groups
    if (in_features % groups or group % 32 or not torch.equal(g_idx, torch.arange(in_features) // group)
            or int(zeros.min()) < 0 or int(zeros.max()) > 15):  # AutoGPTQ's stored zero 15 means 16
        return None
    q8 = q.t().to(torch.uint8)  # [out, in]
    scale = scales.t().contiguous()
    return Int4Weight((q8[:, 0::2] | (q8[:, 1::2] << 4)).contiguous(), scale, (-zeros.t().float() * scale).contiguous(),
                      group)
