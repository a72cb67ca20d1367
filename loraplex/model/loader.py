"""Checkpoint loading: HF folders (safetensors, or legacy .bin through weights_only) and GGUF files."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from loraplex.model.decoder import CausalLM, DecoderConfig
from loraplex.model.errors import CheckpointError
from loraplex.model.layers import Linear, PackedLinear, RMSNorm, deferred_weights
from loraplex.model.prequantized import checkpoint_format, dequantizing
from loraplex.model.quant import Int4Weight, calibrated, log_quantized, quantize_linear, quantize_model
from loraplex.runtime import release_freed_memory

# Checkpoint projection name → (our packed module, shard index).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
# Our packed module → its checkpoint projections, in shard order.
SHARD_NAMES = {packed: tuple(name for name, (p, _) in sorted(PACKED_MODULES.items(), key=lambda kv: kv[1][1])
                             if p == packed) for packed, _ in PACKED_MODULES.values()}
IGNORED_SUFFIXES = ("rotary_emb.inv_freq",)


@dataclass
class Checkpoint:
    hf_config: Any
    tensors: Iterator[tuple[str, torch.Tensor]]
    tokenizer: PreTrainedTokenizerBase | None
    eos_token_ids: tuple[int, ...]
    name: str
    int4: dict[str, Int4Weight] = field(default_factory=dict)
    """A pre-quantized checkpoint's 4-bit layers as Int4Weight, by their `weight`'s name, filled while
    `tensors` is read (`open_checkpoint(keep_int4=True)`)."""


def open_checkpoint(path: Path, keep_int4: bool = False) -> Checkpoint:
    """Open an HF checkpoint folder or a .gguf file (dequantized to float at load). With `keep_int4`, a
    pre-quantized checkpoint's 4-bit layers are also kept as they are stored (`Checkpoint.int4`)."""
    if path.is_file() and path.suffix == ".gguf":
        from loraplex.model.gguf import read_gguf

        gguf = read_gguf(path)
        gguf_eos = _as_tuple(getattr(gguf.config, "eos_token_id", None)) or _as_tuple(gguf.tokenizer.eos_token_id)
        return Checkpoint(gguf.config, iter(gguf.tensors.items()), gguf.tokenizer, gguf_eos, path.name)
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{path} is not a model checkpoint: it has no config.json")
    hf_config = AutoConfig.from_pretrained(path)
    tokenizer = _load_tokenizer(path)
    eos: tuple[int, ...] = ()
    if (path / "generation_config.json").is_file():
        eos = _as_tuple(GenerationConfig.from_pretrained(path).eos_token_id)
    eos = eos or _as_tuple(getattr(hf_config, "eos_token_id", None))
    if not eos and tokenizer is not None:
        eos = _as_tuple(tokenizer.eos_token_id)
    tensors = _iter_tensors(path)
    quantized = checkpoint_format(hf_config)  # a quantization_config it cannot decode fails here, before any tensor
    int4: dict[str, Int4Weight] = {}
    if quantized is not None:
        tensors = dequantizing(tensors, quantized, int4 if keep_int4 else None)
    return Checkpoint(hf_config, tensors, tokenizer, eos, path.name, int4)


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list | tuple) else (int(value),)


def _load_tokenizer(path: Path) -> PreTrainedTokenizerBase | None:
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any((path / n).is_file() for n in names):
        return None
    return AutoTokenizer.from_pretrained(path)


def _iter_tensors(path: Path) -> Iterator[tuple[str, torch.Tensor]]:
    files = sorted(path.glob("*.safetensors"))
    if files:
        for file in files:
            with safe_open(str(file), framework="pt") as f:
                for name in f.keys():  # noqa: SIM118 - safe_open is not a mapping
                    yield name, f.get_tensor(name)
        return
    bins = sorted(path.glob("pytorch_model*.bin"))
    if not bins:
        raise CheckpointError(f"{path} has no *.safetensors or pytorch_model*.bin weights")
    for file in bins:
        yield from torch.load(file, map_location="cpu", weights_only=True).items()


