"""compressed-tensors checkpoints (llm-compressor's output, `quant_method: compressed-tensors`) decoded to float.

Weights only; each quantized linear is decoded by the format of its config group:

    pack-quantized    `weight_packed` int32 [out, ceil(in · bits / 32)]: each row's integers packed along the
                      input, lowest bits first, stored as q + 2^(bits-1); `weight_shape` int64 [out, in];
                      `weight_scale` [out, groups] (group), [out, 1] (channel) or one value (tensor);
                      asymmetric: `weight_zero_point` int32 [ceil(out · bits / 32), groups] packed along the
                      output the same way; `weight_g_idx` [in] when groups follow activation order.
    int-quantized,    `weight` int8 (int) or float8 (float), `weight_scale` (and `weight_zero_point`)
    float-quantized,  as above, unpacked.
    naive-quantized

    w[r, c] = (q[r, c] - zero_point[r, g]) · scale[r, g],  g = c // group_size (or g_idx[c])

The library writes and reads these with `compressed_tensors.compressors` (tests/model/ct_fixtures.py
writes checkpoints with it, and the test compares both decodings). A layer is quantized exactly when the
checkpoint has its `weight_scale`: in a float-quantized checkpoint a float layer's `weight` and a
quantized one's share their name. Static activation scales (`input_scale`, `input_zero_point`) are read
and dropped: loraplex multiplies in float (or requantizes with `--quantize int8`). A quantized KV cache,
other formats (sparse, nvfp4, mxfp4, marlin-24) and block strategies are refused at load.

With `--quantize int4`, a pack-quantized 4-bit layer whose groups are runs of a multiple of 32 inputs in order
(group strategy without `weight_g_idx`, or channel and tensor strategies over such an input size) keeps its own
integers, scales and zero points (`Format.int4`); other layers are rounded anew.
"""

from __future__ import annotations

import re
from typing import Any

import torch

from loraplex.model.errors import CheckpointError
from loraplex.model.prequantized import Format, expect, int4_grid, unpack_int32
from loraplex.model.quant import Int4Weight

SUPPORTED_FORMATS = ("pack-quantized", "int-quantized", "float-quantized", "naive-quantized")
STRATEGIES = ("tensor", "channel", "group")
QUANTIZED_DTYPES = (torch.int8, torch.float8_e4m3fn, torch.float8_e5m2)
PARTS = frozenset({"weight", "weight_packed", "weight_scale", "weight_zero_point", "weight_shape", "weight_g_idx",
                   "input_scale", "input_zero_point"})


