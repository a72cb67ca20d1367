"""LoRA wrappers around the decoder's packed linears, with per-slot device buffers.

    output = base(x) + Σ_shards scale[s] · (x · A[s]ᵀ) · B[s]ᵀ      for each token's slot s

A wrapped `PackedLinear` (q|k|v, gate|up, o, down) holds ONE pair of slot buffers for all its
shards: `A[slots, shards·r_max, in]` stacks the shards' A rows (each at its own rank, so a slot's
packed rank is the sum of its shards' ranks) and `B[slots, shards·r_max, out]` is block-diagonal,
each shard's Bᵀ (with its scale folded in) in its own rank rows and output columns. One shrink and
one expand per segment then serve every shard: half the matmul calls of a pair per shard, which is
what decode-sized segments are bound by in the torch backend. `blocks` lists each slot's non-zero
blocks of B, so an op that loops over them itself (the native one) reads no zeros.
The buffers are allocated once and never move (so CUDA graphs can capture them later); loading an
adapter copies into a slot. The batch's token → slot mapping is read from the forward context,
never passed through forward signatures.

DoRA (PEFT's `use_dora`): the adapted output row j is `m_j · (W x + scale · B A x)_j / ‖W + scale · B A‖_j`
plus the bias. The per-row factor `m / ‖W + scale · BA‖` depends only on the adapter and the base
weight, so it is computed when the adapter is packed and applied per segment after the delta.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch
from torch import nn

from loraplex.lora.adapter import LoRAModule
from loraplex.lora.batch import LoRABatch
from loraplex.lora.ops import AddLoRA
from loraplex.model.context import get_forward_context
from loraplex.model.layers import PackedLinear


@dataclass(frozen=True)
class SlotContents:
    """One packed layer's share of an adapter, as the rows its slot holds (see `LoRAPackedLinear.pack`)."""

    a: torch.Tensor  # [packed_rank, in] the shards' A rows stacked
    b: torch.Tensor  # [packed_rank, out] each shard's scale·Bᵀ in its rows and columns, zero elsewhere
    blocks: torch.Tensor  # [shards, 4] long: rank row start, rank rows, column start, columns
    dora: torch.Tensor | None  # [out] DoRA row factors, 1 outside DoRA shards; None without DoRA

    @property
    def rank(self) -> int:
        return int(self.a.shape[0])

    @property
    def nbytes(self) -> int:
        """Host bytes held; a pinned tensor's rounded up to a power of two, as torch's pinned allocator does."""
        return sum(_held_bytes(t) for t in (self.a, self.b, self.blocks, self.dora) if t is not None)


def _held_bytes(t: torch.Tensor) -> int:
    size = t.numel() * t.element_size()
    return 1 << max(size - 1, 0).bit_length() if t.is_pinned() else size