def build_model(ckpt: Checkpoint, dtype: torch.dtype, device: torch.device, max_positions: int,
                linear_backend: str = "aten", quantize: str = "none") -> CausalLM:
    """Construct the decoder for `ckpt` and fill every parameter from its tensors (strictly: a missing
    or unexpected tensor is an error naming it), its linear layers stored for `linear_backend` (`aten`
    or `onednn`, as `loraplex.model.gemm.resolve` decides), or quantized (`quantize`, loraplex.model.quant).

    `int4`, `fp8` and `int8` off the CPU (weight-only) need no calibration: each linear layer is quantized as
    soon as its last tensor arrives and its float weight dropped, so the load never holds the whole model's
    linears in float (a layer's float weight is allocated by its first tensor, `deferred_weights`). `int8` on
    the CPU calibrates on the float model first."""
    cfg = DecoderConfig.from_hf(ckpt.hf_config)
    streamed = quantize != "none" and not calibrated(quantize, device)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), deferred_weights() if streamed else contextlib.nullcontext():
            model = CausalLM(cfg, ckpt.hf_config, max_positions)
    finally:
        torch.set_default_dtype(previous)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {name: set() for name in params}
    start, kept, own = time.perf_counter(), [], 0

    def complete(module: PackedLinear, target: str) -> None:
        """Quantize a layer whose tensors have all arrived (`streamed`)."""
        nonlocal own
        module.finalize("aten")
        grid = _own_int4(ckpt.int4, target, device) if quantize == "int4" else None
        why = quantize_linear(module, quantize, grid, head=module is model.lm_head)
        own += grid is not None and why is None
        if why is not None:
            kept.append(why)
        if device.type == "cpu":
            release_freed_memory()

    for name, tensor in ckpt.tensors:
        if name.endswith(IGNORED_SUFFIXES) or (name == "lm_head.weight" and cfg.tie_embeddings):
            continue
        target, shard = _map_name(name)
        if target not in params:
            raise CheckpointError(f"unexpected tensor {name!r} in checkpoint {ckpt.name}")
        module = modules[target.rpartition(".")[0]]
        param = params[target]
        tensor = tensor.to(device=device, dtype=param.dtype)
        if isinstance(module, PackedLinear):
            if module.quantized is not None or module.weight_t is not None:
                raise CheckpointError(f"{name} appears twice in checkpoint {ckpt.name}")
            try:
                module.load_shard(param, tensor, shard)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            loaded[target] |= set(range(len(module.shard_sizes))) if shard is None else {shard}
            layer = target.rpartition(".")[0]
            if streamed and _all_loaded(loaded, layer, module):
                complete(module, layer)
        else:
            if param.shape != tensor.shape:
                raise CheckpointError(f"{name}: shape {tuple(tensor.shape)} != expected {tuple(param.shape)}")
            param.data.copy_(tensor)
            loaded[target].add(0)
    missing = sorted(t for t, shards in loaded.items() if len(shards) < _num_shards(modules[t.rpartition(".")[0]]))
    if missing:
        raise CheckpointError(f"checkpoint {ckpt.name} lacks tensors for: {', '.join(missing[:8])}"
                              + (f" … ({len(missing)} in all)" if len(missing) > 8 else ""))
    if (linear_backend == "onednn" or quantize != "none") and model.lm_head is None:
        # A tied head becomes a linear of its own, packed (or quantized) from the embedding's weights (the
        # embedding keeps its plain table for lookups): vocab × hidden more memory, for a ~3x faster head on CPU.
        model.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, False)
        model.lm_head.weight.data = model.model.embed_tokens.weight.data
        if streamed:
            complete(model.lm_head, "lm_head")
    for module in model.modules():
        if isinstance(module, PackedLinear) and not streamed:
            # Layers to quantize keep a plain float copy until then (the calibration runs on it).
            module.finalize(linear_backend if quantize == "none" else "aten")
        elif isinstance(module, RMSNorm):
            module.finalize()
    if streamed:
        log_quantized(quantize, time.perf_counter() - start, own, kept)
    else:
        quantize_model(model, quantize, ckpt.tokenizer)
    return model.eval()


def _all_loaded(loaded: dict[str, set[int]], layer: str, module: PackedLinear) -> bool:
    """Whether every shard of the linear `layer`'s weight (and bias) has arrived."""
    shards = len(module.shard_sizes)
    return len(loaded[f"{layer}.weight"]) == shards and (module.bias is None or len(loaded[f"{layer}.bias"]) == shards)


def _own_int4(int4: dict[str, Int4Weight], layer: str, device: torch.device) -> Int4Weight | None:
    """The checkpoint's own 4-bit grid for the linear `layer` (its checkpoint weights taken out of `int4`): a
    packed linear's shards (q, k and v; gate and up) stacked along the output, where every shard has one and
    their groups agree; None where the layer has none."""
    parent, _, leaf = layer.rpartition(".")
    whole = int4.pop(f"{layer}.weight", None)  # a plain linear, or a fused checkpoint's packed one
    shards = [int4.pop(f"{parent}.{name}.weight", None) for name in SHARD_NAMES.get(leaf, ())]
    found = [g for g in shards if g is not None]
    grids = [whole] if whole is not None else found if len(found) == len(shards) else []
    if not grids or len({g.group for g in grids}) != 1:
        return None
    return Int4Weight(torch.cat([p.packed for p in grids]).to(device), torch.cat([p.scale for p in grids]).to(device),
                      torch.cat([p.offset for p in grids]).to(device), grids[0].group)


def _num_shards(module: Any) -> int:
    return len(module.shard_sizes) if isinstance(module, PackedLinear) else 1


def _map_name(name: str) -> tuple[str, int | None]:
    module_name, _, attr = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    if leaf in PACKED_MODULES:
        packed, shard = PACKED_MODULES[leaf]
        return f"{parent}.{packed}.{attr}", shard
    return name, None
