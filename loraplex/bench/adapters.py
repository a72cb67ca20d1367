"""Benchmark adapters: real PEFT LoRA adapters with random weights, the mix of shared/BENCHMARKS.md.

    make_bench_adapters(8, out_root)  ->  [out_root/<spec-hash>/0, ..., out_root/<spec-hash>/7]

Adapter i has the spec `ADAPTER_MIX[i % len(ADAPTER_MIX)]` and weights drawn from seed `SEED + i`, so
the first n adapters of a larger set are the same n adapters. The folder name hashes everything that
decides the bytes (the mix, the seeding, the base checkpoint), so a changed mix or base never reuses a
stale folder. Each adapter is written to a temporary folder and renamed into place: a reader sees a
complete adapter or none, and two processes building the same set at once both end with the same one.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.paths import loraplex_home, resolve_model

ATTENTION_QV = ("q_proj", "v_proj")
ALL_PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
SEED = 1234
# std of scale·B·A relative to the std of the base weight it adapts: enough to change greedy tokens,
# not so much that the adapted model stops being a sane network.
DELTA_STD = 0.5
FORMAT_VERSION = 1  # bump when the way weights are drawn or saved changes


@dataclass(frozen=True)
class AdapterSpec:
    """One adapter shape of the benchmark mix."""

    rank: int
    alpha: int
    targets: tuple[str, ...]
    rslora: bool = False


# Ranks 4-64, q/v-only and all-seven-projection adapters, some rsLoRA; no DoRA (PEFT's mixed-batch
# `adapter_names=` path rejects it). Every rank of the mix is used before any repeats.
ADAPTER_MIX = (
    AdapterSpec(rank=8, alpha=16, targets=ATTENTION_QV),
    AdapterSpec(rank=16, alpha=32, targets=ALL_PROJECTIONS),
    AdapterSpec(rank=64, alpha=16, targets=ALL_PROJECTIONS, rslora=True),
    AdapterSpec(rank=4, alpha=8, targets=ATTENTION_QV),
    AdapterSpec(rank=32, alpha=8, targets=ATTENTION_QV, rslora=True),
    AdapterSpec(rank=8, alpha=8, targets=ALL_PROJECTIONS),
    AdapterSpec(rank=16, alpha=8, targets=ALL_PROJECTIONS, rslora=True),
    AdapterSpec(rank=64, alpha=128, targets=ATTENTION_QV),
)


def default_adapter_root() -> Path:
    return loraplex_home() / "bench-adapters"


def adapter_spec(i: int) -> AdapterSpec:
    return ADAPTER_MIX[i % len(ADAPTER_MIX)]


def make_bench_adapters(n: int, out_root: Path | None = None, base: str = "demo") -> list[Path]:
    """The folders of n benchmark adapters for `base`, built under `out_root/<spec-hash>/` if missing.

    `out_root` defaults to `loraplex_home()/bench-adapters`. Only missing adapters are built, all with
    one base model load and one `get_peft_model`/`add_adapter` per distinct spec.
    """
    if n < 1:
        raise ValueError(f"n must be at least 1, got {n}")
    base_path = resolve_model(base, progress=False)
    set_dir = Path(out_root if out_root is not None else default_adapter_root()) / _spec_hash(base_path)
    paths = [set_dir / str(i) for i in range(n)]
    missing = [i for i, p in enumerate(paths) if not (p / "adapter_config.json").is_file()]
    if missing:
        set_dir.mkdir(parents=True, exist_ok=True)
        _build(base_path, set_dir, missing)
    return paths


def _spec_hash(base_path: Path) -> str:
    config = (base_path / "config.json").read_bytes() if base_path.is_dir() else b""
    key = json.dumps({"format": FORMAT_VERSION, "seed": SEED, "delta_std": DELTA_STD,
                      "mix": [asdict(s) for s in ADAPTER_MIX], "base": str(base_path.resolve()),
                      "base_config": hashlib.sha256(config).hexdigest()}, sort_keys=True)
    return hashlib.sha256(key.encode()).hexdigest()[:16]


def peft_adapters(base_path: Path, configs: Iterable[tuple[str, Any]]) -> Iterator[tuple[Any, str]]:
    """(PEFT model, adapter name) for each (name, LoraConfig) in turn, on one load of the base model.
    Only the current adapter is kept: PEFT's injection walks every module of every adapter present."""
    # peft is a test/bench dependency, not a runtime one.
    from peft import get_peft_model
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model: Any = None
    previous = None
    for name, config in configs:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            if model is None:
                model = get_peft_model(base, config, adapter_name=name)
            else:
                model.add_adapter(name, config)
                model.delete_adapter(previous)
        previous = name
        yield model, name


