"""Real PEFT LoRA adapters with random, non-zero weights, and PEFT reference models to compare against."""

from __future__ import annotations

import math
import warnings
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM

# std of scale·B·A relative to the std of the base weight it adapts: large enough that every adapter
# changes greedy tokens visibly, small enough that the adapted model is still a sane network.
DELTA_STD = 0.5
# DoRA magnitudes are drawn around PEFT's init (the row norms of W) with this relative spread.
MAGNITUDE_SPREAD = 0.3


def make_adapter(base_path: Path, out_dir: Path, lora_config: LoraConfig, seed: int,
                 delta_std: float = DELTA_STD, magnitude_spread: float = MAGNITUDE_SPREAD) -> Path:
    """Save a PEFT adapter for the HF checkpoint `base_path` to `out_dir`, every LoRA parameter random.

    PEFT initialises B to zero (so an untrained adapter is the identity); here A and B are both filled,
    per module with a std chosen so that scale·B·A has `delta_std` times the spread of the base weight,
    whatever the module's rank, alpha and rsLoRA setting. DoRA magnitudes are scaled row-wise around their
    init by 1 + `magnitude_spread`·N(0, 1). Deep real models want gentler values than the tiny defaults.
    """
    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = get_peft_model(base, lora_config)
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, LoraLayer) or "default" not in module.lora_A:
                continue
            a = module.lora_A["default"].weight        # [r, in_features]
            b = module.lora_B["default"].weight        # [out_features, r]
            rank, scale = a.shape[0], module.scaling["default"]
            w_std = module.get_base_layer().weight.std().item()
            std = math.sqrt(delta_std * w_std / (abs(scale) * math.sqrt(rank)))
            a.copy_(torch.randn_like(a) * std)
            b.copy_(torch.randn_like(b) * std)
            if module.use_dora["default"]:
                m = module.lora_magnitude_vector["default"].weight  # [out_features]
                m.mul_(1 + magnitude_spread * torch.randn_like(m))
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
