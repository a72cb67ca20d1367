"""The device tier: which adapter sits in which device slot, reference counts, LRU reuse of idle slots.

Adapters are keyed by their identity (source, id, version), so an adapter changed under the same name
is a different adapter. The adapter exchange (loraplex.adapters) fetches and parses them; a request
holds its adapter's parsed weights from the moment it is admitted to the engine (`hold`) until it
finishes (`drop`), and a device slot from scheduling to finish or preemption. A slot in use is never
overwritten. Pinned adapters keep a reference on their slot, so they stay resident.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict
from pathlib import Path

import torch

from loraplex.adapters.ref import AdapterIdentity
from loraplex.config import LoRAConfig
from loraplex.engine.sequence import Sequence
from loraplex.lora.adapter import AdapterInvalid, AdapterWeights, LoRAModule, load_adapter
from loraplex.lora.batch import EMPTY_SLOT
from loraplex.lora.layers import LoRAHead, wrap_decoder_layers
from loraplex.lora.ops import get_lora_op, resolve_lora_backend
from loraplex.model.decoder import CausalLM


class NoFreeSlot(Exception):
    """Every device slot holds an adapter in use (HTTP 503 for an admin pin: retry later)."""


class LoRAManager:
    def __init__(self, model: CausalLM, config: LoRAConfig, dtype: torch.dtype | None = None) -> None:
        """`dtype`: of the adapters' weights in the decoder layers' slots (`LoRAConfig.resolved_dtype`; default
        the model's)."""
        self.config = config
        self.base_config = model.config
        self._model = model
        self.backend = resolve_lora_backend(config.lora_backend, model.model.embed_tokens.weight.device)
        """The LoRA op backend that runs (`auto` decided for the model's device)."""
        self._op = get_lora_op(self.backend)
        self._wrapped = wrap_decoder_layers(model.model.layers, config.max_loras, config.max_lora_rank, self._op, dtype)
        self._head: LoRAHead | None = None
        self._slot_owner: list[AdapterIdentity | None] = [None] * config.max_loras
        self._slot_refs = [0] * config.max_loras
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self._weights: dict[AdapterIdentity, AdapterWeights] = {}
        self._holders: dict[AdapterIdentity, int] = {}
        self._pinned: set[AdapterIdentity] = set()
        self.loads = 0
        self.dora_slots: set[int] = set()
        """Slots holding an adapter with DoRA modules (its steps run eager: loraplex/model/cuda_graphs.py)."""
        device = model.model.embed_tokens.weight.device
        # On CUDA, slot loads copy from pinned host memory on a stream of their own, so the host never waits
        # for a copy and the copies overlap whatever the GPU still runs; the next step waits for them (`ready`).
        self._copy_stream = torch.cuda.Stream(device) if device.type == "cuda" else None
        self._copies: list[torch.cuda.Event] = []

    def parse(self, path: Path) -> AdapterWeights:
        """Read and validate an adapter folder for this base model and pack its slot rows (the exchange's
        parse step, on a loader thread)."""
        weights = load_adapter(path, self.base_config, self.config.max_lora_rank)
        if weights.lm_head is not None and weights.lm_head.magnitude is not None:
            raise AdapterInvalid(f"{path}: DoRA on lm_head is not supported")
        return self.prepare(weights)

    def prepare(self, weights: AdapterWeights) -> AdapterWeights:
        """`weights` with every wrapped layer's slot rows packed, so loading a slot is a few copies per
        layer; the packed bytes count in `size_bytes` (the host tier's budget)."""
        if weights.packed is not None:
            return weights
        per_layer: dict[int, dict[str, LoRAModule]] = {}
        for (layer, target), module in weights.layers.items():
            per_layer.setdefault(layer, {})[target] = module
        packed = tuple(tuple(wrapper.pack(per_layer.get(layer, {})) for wrapper in wrappers)
                       for layer, wrappers in enumerate(self._wrapped))
        extra = sum(c.nbytes for layer in packed for c in layer if c is not None)
        return dataclasses.replace(weights, packed=packed, size_bytes=weights.size_bytes + extra)

    def hold(self, identity: AdapterIdentity, weights: AdapterWeights) -> None:
        """Keep `weights` for `identity` while a request (or a pin) needs them."""
        self._weights.setdefault(identity, weights)
        self._holders[identity] = self._holders.get(identity, 0) + 1

    def weights_of(self, identity: AdapterIdentity) -> AdapterWeights | None:
        """The weights held for `identity` (None when no request or pin holds them)."""
        return self._weights.get(identity)

    def drop(self, identity: AdapterIdentity) -> None:
        self._holders[identity] -= 1
        if self._holders[identity] == 0:
            del self._holders[identity]
            del self._weights[identity]

    def pin(self, identity: AdapterIdentity, weights: AdapterWeights) -> int:
        """Load the adapter into a slot now and keep it there until `unpin`; returns the slot."""
        slot = self._resident_slot(identity)
        if identity in self._pinned:
            assert slot is not None
            return slot
        if slot is None and not self._idle:
            raise NoFreeSlot(f"all {self.config.max_loras} device slots hold adapters in use")
        self.hold(identity, weights)
        if slot is None:
            slot, _ = self._idle.popitem(last=False)
            self._load(slot, identity)
        self._idle.pop(slot, None)
        self._slot_refs[slot] += 1
        self._pinned.add(identity)
        return slot

    def unpin(self, identity: AdapterIdentity) -> bool:
        """Let a pinned adapter be evicted again (it stays resident until its slot is needed)."""
        if identity not in self._pinned:
            return False
        self._pinned.discard(identity)
        slot = self._resident_slot(identity)
        assert slot is not None
        self._release_slot(slot)
        self.drop(identity)
        return True

    def warm(self, identity: AdapterIdentity, weights: AdapterWeights) -> int | None:
        """Load the adapter into an idle slot ahead of its requests (startup preloading); it stays evictable.
        Returns its slot, or None when no slot is idle."""
        slot = self._resident_slot(identity)
        if slot is not None:
            return slot
        if not self._idle:
            return None
        slot, _ = self._idle.popitem(last=False)
        self._weights.setdefault(identity, weights)
        self._load(slot, identity)
        if identity not in self._holders:
            del self._weights[identity]  # the slot buffers hold it now; requests bring their own copy
        self._idle[slot] = None  # most recently used idle slot: the last to be reused
        return slot

    def slot_of(self, identity: AdapterIdentity) -> int | None:
        return self._resident_slot(identity)

    def evict(self, identity: AdapterIdentity) -> bool:
        """Free the adapter's slot now if no request uses it; False when it is in use or not resident."""
        slot = self._resident_slot(identity)
        if slot is None or self._slot_refs[slot] > 0:
            return False
        self._slot_owner[slot] = None
        self._idle.move_to_end(slot, last=False)  # reused first
        return True

    def acquire(self, seq: Sequence) -> bool:
        """Give `seq` a slot holding its adapter; False when every slot is in use by other adapters."""
        key = seq.adapter
        if key is None:
            return True
        slot = self._resident_slot(key)
        if slot is None:
            if not self._idle:
                return False
            slot, _ = self._idle.popitem(last=False)  # least recently used idle slot
            self._load(slot, key)
        self._idle.pop(slot, None)
        self._slot_refs[slot] += 1
        seq.lora_slot = slot
        return True

    def release(self, seq: Sequence) -> None:
        slot = seq.lora_slot
        if slot == EMPTY_SLOT:
            return
        seq.lora_slot = EMPTY_SLOT
        self._release_slot(slot)

    def _release_slot(self, slot: int) -> None:
        self._slot_refs[slot] -= 1
        assert self._slot_refs[slot] >= 0, f"slot {slot} released more often than acquired"
        if self._slot_refs[slot] == 0:
            self._idle[slot] = None

    def resident(self) -> list[AdapterIdentity]:
        """Adapters loaded in device slots."""
        return [key for key in self._slot_owner if key is not None]

    def is_pinned(self, identity: AdapterIdentity) -> bool:
        return identity in self._pinned

    def slot_refs(self) -> list[int]:
        return list(self._slot_refs)

    def _resident_slot(self, key: AdapterIdentity) -> int | None:
        try:
            return self._slot_owner.index(key)
        except ValueError:
            return None

    def ready(self) -> None:
        """Make the next kernels on the current stream wait for the slot loads issued since the last call (on
        the GPU: the host does not wait). The engine calls it before each step's forward."""
        if self._copies:
            assert self._copy_stream is not None
            stream = torch.cuda.current_stream(self._copy_stream.device)
            for copied in self._copies:
                stream.wait_event(copied)
            self._copies.clear()

    def _load(self, slot: int, key: AdapterIdentity) -> None:
        assert self._slot_refs[slot] == 0, f"slot {slot} is in use and cannot be overwritten"
        # Weights from `parse` and merges come packed; ones built another way are packed here, once.
        weights = self._weights[key] = self.prepare(self._weights[key])
        if self._copy_stream is None:
            self._copy(slot, weights)
        else:
            # An idle slot's last reader ran in a step the host has already waited for; the copy stream still
            # waits for the current one's work first, so nothing queued can read half-written rows.
            self._copy_stream.wait_stream(torch.cuda.current_stream(self._copy_stream.device))
            with torch.cuda.stream(self._copy_stream):
                self._copy(slot, weights)
                copied = torch.cuda.Event()
                copied.record(self._copy_stream)
            self._copies.append(copied)
        self._slot_owner[slot] = key
        self.loads += 1

    def _copy(self, slot: int, weights: AdapterWeights) -> None:
        assert weights.packed is not None
        for wrappers, contents in zip(self._wrapped, weights.packed, strict=True):
            for wrapper, layer_contents in zip(wrappers, contents, strict=True):
                wrapper.load_slot(slot, layer_contents)
        if any(slot in wrapper.dora_slots for wrappers in self._wrapped for wrapper in wrappers):
            self.dora_slots.add(slot)
        else:
            self.dora_slots.discard(slot)
        if weights.lm_head is not None and self._head is None:
            self._head = self._install_head()
        if self._head is not None:
            self._head.load_slot(slot, weights.lm_head)

    def _install_head(self) -> LoRAHead:
        # Allocated on first use: at vocab x rank per slot, LM-head buffers are too big to reserve up front.
        cfg = self.base_config
        weight = self._model.model.embed_tokens.weight
        head = LoRAHead(cfg.hidden_size, cfg.vocab_size, self.config.max_loras, self.config.max_lora_rank,
                        self._op, weight.dtype, weight.device)
        self._model.lora_head = head
        return head