class LoRAPackedLinear(nn.Module):
    def __init__(self, base: PackedLinear, shard_targets: tuple[str, ...], num_slots: int, max_rank: int,
                 op: AddLoRA, weight_dtype: torch.dtype | None = None) -> None:
        super().__init__()
        assert base.weight_t is not None or base.packed is not None or base.quantized is not None, \
            "wrap a PackedLinear after its weights are loaded"
        assert len(shard_targets) == len(base.shard_sizes)
        self.base = base
        self.shard_targets = shard_targets
        self.op = op
        packed_rank = len(shard_targets) * max_rank
        out_features = sum(base.shard_sizes)
        dtype, device = base.dtype, base.device
        wdtype = weight_dtype or dtype  # the adapters' A and B (`--lora-dtype`); the products run in `dtype`
        self.a = torch.zeros(num_slots, packed_rank, base.in_features, dtype=wdtype, device=device)  # [slots, shards·r, in]
        self.b = torch.zeros(num_slots, packed_rank, out_features, dtype=wdtype, device=device)      # [slots, shards·r, out]
        # Per slot and shard: rank row start, rank rows, output column start, output columns of its
        # block of B; an absent shard has zero rank rows.
        self.blocks = torch.zeros(num_slots, len(shard_targets), 4, dtype=torch.long)  # [slots, shards, 4]
        self.ranks = torch.zeros(num_slots, dtype=torch.long, device=device)  # [slots] packed rank
        # Scales are folded into B; a slot with nothing loaded has rank 0, which the ops skip.
        self.scales = torch.ones(num_slots, dtype=torch.float32, device=device)  # [slots]
        # DoRA row factors over the whole packed output, 1 where a shard has no DoRA module.
        self.dora = torch.ones(num_slots, out_features, dtype=dtype, device=device)  # [slots, out]
        self.dora_slots: set[int] = set()
        self._slot_ranks = [0] * num_slots  # `ranks` on the host: an empty slot needs no emptying

    def pack(self, modules: Mapping[str, LoRAModule]) -> SlotContents | None:
        """An adapter's modules for this layer (target name → weights) laid out as slot rows: the work
        of a slot load except the copies, done where the adapter is parsed (a loader thread) rather than
        in the step loop. None when the adapter targets none of this layer's shards."""
        a_rows, b_blocks, blocks, dora = [], [], [], None
        offset = 0
        for i, target in enumerate(self.shard_targets):
            module = modules.get(target)
            rows = self._shard_rows(i)
            if module is None:
                blocks.append((offset, 0, rows.start, rows.stop - rows.start))
                continue
            a_rows.append(module.a)
            b_blocks.append((offset, rows, module.scale * module.b.T))  # [r, out_shard]
            blocks.append((offset, module.rank, rows.start, rows.stop - rows.start))
            offset += module.rank
            if module.magnitude is not None:
                if dora is None:
                    dora = torch.ones(self.b.shape[2])
                    dense = self.base.dense_t()  # [in, out]; unpacked anew on the onednn backend: once per pack
                dora[rows] = self._dora_factor(dense[:, rows], module).cpu()
        if offset == 0:
            return None
        b = torch.zeros(offset, self.b.shape[2], dtype=self.b.dtype)  # [packed_rank, out]
        for row, cols, block in b_blocks:
            b[row:row + block.shape[0], cols] = block
        a = torch.cat(a_rows).to(self.a.dtype)
        dora_rows = None if dora is None else dora.to(self.dora.dtype)
        if self.a.is_cuda:  # pinned: a slot load is then an asynchronous copy (LoRAManager._load)
            a, b = a.pin_memory(), b.pin_memory()
            dora_rows = None if dora_rows is None else dora_rows.pin_memory()
        return SlotContents(a=a, b=b, blocks=torch.tensor(blocks, dtype=torch.long), dora=dora_rows)

    def load_slot(self, slot: int, contents: SlotContents | None) -> None:
        """Copy packed contents into `slot` (None empties it: rank 0, which the ops skip). Rows past the
        new rank keep whatever they held: the ops never read them."""
        rank = 0 if contents is None else contents.rank
        if rank == 0 and self._slot_ranks[slot] == 0:
            return  # empty already (an adapter that does not target this layer, loaded over another)
        if contents is not None:  # asynchronous from pinned memory on CUDA; `blocks` stays on the host
            self.a[slot, :rank].copy_(contents.a, non_blocking=True)
            self.b[slot, :rank].copy_(contents.b, non_blocking=True)
            self.blocks[slot].copy_(contents.blocks)
        else:
            self.blocks[slot].zero_()
        if contents is not None and contents.dora is not None:
            self.dora[slot].copy_(contents.dora, non_blocking=True)
            self.dora_slots.add(slot)
        elif slot in self.dora_slots:
            self.dora[slot] = 1.0
            self.dora_slots.discard(slot)
        # fill_, not `ranks[slot] = rank`: that copies a CPU scalar tensor in, a blocking copy on CUDA, which
        # would stall the host on the copy stream (LoRAManager._load) until the running step is done.
        self.ranks[slot].fill_(rank)
        self._slot_ranks[slot] = rank

    def _shard_rows(self, i: int) -> slice:
        start = self.base.shard_offsets[i]
        return slice(start, start + self.base.shard_sizes[i])

    @staticmethod
    def _dora_factor(shard_t: torch.Tensor, module: LoRAModule) -> torch.Tensor:
        """The DoRA row factors of one shard, from its base weight `shard_t` `[in, out_shard]`."""
        assert module.magnitude is not None
        weight = shard_t.T.float()       # [out_shard, in]
        adapted = weight + module.scale * (module.b @ module.a).to(weight.device)
        return module.magnitude.to(weight.device) / torch.linalg.norm(adapted, dim=1)  # [out_shard]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)  # [tokens, out]
        batch = get_forward_context().lora
        if batch is None or not batch.has_lora:
            return out
        self.op(out, x, self.a, self.b, self.ranks, self.scales, batch, self.blocks)
        if self.dora_slots and batch.segmented:  # a CUDA graph never runs a DoRA slot (cuda_graphs.py)
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
                        op: AddLoRA, weight_dtype: torch.dtype | None = None) -> list[list[LoRAPackedLinear]]:
    """Replace each layer's packed linears by LoRA wrappers; returns the wrappers layer by layer."""
    wrapped = []
    for layer in layers:
        per_layer = []
        for path, targets in WRAPPED_MODULES.items():
            parent_name, _, child = path.partition(".")
            parent = getattr(layer, parent_name)
            wrapper = LoRAPackedLinear(getattr(parent, child), targets, num_slots, max_rank, op, weight_dtype)
            setattr(parent, child, wrapper)
            per_layer.append(wrapper)
        wrapped.append(per_layer)
    return wrapped


class LoRAHead(nn.Module):
    """LoRA on the LM head, applied to the sampled rows' logits only: logits += scale · (h · Aᵀ) · Bᵀ."""

    def __init__(self, hidden: int, vocab: int, num_slots: int, max_rank: int, op: AddLoRA,
                 dtype: torch.dtype, device: torch.device) -> None:
        super().__init__()
        self.op = op
        self.a = torch.zeros(num_slots, max_rank, hidden, dtype=dtype, device=device)  # [slots, r, hidden]
        self.b = torch.zeros(num_slots, max_rank, vocab, dtype=dtype, device=device)   # [slots, r, vocab]
        self.ranks = torch.zeros(num_slots, dtype=torch.long, device=device)
        self.scales = torch.zeros(num_slots, dtype=torch.float32, device=device)

    def load_slot(self, slot: int, module: LoRAModule | None) -> None:
        self.a[slot].zero_()
        self.b[slot].zero_()
        self.ranks[slot].fill_(0 if module is None else module.rank)  # fill_: no blocking copy (LoRAPackedLinear)
        self.scales[slot].fill_(0.0 if module is None else module.scale)
        if module is not None:
            a, b = module.a.to(self.a.dtype), module.b.T.to(self.b.dtype)
            if self.a.is_cuda:  # asynchronous copies need pinned sources
                a, b = a.pin_memory(), b.contiguous().pin_memory()
            self.a[slot, :module.rank].copy_(a, non_blocking=True)
            self.b[slot, :module.rank].copy_(b, non_blocking=True)

    def forward(self, logits: torch.Tensor, hidden: torch.Tensor) -> torch.Tensor:
        """logits [rows, vocab] += each row's delta, in place; the rows' slots come from the context."""
        batch = get_forward_context().lora
        if batch is not None and batch.has_lora:
            self.op(logits, hidden, self.a, self.b, self.ranks, self.scales, batch, None)
        return logits
