"""Tiny compressed-tensors checkpoints written by the real ``compressed-tensors`` library.

These helpers let loader tests run against the library's own on-disk output instead
of tensors we packed ourselves:

* :func:`write_compressed_checkpoint` quantizes every decoder-layer ``nn.Linear`` of a
  float Hugging Face Llama checkpoint with the library's quantization lifecycle
  (``apply_quantization_config`` -> ``calculate_qparams`` -> ``ModelCompressor``) and
  saves it the way llm-compressor does (``save_pretrained`` + ``update_config``).
* :func:`library_dequantized_weights` decodes such a checkpoint with the library's
  own compressor ``decompress`` classmethods (the model-free path used by
  ``compressed_tensors.entrypoints.convert.CompressedTensorsDequantizer``), which is
  the independent reference our decoder is compared against.

Written against compressed-tensors 0.20.1. Scales are computed with a plain min/max
"observer" (what llm-compressor's default ``minmax`` observer does for weights), but
the scale/zero-point arithmetic itself is the library's ``calculate_qparams``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from compressed_tensors.compressors import BaseCompressor, ModelCompressor
from compressed_tensors.config import CompressionFormat
from compressed_tensors.offload import update_offload_parameter
from compressed_tensors.quantization import (
    QuantizationArgs,
    QuantizationConfig,
    QuantizationScheme,
    QuantizationStatus,
    QuantizationStrategy,
    QuantizationType,
    apply_quantization_config,
)
from compressed_tensors.quantization.utils import calculate_qparams, is_module_quantized
from compressed_tensors.utils.match import match_name
from safetensors.torch import load_file

__all__ = [
    "CT_SCHEMES",
    "write_compressed_checkpoint",
    "library_dequantized_weights",
]

# Every Linear except lm_head -> in a Llama that is exactly the decoder-layer
# q/k/v/o/gate/up/down projections. This mirrors the usual llm-compressor recipe
# (targets=["Linear"], ignore=["lm_head"]); embeddings are never matched by "Linear".
_TARGETS = ["Linear"]
_IGNORE = ["lm_head"]


def _weights(bits: int, kind: QuantizationType, symmetric: bool, strategy: QuantizationStrategy,
             group_size: int | None = None) -> dict:
    args: dict = dict(num_bits=bits, type=kind, symmetric=symmetric, strategy=strategy)
    if group_size is not None:
        args["group_size"] = group_size
    return args


_INT, _FLOAT = QuantizationType.INT, QuantizationType.FLOAT
_GROUP, _CHANNEL, _TENSOR = QuantizationStrategy.GROUP, QuantizationStrategy.CHANNEL, QuantizationStrategy.TENSOR

# scheme name -> (weight QuantizationArgs kwargs, compression format)
CT_SCHEMES: dict[str, tuple[dict, CompressionFormat]] = {
    "w4a16-group": (_weights(4, _INT, True, _GROUP, 32), CompressionFormat.pack_quantized),
    "w4a16-asym": (_weights(4, _INT, False, _GROUP, 32), CompressionFormat.pack_quantized),
    "w8a16-channel": (_weights(8, _INT, True, _CHANNEL), CompressionFormat.pack_quantized),
    "w4a16-tensor-asym": (_weights(4, _INT, False, _TENSOR), CompressionFormat.pack_quantized),
    "int8-channel-asym": (_weights(8, _INT, False, _CHANNEL), CompressionFormat.int_quantized),
    "fp8-channel": (_weights(8, _FLOAT, True, _CHANNEL), CompressionFormat.float_quantized),
}


def _quantization_config(scheme: str) -> QuantizationConfig:
    if scheme not in CT_SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; expected one of {list(CT_SCHEMES)}")
    weight_kwargs, fmt = CT_SCHEMES[scheme]
    qscheme = QuantizationScheme(
        targets=list(_TARGETS),
        weights=QuantizationArgs(dynamic=False, **weight_kwargs),
        # Set explicitly: the library would infer "naive-quantized" for weight-only
        # fp8 (its float-quantized matcher requires input activations).
        format=fmt,
    )
    return QuantizationConfig(
        config_groups={"group_0": qscheme},
        ignore=list(_IGNORE),
        quantization_status=QuantizationStatus.INITIALIZED,
    )


@torch.no_grad()
def _calibrate_weight(module: torch.nn.Module, widen: float) -> None:
    """Min/max weight observer (the range times ``widen``) + the library's ``calculate_qparams``."""
    args: QuantizationArgs = getattr(module, "quantization_scheme").weights  # noqa: B009
    weight = module.get_parameter("weight")
    if args.strategy == QuantizationStrategy.CHANNEL:
        min_vals = weight.amin(dim=-1, keepdim=True)  # [out, 1]
        max_vals = weight.amax(dim=-1, keepdim=True)
    elif args.strategy == QuantizationStrategy.GROUP:
        grouped = weight.unflatten(-1, (-1, args.group_size))  # [out, G, gs]
        min_vals = grouped.amin(dim=-1)  # [out, G]
        max_vals = grouped.amax(dim=-1)
    elif args.strategy == QuantizationStrategy.TENSOR:
        min_vals, max_vals = torch.aminmax(weight)
    else:  # pragma: no cover - not used by CT_SCHEMES
        raise NotImplementedError(args.strategy)

    scale, zero_point = calculate_qparams(min_vals * widen, max_vals * widen, args)
    update_offload_parameter(module, "weight_scale", scale.to(module.get_parameter("weight_scale").dtype))
    if hasattr(module, "weight_zero_point"):
        zp_dtype = module.get_parameter("weight_zero_point").dtype
        update_offload_parameter(module, "weight_zero_point", zero_point.to(zp_dtype))
    module.quantization_status = QuantizationStatus.FROZEN


