"""Real PEFT LoRA adapters with random, non-zero weights, and PEFT reference models to compare against."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM

from loraplex.bench.adapters import randomize_lora_weights

# std of scale·B·A relative to the std of the base weight it adapts: large enough that every adapter
# changes greedy tokens visibly, small enough that the adapted model is still a sane network.
DELTA_STD = 0.5
# DoRA magnitudes are drawn around PEFT's init (the row norms of W) with this relative spread.
MAGNITUDE_SPREAD = 0.3
# On the 30-layer demo model, tiny-model strength wrecks the output and amplifies float32 rounding past
# 1e-4 in PEFT itself (merged and unmerged PEFT differ by 5e-4); fine-tune-sized deltas still change every output.
DEMO_STRENGTH = dict(delta_std=0.1, magnitude_spread=0.05)


def make_adapter(base_path: Path, out_dir: Path, lora_config: LoraConfig, seed: int,
                 delta_std: float = DELTA_STD, magnitude_spread: float = MAGNITUDE_SPREAD) -> Path:
    """Save a PEFT adapter for the HF checkpoint `base_path` to `out_dir`, every LoRA parameter random.

    Weights as `randomize_lora_weights` makes them; deep real models want gentler values than the tiny
    defaults.
    """
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, lora_config)
    randomize_lora_weights(model, "default", torch.Generator().manual_seed(seed), delta_std, magnitude_spread)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save_pretrained(out_dir)
    return Path(out_dir)


def peft_reference(base_path: Path, adapter_dir: Path) -> Any:
    """The HF base model with the adapter applied by PEFT itself, float32, eval mode."""
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return PeftModel.from_pretrained(base, str(adapter_dir)).eval()
