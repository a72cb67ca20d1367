"""Continuous batching: which sequences run this step, how many tokens each, within the budgets.

Every sequence is handled the same way: it has `num_tokens` known tokens of which
`num_computed_tokens` are in the KV cache, and a step computes the next `num_new_tokens` of them.
A prompt is therefore a run of steps of bounded chunks (chunked prefill), and a decode is a step of
one token. Running decodes are scheduled first, then running prompts' next chunks, then new requests,
so a long prompt never stalls the decodes. When the KV pool (or `max_batch_total_tokens`) runs dry,
sequences are preempted, parked ones first (their KV sits idle; see below), then the most recently
admitted running ones, never the senior (see Liveness): their blocks are freed and they are recomputed later (mostly from the prefix
cache).

Admission across adapters. Waiting requests sit in one FIFO queue per adapter (FCFS within an
adapter). Each admission picks, among the queues allowed to admit, the one with the fewest running
requests (ties: the oldest head request), so a hot adapter's backlog never delays another adapter's
requests for a seat. Only `max_active_adapters` distinct adapters (S, at most the device slots) run at
once; an adapter with waiting (or parked) requests and no slot stands in the *slot line*, a FIFO of
adapters, and slots only ever pass to the head of the line. A request whose adapter has no slot waits
without holding anyone back. A holder *expires* once it has held its slot for `adapter_cycle_steps`
steps (C), or for `adapter_cycle_time_s` seconds and at least C / 2 steps (rounded up): when steps are
slower than the cycle time, seconds alone would expire every holder at every step, and slots would pass
on (a park and a slot load each) at every step (F12). Slots pass on in three ways, all in favour of the head:

- *Parking* (the usual way). The head can start at once (it is parked, or it has a request waiting
  and a seat and KV blocks for its first chunk are free), and an expired holder *fits* it: its remaining work, the most steps its requests
  still need (its running requests' longest remaining output, plus its oldest waiting request's), is no
  more than the head's and more than C / 2. The fitting holder with the least remaining work is
  parked: its requests keep their KV blocks and seats but skip steps, its slot passes to the head, and
  it joins the back of the line; it resumes, with its adapter loaded into a slot again, when it reaches
  the head. Running the adapters with the most work left (longest remaining processing time first)
  finishes a fixed set of requests in the fewest steps: when more adapters have work than there are
  slots, the slots time-share among them every C steps and the batch stays large, where waiting for
  whole holders to finish leaves a tail of small batches. A holder with more work than the head (a
  hot adapter with a backlog) is never parked for it, and one about to finish (C / 2 steps or fewer)
  just finishes.
- *Rotation by preemption* (with prefix caching on, when the head cannot be served by parking). A holder
  that has held its slot for max(C, block size) steps, is only decoding with more than C tokens still to
  go, and runs no more requests than the head has waiting is preempted whole: that frees seats as well,
  keeps the batch as large, and costs each preempted request less than a block of recompute.
- *Draining*. When no holder fits the head (or the head has no room to start), expired holders admit no new
  requests; their running requests finish and the first slot that frees passes to the head. While
  parking serves the line, holders go on admitting: stopping them would only leave their waiting
  requests for a second wave.

Liveness: the senior. The *senior* is the unfinished request that arrived first (waiting, parked or
running). It is never parked (its adapter is no parking or rotation candidate) and never preempted: KV
and seat pressure take the newest other request. When it is not running at the start of a step, it is
started at once: its adapter gets a slot (parking the holder with the least work left while none is
free, which keeps that holder's KV), and if it is waiting it gets a seat (preempting the newest other
request when every seat is taken); its KV blocks come as its chunk is scheduled, preempting others.
It is scheduled first in its pass, and one token of the step's budget is held back for its prompt
chunk while the decodes are scheduled. So every step with an unfinished request runs at least one
token, the senior's. The one exception is a senior whose adapter cannot get a slot because the admin
API pinned adapters into every slot.

Completion bound. A request r added before step t finishes by step t + B(r) - 1, where
B(r) = sum over r and every request added before r and unfinished at that point of
(prompt tokens + max_new_tokens - 1). Proof: a request computes at most prompt + max_new_tokens - 1
tokens in the KV cache from scratch (the last sampled token is never computed); as senior it is never
preempted, so that is also the most it has left when it becomes senior, and it computes at least one
each step: it is senior for at most that many steps. Requests added after r never become senior before
r finishes, so the seniors from t on are the older unfinished requests, each finishing before the
next becomes senior, then r. The scheduler's tests check this bound on random workloads
(tests/engine/test_scheduler_liveness.py). It is a worst case for liveness; parking and the line
below give the usual latencies.

Starvation bound (first slot). Let R be the most steps an admitted request runs (prefill chunks + max_new_tokens,
absent preemption and parking). While an adapter stands in the line, every window of C + R steps passes
each of the S slots to the head at least once: within C steps every holder has expired, and then either
one that fits the head is parked, or, none fitting, all drain and finish within R. So an adapter p-th in
the line (0-based) gets a slot within ceil((p + 1) / S)·(C + R) steps. With no running requests of its
own it is then first in the fewest-running order, so its oldest request is admitted at the next free
seat (within R more steps when all `max_num_seqs` seats are busy with unparked requests), given KV
blocks for it. Base-model requests need no slot and only wait for a seat.
"""

