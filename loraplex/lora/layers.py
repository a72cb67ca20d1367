"""LoRA wrappers around the decoder's packed linears, with per-slot device buffers.

    output = base(x) + Σ_shards scale[s] · (x · A[s]ᵀ) · B[s]ᵀ      for each token's slot s

A wrapped `PackedLinear` (q|k|v, gate|up, o, down) keeps, per shard, `A[slots, r_max, in]`,
`B[slots, out_shard, r_max]`, a rank and a scale per slot. The buffers are allocated once and never
move (so CUDA graphs can capture them later); loading an adapter copies into a slot. The batch's
token → slot mapping is read from the forward context, never passed through forward signatures.

DoRA (PEFT's `use_dora`): the adapted output row j is `m_j · (W x + scale · B A x)_j / ‖W + scale · B A‖_j`
plus the bias. The per-row factor `m / ‖W + scale · BA‖` depends only on the adapter and the base
weight, so it is computed when the slot is loaded and applied per segment after the delta.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from loraplex.lora.adapter import LoRAModule
from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops import AddLoRA
from loraplex.model.context import get_forward_context
from loraplex.model.layers import PackedLinear


class LoRAPackedLinear(nn.Module):
    def __init__(self, base: PackedLinear, shard_targets: tuple[str, ...], num_slots: int, max_rank: int,
                 op: AddLoRA) -> None:
        super().__init__()
        assert base.weight_t is not None, "wrap a PackedLinear after its weights are loaded"
        assert len(shard_targets) == len(base.shard_sizes)
        self.base = base
        self.shard_targets = shard_targets
        self.op = op
        weight = base.weight_t
        in_features = base.in_features
        self.a = [weight.new_zeros(num_slots, max_rank, in_features) for _ in shard_targets]     # [slots, r, in]
        self.b = [weight.new_zeros(num_slots, size, max_rank) for size in base.shard_sizes]      # [slots, out, r]
        self.ranks = [torch.zeros(num_slots, dtype=torch.long, device=weight.device) for _ in shard_targets]
        self.scales = [torch.zeros(num_slots, dtype=torch.float32, device=weight.device) for _ in shard_targets]
        # DoRA row factors over the whole packed output, 1 where a shard has no DoRA module.
        self.dora = weight.new_ones(num_slots, sum(base.shard_sizes))  # [slots, out]
        self.dora_slots: set[int] = set()

    def load_slot(self, slot: int, modules: dict[str, LoRAModule]) -> None:
        """Copy an adapter's modules for this layer (target name → weights) into `slot`; absent targets
        get rank 0, which the ops skip."""
        self.dora[slot] = 1.0
        self.dora_slots.discard(slot)
        for i, target in enumerate(self.shard_targets):
            module = modules.get(target)
            self.a[i][slot].zero_()
            self.b[i][slot].zero_()
            if module is None:
                self.ranks[i][slot] = 0
                self.scales[i][slot] = 0.0
                continue
            r = module.rank
            self.a[i][slot, :r] = module.a.to(self.a[i].dtype)
            self.b[i][slot, :, :r] = module.b.to(self.b[i].dtype)
            self.ranks[i][slot] = r
            self.scales[i][slot] = module.scale
            if module.magnitude is not None:
                rows = self._shard_rows(i)
                self.dora[slot, rows] = self._dora_factor(i, module).to(self.dora.dtype)
                self.dora_slots.add(slot)

    def clear_slot(self, slot: int) -> None:
        self.load_slot(slot, {})

    def _shard_rows(self, i: int) -> slice:
        start = self.base.shard_offsets[i]
        return slice(start, start + self.base.shard_sizes[i])

    def _dora_factor(self, i: int, module: LoRAModule) -> torch.Tensor:
        assert self.base.weight_t is not None and module.magnitude is not None
        weight = self.base.weight_t[:, self._shard_rows(i)].T.float()       # [out_shard, in]
        adapted = weight + module.scale * (module.b @ module.a).to(weight.device)
        return module.magnitude.to(weight.device) / torch.linalg.norm(adapted, dim=1)  # [out_shard]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [tokens, out]
        batch = get_forward_context().lora
        if batch is None or not batch.has_lora:
            return out
        for i in range(len(self.shard_targets)):
            self.op(out[:, self._shard_rows(i)], x, self.a[i], self.b[i], self.ranks[i], self.scales[i], batch)
        if self.dora_slots:
            self._apply_dora(out, batch)
        return out

    def _apply_dora(self, out: torch.Tensor, batch: LoRABatch) -> None:
        bias = self.base.bias
        for start, length, slot in zip(batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list,
                                       strict=True):
            if slot not in self.dora_slots:
                continue
            rows = out[start:start + length]  # [length, out]
            if bias is None:
                rows.mul_(self.dora[slot])
            else:
                rows.sub_(bias).mul_(self.dora[slot]).add_(bias)


# Which checkpoint targets each packed module of a decoder layer carries, shard by shard.
WRAPPED_MODULES = {
    "self_attn.qkv_proj": ("q_proj", "k_proj", "v_proj"),
    "self_attn.o_proj": ("o_proj",),
    "mlp.gate_up_proj": ("gate_proj", "up_proj"),
    "mlp.down_proj": ("down_proj",),
}


def wrap_decoder_layers(layers: nn.ModuleList, num_slots: int, max_rank: int,
                        op: AddLoRA) -> list[dict[str, LoRAPackedLinear]]:
    """Replace each layer's packed linears by LoRA wrappers; returns, per layer, path → wrapper."""
    wrapped = []
    for layer in layers:
        per_layer = {}
        for path, targets in WRAPPED_MODULES.items():
            parent_name, _, child = path.partition(".")
            parent = getattr(layer, parent_name)
            wrapper = LoRAPackedLinear(getattr(parent, child), targets, num_slots, max_rank, op)
            setattr(parent, child, wrapper)
            per_layer[path] = wrapper
        wrapped.append(per_layer)
    return wrapped


def iter_wrappers(wrapped: list[dict[str, LoRAPackedLinear]]) -> Iterator[tuple[int, LoRAPackedLinear]]:
    for layer, per_layer in enumerate(wrapped):
        for wrapper in per_layer.values():
            yield layer, wrapper