def compressed_tensors_format(config: dict[str, Any]) -> Format:
    """The decoder for a compressed-tensors `quantization_config` (CheckpointError naming what it cannot decode)."""
    if config.get("kv_cache_scheme"):
        raise CheckpointError("quantization_config.kv_cache_scheme: a quantized KV cache is not supported")
    groups = config.get("config_groups") or {}
    if not isinstance(groups, dict) or not groups:
        raise CheckpointError("quantization_config.config_groups must name at least one group")
    schemes = []
    for name, group in groups.items():
        if not isinstance(group, dict) or not isinstance(group.get("weights") or {}, dict):
            raise CheckpointError(f"quantization_config.config_groups.{name} must be a mapping with a `weights` "
                                  "mapping")
        weights = group.get("weights")
        if not weights:
            continue  # an activation-only group: nothing stored to decode
        fmt = group.get("format") or config.get("format")
        if fmt not in SUPPORTED_FORMATS:
            raise CheckpointError(f"quantization_config format {fmt!r} (config_groups.{name}) is not supported; "
                                  f"supported: {', '.join(SUPPORTED_FORMATS)}")
        strategy = weights.get("strategy")
        if strategy not in STRATEGIES:
            raise CheckpointError(f"quantization_config.config_groups.{name}.weights.strategy {strategy!r} is not "
                                  f"supported; supported: {', '.join(STRATEGIES)}")
        bits, kind = weights.get("num_bits"), weights.get("type")
        if kind == "int" and bits not in ((4, 8) if fmt == "pack-quantized" else (8,)):
            raise CheckpointError(f"quantization_config.config_groups.{name}.weights.num_bits = {bits} is not "
                                  f"supported for {fmt} int weights")
        if kind == "float" and fmt == "pack-quantized":
            raise CheckpointError(f"quantization_config.config_groups.{name}: float weights are not pack-quantized "
                                  "(float-quantized stores them)")
        if kind == "float" and bits != 8:
            raise CheckpointError(f"quantization_config.config_groups.{name}.weights.num_bits = {bits} is not "
                                  "supported for float weights (8: fp8)")
        if kind not in ("int", "float"):
            raise CheckpointError(f"quantization_config.config_groups.{name}.weights.type {kind!r} is not supported")
        group_size = weights.get("group_size")
        if strategy == "group" and (not isinstance(group_size, int) or group_size < 1):
            raise CheckpointError(f"quantization_config.config_groups.{name}.weights.group_size must be >= 1 for "
                                  f"the group strategy, got {group_size!r}")
        schemes.append((name, list(group.get("targets") or []), fmt, int(bits), strategy, group_size,
                        bool(weights.get("symmetric", True))))

    def scheme_of(prefix: str) -> tuple[Any, ...]:
        # A target names a module (a suffix), a regex ("re:..."), or a class ("Linear": every layer here).
        specific = [s for s in schemes if any(_matches(prefix, t) for t in s[1] if t != "Linear")]
        generic = [s for s in schemes if "Linear" in s[1]]
        found = specific or generic or (schemes if len(schemes) == 1 else [])
        if not found:
            raise CheckpointError(f"{prefix}: no quantization_config group targets this layer")
        return found[0]

    def integers(prefix: str, parts: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """(q [out, in] (pack-quantized: the signed integers; else the stored values), zero [out, groups] or
        an empty tensor (symmetric), scale [out, groups] float32, each input's group [in]), checked."""
        name, _, fmt, bits, strategy, group_size, symmetric = scheme_of(prefix)
        if fmt == "pack-quantized":
            for part in ("weight_packed", "weight_shape"):
                if part not in parts:
                    raise CheckpointError(f"{prefix}: the pack-quantized layer lacks {part}")
            shape_t = parts["weight_shape"]
            if shape_t.dim() != 1 or shape_t.is_floating_point() or shape_t.numel() != 2:
                raise CheckpointError(f"{prefix}.weight_shape must be two integers [out, in], got {shape_t.dtype} "
                                      f"{tuple(shape_t.shape)}")
            shape = shape_t.tolist()
            if min(shape) < 1:
                raise CheckpointError(f"{prefix}.weight_shape must be [out, in], got {shape}")
            out_f, in_f = shape
            per_word = 32 // bits
            expect(prefix, "weight_packed", parts["weight_packed"], (out_f, -(-in_f // per_word)), (torch.int32,))
            q = unpack_int32(parts["weight_packed"], bits, 1)[:, :in_f] - (1 << (bits - 1))  # [out, in]
        else:
            if "weight" not in parts:
                raise CheckpointError(f"{prefix}: the {fmt} layer lacks weight")
            weight = parts["weight"]
            if weight.dim() != 2:
                raise CheckpointError(f"{prefix}.weight must be 2-D, got {tuple(weight.shape)}")
            out_f, in_f = weight.shape
            q = weight.to(torch.float32)
        groups = 1 if strategy != "group" else -(-in_f // group_size)
        scale = parts["weight_scale"].to(torch.float32)
        if strategy == "tensor":
            if scale.numel() != 1:
                raise CheckpointError(f"{prefix}.weight_scale must hold one value (tensor strategy), got "
                                      f"{tuple(scale.shape)}")
            scale = scale.reshape(1, 1).expand(out_f, 1)
        else:
            expect(prefix, "weight_scale", scale, (out_f, groups))
        zero = torch.empty(0)
        if not symmetric:
            if "weight_zero_point" not in parts:
                raise CheckpointError(f"{prefix}: the asymmetric layer (config_groups.{name}) lacks weight_zero_point")
            zp = parts["weight_zero_point"]
            if strategy == "tensor":  # one value, stored as it is (the library packs only per-row zero points)
                if zp.numel() != 1:
                    raise CheckpointError(f"{prefix}.weight_zero_point must hold one value (tensor strategy), got "
                                          f"{tuple(zp.shape)}")
                zero = zp.to(torch.float32).reshape(1, 1).expand(out_f, 1)
            elif fmt == "pack-quantized":
                expect(prefix, "weight_zero_point", zp, (-(-out_f // (32 // bits)), groups), (torch.int32,))
                zero = (unpack_int32(zp, bits, 0)[:out_f] - (1 << (bits - 1))).to(torch.float32)
            else:
                zero = zp.to(torch.float32)
                expect(prefix, "weight_zero_point", zero, (out_f, groups))
        if "weight_g_idx" in parts:
            if parts["weight_g_idx"].is_floating_point():
                raise CheckpointError(f"{prefix}.weight_g_idx must hold integers, got {parts['weight_g_idx'].dtype}")
            g = parts["weight_g_idx"].to(torch.int64)
            expect(prefix, "weight_g_idx", g, (in_f,))
            if g.numel() and (int(g.min()) < 0 or int(g.max()) >= groups):
                raise CheckpointError(f"{prefix}.weight_g_idx names groups outside [0, {groups})")
        elif strategy == "group":
            g = torch.arange(in_f) // group_size
        else:
            g = torch.zeros(in_f, dtype=torch.int64)
        return q, zero, scale, g

    def decode(prefix: str, parts: dict[str, torch.Tensor]) -> torch.Tensor:
        q, zero, scale, g = integers(prefix, parts)
        if zero.numel():
            q = q - zero[:, g]
        return (q.to(torch.float32) * scale[:, g]).contiguous()

    def int4(prefix: str, parts: dict[str, torch.Tensor]) -> Int4Weight | None:
        _, _, fmt, bits, *_ = scheme_of(prefix)
        if fmt != "pack-quantized" or bits != 4:
            return None
        q, zero, scale, g = integers(prefix, parts)
        if zero.numel() and not torch.equal(zero, zero.round()):  # a zero point off the integers: decoded, rounded anew
            return None
        # Signed integers q - zero on [-8, 7]: the same products as unsigned q + 8 less zeros zero + 8.
        zeros = (zero if zero.numel() else torch.zeros_like(scale)).to(torch.int64) + 8  # [out, groups]
        return int4_grid((q + 8).t(), zeros.t(), scale.t(), g)

    return Format("compressed-tensors", PARTS, frozenset({"weight_scale"}), decode,
                  is_part=lambda part, tensor: part != "weight" or tensor.dtype in QUANTIZED_DTYPES, int4=int4)


def _matches(prefix: str, target: str) -> bool:
    if target.startswith("re:"):
        return re.match(target[3:], prefix) is not None
    return prefix == target or prefix.endswith("." + target)
