"""Which adapter sits in which device slot: loading, reference counts, LRU reuse of idle slots.

An adapter is identified by its resolved folder and the hash of its files, so an adapter changed on
disk under the same name is a different adapter. Requests register their adapter when they are added
(it is read and validated then, so a bad adapter fails its own request at once) and hold a slot
from admission to finish or preemption; a slot in use is never overwritten.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

from loraplex.config import LoRAConfig
from loraplex.engine.sequence import Sequence
from loraplex.lora.adapter import AdapterInvalid, AdapterWeights, LoRAModule, load_adapter
from loraplex.lora.batch import EMPTY_SLOT
from loraplex.lora.layers import LoRAHead, wrap_decoder_layers
from loraplex.lora.ops import get_lora_op
from loraplex.model.decoder import CausalLM


@dataclass(frozen=True)
class AdapterKey:
    path: str
    content_hash: str


class LoRAManager:
    def __init__(self, model: CausalLM, config: LoRAConfig) -> None:
        self.config = config
        self.base_config = model.config
        self._model = model
        self._op = get_lora_op(config.lora_backend)
        self._wrapped = wrap_decoder_layers(model.model.layers, config.max_loras, config.max_lora_rank, self._op)
        self._head: LoRAHead | None = None
        self._slot_owner: list[AdapterKey | None] = [None] * config.max_loras
        self._slot_refs = [0] * config.max_loras
        self._idle: OrderedDict[int, None] = OrderedDict((s, None) for s in range(config.max_loras))
        self._weights: dict[AdapterKey, AdapterWeights] = {}
        self._host: OrderedDict[str, tuple[tuple[tuple[str, int, int], ...], AdapterWeights]] = OrderedDict()
        self._holders: dict[AdapterKey, int] = {}
        self.loads = 0

    def register(self, adapter_id: str) -> AdapterKey:
        """Read and validate the adapter for a new request; raises AdapterError for a bad one."""
        weights = self._read(Path(adapter_id))
        key = AdapterKey(str(Path(adapter_id).resolve()), weights.content_hash)
        self._weights.setdefault(key, weights)
        self._holders[key] = self._holders.get(key, 0) + 1
        return key

    def _read(self, path: Path) -> AdapterWeights:
        """Parsed adapter from the host cache when its files are unchanged (same sizes and mtimes)."""
        stamp = _file_stamp(path)
        cached = self._host.get(str(path.resolve())) if stamp is not None else None
        if cached is not None and cached[0] == stamp:
            self._host.move_to_end(str(path.resolve()))
            return cached[1]
        weights = load_adapter(path, self.base_config, self.config.max_lora_rank)
        if weights.lm_head is not None and weights.lm_head.magnitude is not None:
            raise AdapterInvalid(f"{path}: DoRA on lm_head is not supported")
        if stamp is not None and self.config.max_cpu_loras > 0:
            self._host[str(path.resolve())] = (stamp, weights)
            while len(self._host) > self.config.max_cpu_loras:
                self._host.popitem(last=False)
        return weights

    def unregister(self, key: AdapterKey) -> None:
        self._holders[key] -= 1
        if self._holders[key] == 0:
            del self._holders[key]
            del self._weights[key]

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
        self._slot_refs[slot] -= 1
        assert self._slot_refs[slot] >= 0, f"slot {slot} released more often than acquired"
        if self._slot_refs[slot] == 0:
            self._idle[slot] = None

    def resident(self) -> list[str]:
        """Folders of the adapters loaded in device slots."""
        return [key.path for key in self._slot_owner if key is not None]

    def slot_refs(self) -> list[int]:
        return list(self._slot_refs)

    def _resident_slot(self, key: AdapterKey) -> int | None:
        try:
            return self._slot_owner.index(key)
        except ValueError:
            return None

    def _load(self, slot: int, key: AdapterKey) -> None:
        assert self._slot_refs[slot] == 0, f"slot {slot} is in use and cannot be overwritten"
        weights = self._weights[key]
        per_layer: dict[int, dict[str, LoRAModule]] = {}
        for (layer, target), module in weights.layers.items():
            per_layer.setdefault(layer, {})[target] = module
        for layer, wrappers in enumerate(self._wrapped):
            for wrapper in wrappers:  # each takes the targets of its own shards
                wrapper.load_slot(slot, per_layer.get(layer, {}))
        if weights.lm_head is not None and self._head is None:
            self._head = self._install_head()
        if self._head is not None:
            self._head.load_slot(slot, weights.lm_head)
        self._slot_owner[slot] = key
        self.loads += 1

    def _install_head(self) -> LoRAHead:
        # Allocated on first use: at vocab x rank per slot, LM-head buffers are too big to reserve up front.
        cfg = self.base_config
        weight = self._model.model.embed_tokens.weight
        head = LoRAHead(cfg.hidden_size, cfg.vocab_size, self.config.max_loras, self.config.max_lora_rank,
                        self._op, weight.dtype, weight.device)
        self._model.lora_head = head
        return head


def _file_stamp(path: Path) -> tuple[tuple[str, int, int], ...] | None:
    """(name, size, mtime_ns) of the adapter's files; None when the folder cannot be listed."""
    try:
        return tuple(sorted((f.name, st.st_size, st.st_mtime_ns) for f in path.iterdir()
                            if f.is_file() for st in [f.stat()]))
    except OSError:
        return None