def write_compressed_checkpoint(
    model_dir: Path,
    out_dir: Path,
    scheme: str,
    *,
    dtype: torch.dtype = torch.float32,
    widen: float = 1.0,
) -> Path:
    """Quantize + compress the checkpoint in ``model_dir`` with compressed-tensors.

    ``scheme`` is one of :data:`CT_SCHEMES`. ``dtype`` is the dtype the model is
    loaded in before quantizing; the library stores ``weight_scale`` in that dtype
    (float32 by default; pass ``torch.bfloat16`` to mimic real bf16 checkpoints). ``widen`` > 1 calibrates on
    a range wider than the weights', so no group's integers span its grid from end to end.

    Writes ``model.safetensors`` (compressed tensors), ``config.json`` with the
    library-written ``quantization_config`` and ``generation_config.json`` to
    ``out_dir`` and returns ``out_dir``. Deterministic: no randomness is involved
    beyond the input weights (the seed is fixed anyway).
    """
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model_dir, out_dir = Path(model_dir), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model.eval()

    # 1. attach the scheme + empty qparams to every targeted Linear
    apply_quantization_config(model, _quantization_config(scheme), show_progress=False)

    # 2. "calibrate": weight-only, so min/max of the weights is all that is needed
    quantized = [m for m in model.modules() if is_module_quantized(m)]
    if not quantized:  # pragma: no cover - sanity
        raise RuntimeError("no module was quantized")
    for module in quantized:
        _calibrate_weight(module, widen)

    # 3. compress in memory and save exactly like llm-compressor's save wrapper
    compressor = ModelCompressor.from_pretrained_model(model)
    compressor.compress_model(model)
    model.save_pretrained(out_dir)
    compressor.update_config(str(out_dir))
    return out_dir


def _load_checkpoint_tensors(out_dir: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(Path(out_dir).glob("*.safetensors")):
        tensors.update(load_file(str(path)))
    return tensors


def library_dequantized_weights(out_dir: Path) -> dict[str, torch.Tensor]:
    """Dequantize every quantized Linear in ``out_dir`` with the library's decompressor.

    Returns ``{"model.layers.0.self_attn.q_proj.weight": float32 [out, in], ...}``.
    Uses the compressor registered for each config group's ``format`` and its
    ``decompress`` classmethod on the per-module state dict read from safetensors.
    """
    out_dir = Path(out_dir)
    config = json.loads((out_dir / "config.json").read_text())
    qconfig = QuantizationConfig.model_validate(config["quantization_config"])
    tensors = _load_checkpoint_tensors(out_dir)

    # quantized modules are exactly those that carry a weight_scale
    module_names = sorted(n[: -len(".weight_scale")] for n in tensors if n.endswith(".weight_scale"))

    result: dict[str, torch.Tensor] = {}
    for module_name in module_names:
        if any(match_name(module_name, ign) for ign in qconfig.ignore or []):
            continue
        scheme = next(
            (
                s
                for s in qconfig.config_groups.values()
                if "Linear" in s.targets or any(match_name(module_name, t) for t in s.targets)
            ),
            None,
        )
        if scheme is None:
            continue
        fmt = scheme.format or qconfig.format
        compressor = BaseCompressor.get_value_from_registry(CompressionFormat(fmt).value)
        state_dict = {p: tensors[f"{module_name}.{p}"] for p in compressor.compression_param_names(scheme)}
        weight = compressor.decompress(state_dict, scheme)["weight"]
        result[f"{module_name}.weight"] = weight.to(torch.float32)
    return result