from __future__ import annotations

import itertools
import operator
import time
from collections import Counter, OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

from loraplex.config import SchedulerConfig
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.engine.speculative import Drafter
from loraplex.kv.block_pool import BlockPool, blocks_needed
from loraplex.kv.prefix_hash import extend_block_hashes

if TYPE_CHECKING:
    from loraplex.adapters.ref import AdapterIdentity


_ARRIVAL = operator.attrgetter("arrival")


@dataclass(slots=True)
class ScheduledChunk:
    seq: Sequence
    num_new_tokens: int
    drafts: list[int] = field(default_factory=list)
    """Speculative decoding: the draft tokens after the sequence's last token that this chunk verifies
    (its `num_new_tokens` count them); the step samples at each of its positions."""

    @property
    def start(self) -> int:
        return self.seq.num_computed_tokens

    @property
    def samples(self) -> bool:
        """Whether this chunk reaches the end of the known tokens, so its last logits pick a new token (with
        drafts: it reaches them, and every position picks one)."""
        return self.seq.num_computed_tokens + self.num_new_tokens - len(self.drafts) == self.seq.num_tokens


@dataclass
class SchedulerOutput:
    """The whole contract between the scheduler and the model runner for one step."""

    chunks: list[ScheduledChunk] = field(default_factory=list)
    preempted: list[Sequence] = field(default_factory=list)
    num_drafts: int = 0
    """Draft tokens the chunks verify (speculative decoding)."""

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


@dataclass
class _StepBudget:
    tokens: int
    prefill: int
    held: int
    """Tokens the running sequences will hold in the KV cache after this step."""
    held_cap: int | None

    def take(self, seq: Sequence, n: int, sign: int = 1) -> None:
        self.tokens -= sign * n
        if not seq.is_decode:
            self.prefill -= sign * n
        self.held += sign * n


