"""Small valid PEFT LoRA adapter folders for the tiny Llama of tests/helpers.py, written by hand (fast)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save as save_safetensors
from transformers import LlamaConfig

from loraplex.lora.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterWeights, load_adapter
from loraplex.model.decoder import DecoderConfig
from tests.helpers import TINY

BASE = DecoderConfig.from_hf(LlamaConfig(**TINY, architectures=["LlamaForCausalLM"]))
HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]
_OUT = {"q_proj": TINY["hidden_size"], "v_proj": TINY["num_key_value_heads"] * HEAD_DIM}


def adapter_files(seed: int = 0, rank: int = 4) -> dict[str, bytes]:
    """adapter_config.json and adapter_model.safetensors of a q/v adapter on every layer, random A and B."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(TINY["num_hidden_layers"]):
        for target, out in _OUT.items():
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(rank, TINY["hidden_size"], generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(out, rank, generator=generator)
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": rank, "lora_alpha": 2 * rank,
              "target_modules": sorted(_OUT)}
    return {CONFIG_FILE: json.dumps(config).encode(), SAFETENSORS_FILE: save_safetensors(tensors)}


def medusa_files(heads: int = 2, seed: int = 0) -> dict[str, bytes]:
    """config.json and medusa_lm_head.safetensors of version-2 Medusa heads for the tiny model, random."""
    from loraplex.lora.medusa import CONFIG_FILE as MEDUSA_CONFIG
    from loraplex.lora.medusa import HEADS_FILE, medusa_tensors

    tensors = medusa_tensors(heads, 1, TINY["hidden_size"], None, torch.Generator().manual_seed(seed), std=1.0)
    config = {"medusa_num_heads": heads, "medusa_num_layers": 1}
    return {MEDUSA_CONFIG: json.dumps(config).encode(), HEADS_FILE: save_safetensors(tensors)}


def write_adapter(folder: Path, seed: int = 0, rank: int = 4) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in adapter_files(seed, rank).items():
        (folder / name).write_bytes(data)
    return folder


def parse(path: Path) -> AdapterWeights:
    """What the engine will pass the loader: load_adapter for the tiny base model."""
    return load_adapter(path, BASE, max_rank=16)