def load_peft_adapters(base: Any, adapters: Iterable[Path]) -> Any:
    """A PeftModel over HF model `base` holding every adapter folder, named a0, a1 ... in order, in eval mode."""
    from peft import PeftModel

    model: Any = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for i, path in enumerate(adapters):
            # low_cpu_mem_usage skips initialising each LoRA layer before its weights are loaded over it.
            if model is None:
                model = PeftModel.from_pretrained(base, str(path), adapter_name="a0", low_cpu_mem_usage=True)
            else:
                model.load_adapter(str(path), adapter_name=f"a{i}", low_cpu_mem_usage=True)
    if model is None:
        raise ValueError("no adapters given")
    return model.eval()


def _build(base_path: Path, set_dir: Path, indices: list[int]) -> None:
    from peft import LoraConfig

    weight_std: dict[str, float] = {}  # per wrapped module, shared by every adapter on it
    by_spec: dict[AdapterSpec, list[int]] = {}
    for i in indices:
        by_spec.setdefault(adapter_spec(i), []).append(i)
    configs = [(f"spec{n}", LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                       use_rslora=spec.rslora, lora_dropout=0.0, bias="none", task_type="CAUSAL_LM"))
               for n, spec in enumerate(by_spec)]
    for (model, name), spec_indices in zip(peft_adapters(base_path, configs), by_spec.values(), strict=True):
        for i in spec_indices:
            randomize_lora_weights(model, name, torch.Generator().manual_seed(SEED + i), weight_std=weight_std)
            _save_atomically(model, name, set_dir / str(i))


def randomize_lora_weights(model: Any, name: str, generator: torch.Generator, delta_std: float = DELTA_STD,
                           magnitude_spread: float = 0.0, weight_std: dict[str, float] | None = None) -> None:
    """Fill A and B of PEFT adapter `name` so scale·B·A has `delta_std` times the spread of each base
    weight, whatever the rank, alpha and rsLoRA setting (PEFT's own init leaves B zero, an adapter that
    changes nothing). DoRA magnitudes are scaled row by row by 1 + magnitude_spread·N(0, 1).
    `weight_std` caches the base weights' spreads across calls on the same model."""
    from peft.tuners.lora import LoraLayer

    weight_std = {} if weight_std is None else weight_std
    with torch.no_grad():
        for key, module in model.named_modules():
            if not isinstance(module, LoraLayer) or name not in module.lora_A:
                continue
            layer: Any = module
            a = layer.lora_A[name].weight  # [r, in_features]
            b = layer.lora_B[name].weight  # [out_features, r]
            rank, scale = a.shape[0], layer.scaling[name]
            if key not in weight_std:
                weight_std[key] = layer.get_base_layer().weight.std().item()
            # std(B·A) = std_a·std_b·sqrt(r); both factors get the same std.
            std = math.sqrt(delta_std * weight_std[key] / (abs(scale) * math.sqrt(rank)))
            a.normal_(0.0, std, generator=generator)
            b.normal_(0.0, std, generator=generator)
            if magnitude_spread and layer.use_dora[name]:
                m = layer.lora_magnitude_vector[name].weight  # [out_features]
                m.mul_(1 + magnitude_spread * torch.randn(m.shape, generator=generator))


def _save_atomically(model: Any, name: str, dest: Path) -> None:
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-", dir=dest.parent))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(tmp, selected_adapters=[name], safe_serialization=True)
        # PEFT saves a non-"default" adapter into a subfolder named after it.
        try:
            os.rename(tmp / name, dest)
        except OSError:
            if not (dest / "adapter_config.json").is_file():
                raise  # not a concurrent builder that got there first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
