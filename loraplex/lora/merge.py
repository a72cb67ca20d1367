"""Per-request adapter merges (LoRAX's `merged_adapters`): several adapters served as one.

Linear merging is exact in LoRA form: Σᵢ wᵢ·sᵢ·Bᵢ·Aᵢ = [w₁s₁B₁ | … | wₙsₙBₙ] · [A₁; …; Aₙ], so the merged
adapter stacks the components' A rows and their weighted, scaled B columns (rank = Σ ranks, scale 1),
as PEFT's `add_weighted_adapter(combination_type="cat")` does. Nothing is approximated, and the result
runs through the same slots and ops as any adapter. TIES and DARE need dense deltas re-factored to low
rank; they are refused rather than approximated.

Weights must be finite, and a merge whose weighted tensors overflow float32 is refused (AdapterInvalid)
before it can take a device slot: it would serve NaN logits.
"""

from __future__ import annotations

import hashlib
import json
import math
import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

import torch

from loraplex.adapters.loader import LoadedAdapter
from loraplex.adapters.ref import AdapterIdentity
from loraplex.lora.adapter import AdapterInvalid, AdapterWeights, LoRAModule

MAX_MERGED = 8


@dataclass(frozen=True)
class MergeSpec:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    strategy: str = "linear"

    def __post_init__(self) -> None:
        object.__setattr__(self, "ids", tuple(self.ids))
        object.__setattr__(self, "weights", tuple(float(w) for w in self.weights))
        if not 1 <= len(self.ids) <= MAX_MERGED:
            raise ValueError(f"merged_adapters.ids must name 1 to {MAX_MERGED} adapters, got {len(self.ids)}")
        if len(self.weights) != len(self.ids):
            raise ValueError(f"merged_adapters has {len(self.ids)} ids but {len(self.weights)} weights")
        if not all(math.isfinite(w) for w in self.weights):
            raise ValueError(f"merged_adapters.weights must be finite numbers, got {list(self.weights)}")
        if self.strategy != "linear":
            raise ValueError(f"merge_strategy {self.strategy!r} is not supported; use \"linear\" (exact in LoRA form)")


def merge_linear(parts: Sequence[tuple[AdapterWeights, float]], max_rank: int) -> AdapterWeights:
    """One adapter whose delta is Σ weight · delta of each part (see the module docstring)."""
    if any(w.use_dora for w, _ in parts):
        raise AdapterInvalid("merging DoRA adapters is not supported")
    keys = sorted({key for w, _ in parts for key in w.layers})
    layers = {key: _stack([(w.layers[key], weight) for w, weight in parts if key in w.layers]) for key in keys}
    heads = [(w.lm_head, weight) for w, weight in parts if w.lm_head is not None]
    lm_head = _stack(heads) if heads else None  # type: ignore[arg-type]
    for key, module in [*layers.items(), *([("lm_head", lm_head)] if lm_head else [])]:
        if not torch.isfinite(module.b).all():
            raise AdapterInvalid(f"the merge overflows: its weighted lora_B of {key} holds non-finite values "
                                 f"(weights {[w for _, w in parts]} times each part's scale)")
    rank = max([m.rank for m in layers.values()] + ([lm_head.rank] if lm_head else []))
    if rank > max_rank:
        raise AdapterInvalid(f"the merged adapter has rank {rank} (the sum of its parts' ranks), above the "
                             f"server's max_lora_rank {max_rank}")
    size = sum(t.numel() * 4 for m in [*layers.values(), *([lm_head] if lm_head else [])] for t in (m.a, m.b))
    first = parts[0][0]
    return AdapterWeights(path=first.path, config=MappingProxyType({"merged": True}), rank=rank, use_dora=False,
                          layers=MappingProxyType(layers), lm_head=lm_head, size_bytes=size)


def _stack(modules: list[tuple[LoRAModule, float]]) -> LoRAModule:
    a = torch.cat([m.a for m, _ in modules])                          # [Σ r, in]
    b = torch.cat([m.b * (w * m.scale) for m, w in modules], dim=1)  # [out, Σ r]
    return LoRAModule(a, b, 1.0, None)


def merged_future(spec: MergeSpec, parts: list[Future[LoadedAdapter]], max_rank: int,
                  prepare: Callable[[AdapterWeights], AdapterWeights]) -> Future[LoadedAdapter]:
    """A Future of the merged adapter, done when every part's load is. The merge (a few tensor
    concatenations, then `prepare`, e.g. packing its slot rows) runs on the loader thread that finishes
    the last part, or on the caller's thread when every part was already in the host tier."""
    result: Future[LoadedAdapter] = Future()
    remaining = [len(parts)]
    lock = threading.Lock()  # parts finish on different loader threads

    def on_part_done(_: Future[LoadedAdapter]) -> None:
        with lock:
            remaining[0] -= 1
            if remaining[0]:
                return
        try:
            loaded = [p.result() for p in parts]
            weights = prepare(merge_linear([(part.weights, w) for part, w in zip(loaded, spec.weights, strict=True)],
                                           max_rank))
        except Exception as e:  # any failure fails the merge: an exception escaping a callback would hang it
            result.set_exception(e)
            return
        versions = [(str(part.identity), w) for part, w in zip(loaded, spec.weights, strict=True)]
        identity = AdapterIdentity("merged", json.dumps(versions),
                                   hashlib.sha256(json.dumps(versions).encode()).hexdigest())
        result.set_result(LoadedAdapter(identity, weights, Path(weights.path)))

    for part in parts:
        part.add_done_callback(on_part_done)
    return result