class Scheduler:
    def __init__(self, config: SchedulerConfig, pool: BlockPool, block_size: int,
                 adapters: AdapterSlots | None = None, num_slots: int | None = 0,
                 enable_prefix_caching: bool = False, clock: Callable[[], float] = time.monotonic,
                 drafter: Drafter | None = None) -> None:
        """`num_slots`: the device slots behind `adapters` (None: unknown, `acquire` alone decides).
        `clock`: seconds for `adapter_cycle_time_s` (tests pass a fake one). `drafter`: proposes drafts for
        decoding requests (speculative decoding) in steps of at most `speculative_max_batch` requests."""
        self.config = config
        self.drafter = drafter
        self.clock = clock
        self.pool = pool
        self.block_size = block_size
        self.adapters = adapters or BaseModelOnly()
        limits = [n for n in (config.max_active_adapters, num_slots) if n is not None]
        self.max_active_adapters: int | None = min(limits) if limits else None
        self.enable_prefix_caching = enable_prefix_caching
        self.running: list[Sequence] = []
        self.num_preemptions = 0
        self.num_rotations = 0
        """Slot holders preempted whole to pass their slot on (their requests count as preemptions too)."""
        self.num_parks = 0
        """Slot holders parked to pass their slot on (module docstring)."""
        self.prefix_cache_queries = 0
        """Tokens admitted sequences needed in the KV cache (each admission, resumptions included)."""
        self.prefix_cache_hits = 0
        """Of those, tokens found in the prefix cache instead of computed."""
        self._queues: dict[AdapterIdentity | None, deque[Sequence]] = {}  # non-empty ones only
        self._num_running: Counter[AdapterIdentity | None] = Counter()
        self._tenure: dict[AdapterIdentity, tuple[int, float]] = {}  # slot holders: (step, time) they got it
        self._draining = False  # this step, expired holders admit nothing (so that a slot frees)
        self._slot_line: OrderedDict[AdapterIdentity, None] = OrderedDict()
        self._arrivals = itertools.count()
        self._step = 0
        self._senior: Sequence | None = None  # this step's (module docstring: liveness)

    def add(self, seq: Sequence) -> None:
        seq.arrival = next(self._arrivals)
        self._enqueue(seq)

    @property
    def waiting(self) -> list[Sequence]:
        """Every waiting sequence, in arrival order."""
        # Copies taken in one C call each, so a metrics thread may read this while the step loop runs.
        queues = list(self._queues.values())
        return sorted((s for q in queues for s in list(q)), key=lambda s: s.arrival)

    @property
    def num_waiting(self) -> int:
        return sum(len(q) for q in list(self._queues.values()))

    @property
    def num_steps(self) -> int:
        """Steps scheduled so far (empty ones included)."""
        return self._step

    @property
    def num_parked(self) -> int:
        """Admitted requests skipping steps while their adapter waits for a slot (module docstring)."""
        return sum(1 for s in list(self.running) if s.status is SequenceStatus.PARKED)

    @property
    def active_adapters(self) -> list[AdapterIdentity]:
        """Adapters with running requests, each holding a device slot."""
        return list(self._tenure)

    def has_work(self) -> bool:
        return bool(self._queues or self.running)

    def schedule(self) -> SchedulerOutput:
        self._step += 1
        if self.enable_prefix_caching:
            bs = self.block_size
            for seq in self.running:
                if seq.num_computed_tokens // bs > seq.num_cached_blocks:
                    self._cache_computed_blocks(seq)
        out = SchedulerOutput()
        budget = _StepBudget(self.config.max_num_batched_tokens, self.config.prefill_token_budget,
                             sum(s.num_computed_tokens for s in self.running), self.config.max_batch_total_tokens)
        senior = self._senior = self._find_senior()
        if senior is not None and senior.status is not SequenceStatus.RUNNING:
            self._start_senior(senior, out, budget)
        self._rotate(out, budget)
        rotated = len(out.preempted)
        # The senior's prompt chunk gets at least one token however many decodes run (module docstring).
        held_back = int(senior is not None and senior.status is SequenceStatus.RUNNING and not senior.is_decode)
        budget.tokens -= held_back
        budget.prefill -= held_back
        order = list(self.running)
        if senior is not None and senior.status is SequenceStatus.RUNNING:  # the senior first in its pass
            order.remove(senior)
            order.insert(0, senior)
        prompts = self._schedule_decodes(order, out, budget)
        budget.tokens += held_back
        budget.prefill += held_back
        for seq in prompts:
            if seq.status is not SequenceStatus.RUNNING or seq.is_decode:
                continue  # preempted earlier in this step, or a decode (scheduled above)
            n = self._chunk_size(seq, seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 0 and self._reserve(seq, n, out, budget):
                out.chunks.append(ScheduledChunk(seq, n))
                budget.take(seq, n)
        if len(out.preempted) == rotated:  # after a KV preemption there is no room to spare for newcomers
            self._admit(out, budget)
        # Single-token decodes first (the runner attends to them in one batched call), grouped by
        # adapter slot so each adapter's tokens form one segment for the LoRA ops.
        out.chunks.sort(key=lambda c: (c.num_new_tokens != 1, c.seq.lora_slot))
        return out

    def _schedule_decodes(self, order: list[Sequence], out: SchedulerOutput, budget: _StepBudget) -> list[Sequence]:
        """One token for each running decode in `order`, as `_chunk_size` and `_reserve` would give it, with
        the common case (a token budget left, no new block needed, under the cap) done inline: this loop
        runs for every running request at every step. Returns the running prompts, in order, for the
        prompt pass."""
        bs, running, cap = self.block_size, SequenceStatus.RUNNING, budget.held_cap
        chunks = out.chunks
        prompts: list[Sequence] = []
        drafter = self.drafter if len(self.running) <= self.config.speculative_max_batch else None
        for seq in order:
            if seq.status is not running:
                continue
            computed = seq.num_computed_tokens
            if not seq.output_token_ids or computed != len(seq.prompt_token_ids) + len(seq.output_token_ids) - 1:
                prompts.append(seq)  # not a decode: the prompt pass takes it
                continue
            if seq.unread and len(seq.output_token_ids) >= seq.max_output:
                continue  # its last token is sampled, only not read yet (async scheduling): it ends there
            if budget.tokens <= 0:
                continue
            if drafter is not None and self._speculate(seq, drafter, out, budget):
                continue
            # Mid-block, the token's slot is in a block it holds; only a block boundary or the cap needs `_reserve`.
            if (computed % bs == 0 or (cap is not None and budget.held + 1 > cap)) and not self._reserve(
                    seq, 1, out, budget):
                continue
            chunks.append(ScheduledChunk(seq, 1))
            budget.tokens -= 1
            budget.held += 1
        return prompts

    def _speculate(self, seq: Sequence, drafter: Drafter, out: SchedulerOutput, budget: _StepBudget) -> bool:
        """Schedule decoding `seq` with drafts, if it has any and they fit: the step's token budget, the
        free KV blocks (drafts never preempt anyone) and the cap; False leaves it to the plain decode."""
        limit = min(budget.tokens - 1, seq.max_output - len(seq.output_token_ids) - 1)
        if budget.held_cap is not None:
            limit = min(limit, budget.held_cap - budget.held - 1)
        drafts = drafter.propose(seq, limit) if limit > 0 else []
        if not drafts:
            return False
        n = 1 + len(drafts)
        need = blocks_needed(seq.num_computed_tokens + n, self.block_size) - len(seq.block_table)
        if need > self.pool.num_free:
            return False
        if need > 0:
            seq.block_table += self.pool.allocate(need)
        out.chunks.append(ScheduledChunk(seq, n, drafts))
        out.num_drafts += len(drafts)
        budget.tokens -= n
        budget.held += n
        return True

    def trim(self, seq: Sequence) -> None:
        """Return the blocks `seq` holds beyond its computed tokens (ones allocated for drafts that were
        rejected) to the pool, as a new table list (loraplex/model/decode_rows.py relies on tables only
        growing in place)."""
        keep = blocks_needed(seq.num_computed_tokens, self.block_size)
        if len(seq.block_table) > keep:
            extra = seq.block_table[keep:]
            seq.block_table = seq.block_table[:keep]
            self.pool.free(reversed(extra))

    def _find_senior(self) -> Sequence | None:
        """The unfinished request that arrived first (each queue is in arrival order)."""
        heads = [q[0] for q in self._queues.values()]
        return min(itertools.chain(self.running, heads), key=_ARRIVAL, default=None)

    def _start_senior(self, senior: Sequence, out: SchedulerOutput, budget: _StepBudget) -> None:
        """Make the senior (parked or waiting) run this step: its adapter gets a slot, holders with the least
        work left being parked until one is free; a waiting senior gets a seat, the newest other request
        being preempted when none is free. Its KV blocks come as its chunk is scheduled (`_reserve`)."""
        key, waiting = senior.adapter, senior.status is SequenceStatus.WAITING
        if waiting:
            while len(self.running) >= self.config.max_num_seqs:
                victim = self._victim()
                if victim is None:
                    return
                self._preempt(victim, out, budget)
        running = self._running_by_adapter()
        resumed = key is None or not self._is_parked(key) or self._make_room(
            key, lambda: self._resume(key, running[key]), running)
        if not resumed or not waiting:
            return
        if key is None or key in self._tenure:
            acquired = self.adapters.acquire(senior)
        else:
            acquired = self._make_room(key, lambda: self.adapters.acquire(senior), running)
        if acquired:
            self._start(senior, self._cached_prefix(senior), budget)

    def _make_room(self, key: AdapterIdentity, take: Callable[[], bool],
                   running: dict[AdapterIdentity | None, list[Sequence]]) -> bool:
        """Call `take` (which gives `key` a device slot) once `key` fits under the active-adapter limit,
        parking the holder with the least work left while it does not succeed; False if it never does (every
        slot pinned by the admin API)."""
        limit = self.max_active_adapters
        while True:
            if (limit is None or len(self._tenure) < limit) and take():
                return True
            holders = [k for k in self._tenure if k != key]
            if not holders:
                return False
            holder = min(holders, key=lambda k: (self._remaining(k, running[k]), self._num_running[k]))
            self._park(holder, running[holder])

    def _victim(self) -> Sequence | None:
        """Whom KV or seat pressure preempts: the newest parked request (its KV sits idle), else the newest
        running one; never the senior."""
        others = [s for s in reversed(self.running) if s is not self._senior]
        return next((s for s in others if s.status is SequenceStatus.PARKED), others[0] if others else None)

    def _rotate(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        """Pass slots along the slot line: parked adapters the free slots reach resume; then expired
        holders are parked (or, failing that, preempted whole) for the line's head while that helps it.
        Sets `_draining` when the head can get a slot only by a holder finishing (module docstring)."""
        self._draining = False
        limit = self.max_active_adapters
        if limit is None or not self._slot_line:
            return
        running = self._running_by_adapter()
        for key in list(itertools.islice(self._slot_line, max(limit - len(self._tenure), 0))):
            if self._is_parked(key):
                self._resume(key, running[key])
        if not self._tenure:  # only parked requests could run: never let the line stall
            next((k for k in self._slot_line if self._is_parked(k) and self._resume(k, running[k])), None)
        unseated = list(itertools.islice(self._slot_line, max(limit - len(self._tenure), 0), None))
        if not unseated:
            return
        remaining = {k: self._remaining(k, running.get(k, [])) for k in (*self._tenure, *unseated)}
        cycle = self.config.adapter_cycle_steps
        # Holders that may be parked, expired or not yet: least work left first, then fewest running. The
        # senior's adapter is neither parked nor preempted (module docstring: liveness).
        senior = self._senior.adapter if self._senior is not None else None
        candidates = sorted((k for k in self._tenure if remaining[k] > cycle // 2 and k != senior),
                            key=lambda k: (remaining[k], self._num_running[k], self._tenure[k][0]))
        preemptable = sorted((k for k in self._tenure if self.enable_prefix_caching and k != senior
                              and self._may_preempt(k, running[k])),
                             key=lambda k: (self._num_running[k], self._tenure[k][0]))
        seats = self.config.max_num_seqs - len(self.running)
        free_blocks = self.pool.num_free
        for head in unseated:
            parked = self._is_parked(head)
            # A waiting request of the head also needs a seat and KV blocks for its first chunk.
            first = 0 if parked else self._first_chunk_blocks(self._queues[head][0])
            can_start = parked or (seats > 0 and first <= free_blocks)
            fits = [k for k in candidates if remaining[k] <= remaining[head]] if can_start else []
            holder = next((k for k in fits if self._expired(k)), None)
            if holder is not None:
                candidates.remove(holder)
                if holder in preemptable:
                    preemptable.remove(holder)
                self._park(holder, running[holder])
                if not parked:
                    seats -= 1
                    free_blocks -= first
                elif not self._resume(head, running[head]):
                    return
                continue
            if not parked and preemptable and self._num_running[preemptable[0]] <= len(self._queues[head]):
                holder = preemptable.pop(0)  # holders are sorted by running count: the least shrinking
                if holder in candidates:
                    candidates.remove(holder)
                for seq in running[holder]:
                    self._preempt(seq, out, budget)
                seats += len(running[holder])
                free_blocks = self.pool.num_free
                self.num_rotations += 1
                continue
            # Not served this step. A holder that fits expires within a cycle and is parked then; if
            # none does, the head waits for a holder to finish: expired holders stop admitting.
            self._draining = not fits
            return

    def _first_chunk_blocks(self, seq: Sequence) -> int:
        """Free blocks admitting waiting `seq` takes: its first chunk's new blocks, and its cached prefix
        blocks that nobody holds (they leave the free count as it shares them)."""
        hits = self._cached_prefix(seq)
        n = min(seq.num_tokens - len(hits) * self.block_size, self.config.prefill_token_budget)
        reclaimed = sum(1 for b in hits if self.pool.refs(b) == 0)
        return blocks_needed(len(hits) * self.block_size + n, self.block_size) - len(hits) + reclaimed

    def _running_by_adapter(self) -> dict[AdapterIdentity | None, list[Sequence]]:
        running: dict[AdapterIdentity | None, list[Sequence]] = {}
        for seq in self.running:
            running.setdefault(seq.adapter, []).append(seq)
        return running

    def _remaining(self, key: AdapterIdentity, mine: list[Sequence]) -> int:
        """The most steps `key` still needs a slot for: its running (or parked) requests' longest remaining
        output, plus its oldest waiting request's."""
        left = max((s.params.max_new_tokens - len(s.output_token_ids) for s in mine), default=0)
        queue = self._queues.get(key)
        return left + (queue[0].params.max_new_tokens if queue else 0)

    def _is_parked(self, key: AdapterIdentity | None) -> bool:
        """Whether `key` has admitted requests but no slot: they are parked."""
        return key is not None and key in self._num_running and key not in self._tenure

    def _park(self, key: AdapterIdentity, mine: list[Sequence]) -> None:
        """Take `key`'s slot and pause its running requests `mine` (they keep KV blocks and seats); it joins
        the back of the slot line."""
        for seq in mine:
            self.adapters.release(seq)
            seq.status = SequenceStatus.PARKED
        del self._tenure[key]
        self._slot_line[key] = None
        self.num_parks += 1

    def _resume(self, key: AdapterIdentity, mine: list[Sequence]) -> bool:
        """Give a parked adapter (its requests `mine`) a free slot again, its requests running from this step
        on; False (still parked) when no slot could be had (one may be pinned)."""
        for i, seq in enumerate(mine):
            if not self.adapters.acquire(seq):
                for got in mine[:i]:
                    self.adapters.release(got)
                return False
        for seq in mine:
            seq.status = SequenceStatus.RUNNING
        self._slot_line.pop(key, None)
        self._tenure[key] = (self._step, self.clock())
        return True

    def _chunk_size(self, seq: Sequence, remaining: int, budget: _StepBudget) -> int:
        n = min(remaining, budget.tokens)
        if not seq.is_decode:
            n = min(n, budget.prefill)
        if budget.held_cap is not None and n > 1:
            n = min(n, max(budget.held_cap - budget.held, 1))  # at least 1: preempting makes room for it
        return n

    def _reserve(self, seq: Sequence, n: int, out: SchedulerOutput, budget: _StepBudget) -> bool:
        """Make room for `n` more tokens of `seq`, preempting if needed (`_victim`)."""
        while True:
            need = blocks_needed(seq.num_computed_tokens + n, self.block_size) - len(seq.block_table)
            over_cap = budget.held_cap is not None and budget.held + n > budget.held_cap
            if need <= self.pool.num_free and not over_cap:
                break
            victim = self._victim()
            if victim is None:  # the senior alone: it fits the pool and the cap (the engine's admission checks)
                return False
            self._preempt(victim, out, budget)
            if victim is seq:
                return False
        seq.block_table += self.pool.allocate(need)
        return True

    def _admit(self, out: SchedulerOutput, budget: _StepBudget) -> None:
        refused: set[AdapterIdentity | None] = set()  # adapters whose slot request failed this step
        while (budget.tokens > 0 and budget.prefill > 0 and len(self.running) < self.config.max_num_seqs):
            seq = self._pick(refused)
            if seq is None:
                return
            hits = self._cached_prefix(seq)
            cached = len(hits) * self.block_size
            n = min(seq.num_tokens - cached, budget.tokens, budget.prefill)
            if budget.held_cap is not None:
                n = min(n, budget.held_cap - budget.held - cached)
            need = blocks_needed(cached + n, self.block_size) - len(hits)
            reclaimed = sum(1 for b in hits if self.pool.refs(b) == 0)  # cached-free hits leave the free count
            if n <= 0 or need + reclaimed > self.pool.num_free:
                return  # the pick waits for room; admitting others past it could starve a long prompt
            if not self.adapters.acquire(seq):
                refused.add(seq.adapter)
                continue
            self._start(seq, hits, budget)
            seq.block_table += self.pool.allocate(need)
            out.chunks.append(ScheduledChunk(seq, n))
            budget.take(seq, n)

    def _start(self, seq: Sequence, hits: list[int], budget: _StepBudget) -> None:
        """Admit waiting `seq` (its slot acquired) with the cached blocks `hits` as its first blocks."""
        self._dequeue(seq)
        self.pool.share(hits)
        seq.block_table = list(hits)
        seq.num_computed_tokens = len(hits) * self.block_size
        seq.num_cached_blocks = len(hits)
        self.prefix_cache_queries += seq.num_tokens
        self.prefix_cache_hits += seq.num_computed_tokens
        seq.status = SequenceStatus.RUNNING
        self.running.append(seq)
        self._on_start(seq.adapter)
        budget.held += seq.num_computed_tokens

    def _pick(self, refused: set[AdapterIdentity | None]) -> Sequence | None:
        """The head of the queue allowed to admit with the fewest running requests (then the oldest)."""
        limit = self.max_active_adapters
        free_slots = len(self._slot_line) if limit is None else limit - len(self._tenure)
        draining = self._draining and free_slots <= 0
        allowed: list[AdapterIdentity | None] = [k for k in self._tenure if k in self._queues
                                            and not (draining and self._expired(k))]
        allowed += (k for k in itertools.islice(self._slot_line, max(free_slots, 0)) if not self._is_parked(k))
        if None in self._queues:
            allowed.append(None)
        allowed = [k for k in allowed if k not in refused]
        if not allowed:
            return None
        key = min(allowed, key=lambda k: (self._num_running[k], self._queues[k][0].arrival))
        return self._queues[key][0]

    def _may_preempt(self, key: AdapterIdentity, mine: list[Sequence]) -> bool:
        """Whether rotation may preempt this holder (running `mine`): it has held its slot
        `adapter_cycle_steps` steps and at least a block's worth, and every request of it is decoding, so
        the full blocks it computed are in the prefix cache and a resumption recomputes less than one
        block per request: no livelock."""
        if self._step - self._tenure[key][0] < max(self.config.adapter_cycle_steps, self.block_size):
            return False
        # One about to finish frees its slot within a cycle anyway: preempting it would only add recompute.
        return (all(s.is_decode for s in mine)
                and max(s.params.max_new_tokens - len(s.output_token_ids) for s in mine)
                > self.config.adapter_cycle_steps)

    def _expired(self, key: AdapterIdentity) -> bool:
        step, start = self._tenure[key]
        held, cycle = self._step - step, self.config.adapter_cycle_steps
        # Seconds count only after half a cycle of steps: when steps are slower than the cycle time, expiring
        # by time alone would park every holder at every step, each step a slot load per adapter (F12).
        return held >= cycle or (held >= (cycle + 1) // 2 and self.clock() - start >= self.config.adapter_cycle_time_s)

    def _cached_prefix(self, seq: Sequence) -> list[int]:
        """Blocks of the longest cached prefix of `seq`, leaving at least its last token to compute (its
        logits pick the next token)."""
        if not self.enable_prefix_caching or seq.computes_prompt_logprobs:
            return []  # cached positions are never run, and prompt logprobs need every one
        num_blocks = (seq.num_tokens - 1) // self.block_size
        return self.pool.lookup(self._block_hashes(seq, num_blocks))

    def _block_hashes(self, seq: Sequence, num_blocks: int) -> list[bytes]:
        if len(seq.block_hashes) < num_blocks:
            extend_block_hashes(seq.block_hashes, seq.tokens, num_blocks, self.block_size, seq.adapter)
        return seq.block_hashes[:num_blocks]

    def _cache_computed_blocks(self, seq: Sequence) -> None:
        """Register the full blocks whose KV is now computed, so later requests can share them."""
        full = seq.num_computed_tokens // self.block_size
        if not self.enable_prefix_caching or full <= seq.num_cached_blocks:
            return
        hashes = self._block_hashes(seq, full)
        for i in range(seq.num_cached_blocks, full):
            self.pool.cache(seq.block_table[i], hashes[i])
        seq.num_cached_blocks = full

    def _preempt(self, seq: Sequence, out: SchedulerOutput, budget: _StepBudget) -> None:
        for chunk in out.chunks:
            if chunk.seq is seq:  # scheduled earlier this step: give its tokens back
                out.chunks.remove(chunk)
                budget.take(seq, chunk.num_new_tokens, sign=-1)
                break
        budget.held -= seq.num_computed_tokens
        self._stop_running(seq)
        seq.status = SequenceStatus.WAITING
        self._enqueue(seq)
        out.preempted.append(seq)
        self.num_preemptions += 1

    def finish(self, seq: Sequence) -> None:
        """Remove a finished or aborted sequence and return its blocks to the pool."""
        if seq in self.running:
            self._stop_running(seq)
        else:
            self._dequeue(seq)
        seq.status = SequenceStatus.FINISHED

    def _stop_running(self, seq: Sequence) -> None:
        """Take `seq` out of the running set: its computed full blocks go to the prefix cache, every block
        back to the pool, and its adapter's slot is released (the slot passes on when it was the last)."""
        self._cache_computed_blocks(seq)
        self.running.remove(seq)
        if seq.status is not SequenceStatus.PARKED:  # a parked one gave its slot back when parked
            self.adapters.release(seq)
        self.pool.free(reversed(seq.block_table))
        seq.block_table = []
        seq.num_computed_tokens = 0
        seq.num_cached_blocks = 0
        key = seq.adapter
        self._num_running[key] -= 1
        if self._num_running[key] == 0:
            del self._num_running[key]
            if key is not None:
                self._tenure.pop(key, None)
                if key in self._queues:
                    self._slot_line[key] = None
                else:
                    self._slot_line.pop(key, None)

    def _on_start(self, key: AdapterIdentity | None) -> None:
        if key is not None and key not in self._tenure:
            assert not self._is_parked(key), "a parked adapter resumes before it admits"
            self._tenure[key] = (self._step, self.clock())
            self._slot_line.pop(key, None)
        self._num_running[key] += 1

    def _enqueue(self, seq: Sequence) -> None:
        key = seq.adapter
        queue = self._queues.setdefault(key, deque())
        # FCFS by arrival: a preempted sequence goes back ahead of later arrivals of its adapter.
        i = len(queue)
        while i > 0 and queue[i - 1].arrival > seq.arrival:
            i -= 1
        queue.insert(i, seq)
        if key is not None and key not in self._tenure:
            self._slot_line.setdefault(key, None)

    def _dequeue(self, seq: Sequence) -> None:
        key = seq.adapter
        queue = self._queues.get(key)
        if queue is None or seq not in queue:
            return
        queue.remove(seq)
        if not queue:
            del self._queues[key]
            if key is not None and not self._is_parked(key):
                self._slot_line.pop(key, None)
