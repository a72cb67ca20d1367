"""Reading a GGUF file as a plain float32 checkpoint with Hugging Face names.

Dequantization, tensor renaming and undoing llama.cpp's q/k row permutation are all transformers'
own GGUF code; this module only picks the cheapest entry point into it, so that the tensors are
exactly what `AutoModelForCausalLM.from_pretrained(folder, gguf_file=...)` would load.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedTokenizerBase,
)
from transformers.integrations.gguf import is_gguf_arch_supported, read_gguf_metadata
from transformers.modeling_gguf_pytorch_utils import GGUF_SUPPORTED_ARCHITECTURES, load_gguf_checkpoint
from transformers.utils.quantization_config import GgufConfig

# llama.cpp spellings that transformers' legacy GGUF loader renames before its support check.
_LEGACY_ALIASES = {
    "qwen2moe": "qwen2_moe",
    "qwen3moe": "qwen3_moe",
    "gpt-oss": "gpt_oss",
    "minimax-m2": "minimax_m2",
    "t5encoder": "t5",
}
# Metadata groups in transformers' mapping table that are not architectures.
_NOT_ARCHITECTURES = {"general", "tokenizer"}


@dataclass
class GGUFCheckpoint:
    config: PretrainedConfig
    """Describes the dequantized float32 model: no `quantization_config`, `architectures` filled in."""
    tensors: dict[str, torch.Tensor]
    """HF checkpoint names → float32 tensors; a tied output projection appears once, under its embedding."""
    tokenizer: PreTrainedTokenizerBase
    """A fast tokenizer rebuilt from the GGUF metadata, chat template included."""


def gguf_architecture(path: Path) -> str:
    """The file's `general.architecture`, read without touching tensor data."""
    metadata, _ = read_gguf_metadata(str(path))
    return str(metadata["general.architecture"])


def supported_gguf_architectures() -> list[str]:
    legacy = [name for name in GGUF_SUPPORTED_ARCHITECTURES if name not in _NOT_ARCHITECTURES]
    return sorted(set(legacy) | set(_LEGACY_ALIASES))


def read_gguf(path: Path) -> GGUFCheckpoint:
    """Dequantize a GGUF causal LM into float32 tensors named as a transformers checkpoint names them."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"GGUF file {str(path)!r} does not exist")
    architecture = gguf_architecture(path)
    new_loader = is_gguf_arch_supported(architecture)
    if not new_loader and _LEGACY_ALIASES.get(architecture, architecture) not in supported_gguf_architectures():
        raise ValueError(
            f"GGUF file {str(path)!r} holds a {architecture!r} model, which transformers cannot read from GGUF; "
            f"supported architectures: {', '.join(supported_gguf_architectures())}"
        )

    folder, name = str(path.parent), path.name
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    if new_loader:
        tensors, model_class = _tensors_via_full_model(folder, name)
    else:
        tensors, model_class = _tensors_via_legacy_loader(path, config)

    if hasattr(config, "quantization_config"):
        del config.quantization_config
    config.architectures = [model_class]
    config.dtype = torch.float32
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    return GGUFCheckpoint(config=config, tensors=tensors, tokenizer=tokenizer)


def _tensors_via_legacy_loader(path: Path, config: PretrainedConfig) -> tuple[dict[str, torch.Tensor], str]:
    # The legacy loader only needs a model to learn the HF parameter names, so a meta-device one
    # (no memory, no init) is enough; this skips building and filling a real model.
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    parsed = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=skeleton, torch_dtype=torch.float32)
    tensors: dict[str, torch.Tensor] = parsed["tensors"]
    missing = sorted(set(_unique_state_dict(skeleton)) - set(tensors))
    if missing:
        raise ValueError(f"GGUF file {str(path)!r} lacks tensors the model needs: {', '.join(missing[:8])}")
    return tensors, type(skeleton).__name__


def _tensors_via_full_model(folder: str, name: str) -> tuple[dict[str, torch.Tensor], str]:
    # Architectures on transformers' newer GGUF path convert weights only while loading a model;
    # `dequantize=True` keeps every weight a plain float tensor even where GGUF matmul kernels exist.
    model = AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=name, dtype=torch.float32, quantization_config=GgufConfig(dequantize=True)
    )
    tensors = {key: value.detach().contiguous() for key, value in _unique_state_dict(model).items()}
    return tensors, type(model).__name__


def _unique_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict without the second name of a tied weight, as `save_pretrained` writes it."""
    seen: set[int] = set()
    unique = {}
    for key, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen.add(id(value))
            unique[key] = value
    return unique
