"""Continuous batching: which sequences run this step, how many tokens each, within the budgets.

Every sequence is handled the same way: it has `num_tokens` known tokens of which
`num_computed_tokens` are in the KV cache, and a step computes the next `num_new_tokens` of them.
A prompt is therefore a run of steps of at most `max_num_batched_tokens` tokens (chunked prefill),
and a decode is a step of one token. When the KV pool runs dry, the most recently admitted running
sequences are preempted: their blocks are freed and they are recomputed from scratch later.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Protocol

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.kv.block_pool import BlockPool, blocks_needed


@dataclass
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last logits pick a new token."""
        return self.seq.num_computed_tokens + self.num_new_tokens == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The whole contract between the scheduler and the model runner for one step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)

    @property
    def num_tokens(self) -> int:
        return sum(c.num_new_tokens for c in self.chunks)

    @property
    def empty(self) -> bool:
        return not self.chunks


class AdapterSlots(Protocol):
    """Device slots for LoRA adapters, held by a sequence from admission to finish or preemption."""

    def acquire(self, seq: Sequence) -> bool:
        """Give `seq` a slot with its adapter (True for base-model requests); False if none is free."""
        ...

    def release(self, seq: Sequence) -> None: ...


class BaseModelOnly:
    def acquire(self, seq: Sequence) -> bool:
        return seq.adapter is None

    def release(self, seq: Sequence) -> None:
        pass


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, block_size: int,
                 adapters: AdapterSlots | None = None) -> None:
        self.config = config
        self.pool = pool
        self.block_size = block_size
        self.adapters = adapters or BaseModelOnly()
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []
        self.num_preemptions = 0

    def add(self, seq: Sequence) -> None:
        self.waiting.append(seq)

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> SchedulerOutput:
        out = SchedulerOutput()
        budget = self.config.max_num_batched_tokens
        for seq in list(self.running):
            if seq.status is not SequenceStatus.RUNNING or budget == 0:
                continue
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            if not self._reserve(seq, n, out.preempted):
                continue
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        waiting_for_slot: list[Sequence] = []
        while (self.waiting and budget > 0 and not out.preempted
               and len(self.running) < self.config.max_num_seqs):
            seq = self.waiting[0]
            n = min(seq.num_tokens - seq.num_computed_tokens, budget)
            need = blocks_needed(seq.num_computed_tokens + n, self.block_size) - len(seq.block_table)
            if need > self.pool.num_free:
                break
            self.waiting.popleft()
            if not self.adapters.acquire(seq):
                # Every slot holds another running adapter: let requests behind it that can run go first.
                waiting_for_slot.append(seq)
                continue
            seq.block_table += self.pool.allocate(need)
            seq.status = SequenceStatus.RUNNING
            self.running.append(seq)
            out.chunks.append(ScheduledChunk(seq, n))
            budget -= n
        self.waiting.extendleft(reversed(waiting_for_slot))
        # Single-token decodes first (the runner attends to them in one batched call), grouped by
        # adapter slot so each adapter's tokens form one segment for the LoRA ops.
        out.chunks.sort(key=lambda c: (c.num_new_tokens != 1, c.seq.lora_slot))
        return out

    def _reserve(self, seq: Sequence, n: int, preempted: list[Sequence]) -> bool:
        """Make room for `n` more tokens of `seq`, preempting the newest running sequences if needed."""
        need = blocks_needed(seq.num_computed_tokens + n, self.block_size) - len(seq.block_table)
        while need > self.pool.num_free:
            victim = self.running[-1]
            self._preempt(victim)
            preempted.append(victim)
            if victim is seq:
                return False
        seq.block_table += self.pool.allocate(need)
        return True

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self._release(seq)
        self.adapters.release(seq)
        seq.num_computed_tokens = 0
        seq.status = SequenceStatus.WAITING
        self.waiting.appendleft(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks to the pool."""
        if seq in self.running:
            self.running.remove(seq)
            self.adapters.release(seq)
        elif seq in self.waiting:
            self.waiting.remove(seq)
        self._release(seq)
        seq.status = SequenceStatus.FINISHED

    def _release(self, seq: Sequence) -> None:
        self.pool.free(seq.block_table)
        seq.block_table = []
