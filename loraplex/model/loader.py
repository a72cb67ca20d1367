"""Checkpoint loading: HF folders (safetensors, or legacy .bin through weights_only) and GGUF files."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from transformers import AutoConfig, AutoTokenizer, GenerationConfig, PreTrainedTokenizerBase

from loraplex.model.decoder import CausalLM, DecoderConfig
from loraplex.model.errors import CheckpointError
from loraplex.model.layers import Linear, PackedLinear, RMSNorm
from loraplex.model.prequantized import checkpoint_format, dequantizing
from loraplex.model.quant import Int4Weight, quantize_model

# Checkpoint projection name → (our packed module, shard index).
PACKED_MODULES = {
    "q_proj": ("qkv_proj", 0),
    "k_proj": ("qkv_proj", 1),
    "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}
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
    or `onednn`, as `loraplex.model.gemm.resolve` decides), or quantized (`quantize`, loraplex.model.quant)."""
    cfg = DecoderConfig.from_hf(ckpt.hf_config)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = CausalLM(cfg, ckpt.hf_config, max_positions)
    finally:
        torch.set_default_dtype(previous)
    modules = dict(model.named_modules())
    params = dict(model.named_parameters())
    loaded: dict[str, set[int]] = {name: set() for name in params}
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
            try:
                module.load_shard(param, tensor, shard)
            except ValueError as e:
                raise CheckpointError(f"{name}: {e}") from None
            loaded[target] |= set(range(len(module.shard_sizes))) if shard is None else {shard}
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
    for module in model.modules():
        if isinstance(module, PackedLinear):
            # Layers to quantize keep a plain float copy until then (the calibration runs on it).
            module.finalize(linear_backend if quantize == "none" else "aten")
        elif isinstance(module, RMSNorm):
            module.finalize()
    quantize_model(model, quantize, ckpt.tokenizer, _int4_layers(ckpt.int4, modules, device))
    return model.eval()


def _int4_layers(int4: dict[str, Int4Weight], modules: dict[str, Any],
                 device: torch.device) -> dict[PackedLinear, Int4Weight]:
    """The checkpoint's own 4-bit layers (by weight name) as the model's linears: a packed linear's shards
    (q, k and v; gate and up) stacked along the output, where every shard has one and their groups agree."""
    shards: dict[PackedLinear, dict[int, Int4Weight]] = {}
    for name, weight in int4.items():
        target, shard = _map_name(name)
        module = modules.get(target.rpartition(".")[0])
        if isinstance(module, PackedLinear):
            shards.setdefault(module, {})[shard or 0] = weight
    layers = {}
    for module, parts in shards.items():
        ordered = [parts[i] for i in range(len(module.shard_sizes)) if i in parts]
        group = ordered[0].group
        if len(ordered) == len(module.shard_sizes) and all(p.group == group for p in ordered):
            layers[module] = Int4Weight(torch.cat([p.packed for p in ordered]).to(device),
                                        torch.cat([p.scale for p in ordered]).to(device),
                                        torch.cat([p.offset for p in ordered]).to(device), group)
    return layers


def _num_shards(module: Any) -> int:
    return len(module.shard_sizes) if isinstance(module, PackedLinear) else 1


def _map_name(name: str) -> tuple[str, int | None]:
    module_name, _, attr = name.rpartition(".")
    parent, _, leaf = module_name.rpartition(".")
    if leaf in PACKED_MODULES:
        packed, shard = PACKED_MODULES[leaf]
        return f"{parent}.{packed}.{attr}", shard
    return name, None
