"""The scheduler alone, with fake slots and a fake runner: budgets hold on random workloads, the KV each
step reads is the KV of its own prefix (prefix sharing included), FCFS within an adapter, the
active-adapter limit, and the starvation bound of the module docstring."""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass, field

import pytest

from loraplex.adapters.ref import AdapterIdentity
from loraplex.config import SchedulerConfig
from loraplex.engine.request import SamplingParams
from loraplex.engine.scheduler import Scheduler, SchedulerOutput
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.kv.block_pool import BlockPool, blocks_needed

BLOCK = 4


def key(name: str) -> AdapterIdentity:
    return AdapterIdentity("local", f"/adapters/{name}", "hash-" + name)


class FakeSlots:
    """Device slots as LoRAManager hands them out: a resident adapter is shared, a new one needs a free slot."""

    def __init__(self, num_slots: int) -> None:
        self.num_slots = num_slots
        self.refs: dict[AdapterIdentity, int] = {}
        self.most_resident = 0

    def acquire(self, seq: Sequence) -> bool:
        if seq.adapter is None:
            return True
        if seq.adapter not in self.refs and len(self.refs) == self.num_slots:
            return False
        self.refs[seq.adapter] = self.refs.get(seq.adapter, 0) + 1
        seq.lora_slot = sorted(self.refs, key=str).index(seq.adapter)
        self.most_resident = max(self.most_resident, len(self.refs))
        return True

    def release(self, seq: Sequence) -> None:
        if seq.adapter is None:
            return
        self.refs[seq.adapter] -= 1
        if self.refs[seq.adapter] == 0:
            del self.refs[seq.adapter]
        seq.lora_slot = -1


@dataclass
class FakeRunner:
    """Advances sequences as the engine does. Its KV cache stores, per slot, the identity of what was
    computed there (adapter + every token up to that position), so a step that reads wrong KV shows."""

    sched: Scheduler
    kv: dict[tuple[int, int], tuple] = field(default_factory=dict)
    finished: list[Sequence] = field(default_factory=list)

    def step(self, out: SchedulerOutput) -> None:
        sampled = [c for c in out.chunks if c.samples]
        for chunk in out.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_new_tokens
            tokens = seq.tokens(0, start + n)
            for p in range(start, start + n):
                block = seq.block_table[p // BLOCK]
                # Written slots belong to this sequence alone: a shared (cached) block is never written.
                assert self.sched.pool.refs(block) == 1, f"write into shared block {block}"
                self.kv[block, p % BLOCK] = (seq.adapter, tuple(tokens[:p + 1]))
            for p in range(start + n):
                assert self.kv.get((seq.block_table[p // BLOCK], p % BLOCK)) == (seq.adapter, tuple(tokens[:p + 1]))
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
        for chunk in sampled:
            seq = chunk.seq
            # The "model": the next token depends on adapter and history, as a real one's does.
            seq.output_token_ids.append(hash((seq.adapter, tuple(seq.tokens(0, seq.num_tokens)))) % 7)
            if len(seq.output_token_ids) >= seq.params.max_new_tokens:
                self.sched.finish(seq)
                self.finished.append(seq)


def make_seq(request_id: str, prompt: list[int], max_new_tokens: int, adapter: AdapterIdentity | None) -> Sequence:
    seq = Sequence(request_id, prompt, SamplingParams(max_new_tokens=max_new_tokens), 0)
    seq.adapter = adapter
    return seq


def make_scheduler(config: SchedulerConfig, num_blocks: int, num_slots: int,
                   prefix_caching: bool = True) -> tuple[Scheduler, FakeSlots]:
    slots = FakeSlots(num_slots)
    return Scheduler(config, BlockPool(num_blocks), BLOCK, slots, num_slots, prefix_caching), slots


def check_step(sched: Scheduler, slots: FakeSlots, out: SchedulerOutput) -> None:
    """Every budget and limit of one scheduled step, and the pool's reference counts."""
    cfg = sched.config
    assert out.num_tokens <= cfg.max_num_batched_tokens
    prefill = sum(c.num_new_tokens for c in out.chunks if not c.seq.is_decode)
    assert prefill <= (cfg.max_batch_prefill_tokens or cfg.max_num_batched_tokens)
    assert len(sched.running) <= cfg.max_num_seqs
    held = sum(s.num_computed_tokens for s in sched.running) + out.num_tokens
    if cfg.max_batch_total_tokens is not None:
        assert held <= cfg.max_batch_total_tokens
    running = [s for s in sched.running if s.status is SequenceStatus.RUNNING]
    active = {s.adapter for s in running if s.adapter is not None}
    assert len(active) <= sched.max_active_adapters and len(slots.refs) <= sched.max_active_adapters
    # Running adapter requests hold a slot with their adapter; parked ones hold none (but keep their KV).
    assert all(s.lora_slot >= 0 for s in running if s.adapter is not None)
    parked = [s for s in sched.running if s.status is SequenceStatus.PARKED]
    assert all(s.lora_slot == -1 for s in parked) and not {s.adapter for s in parked} & active
    assert len({id(c.seq) for c in out.chunks}) == len(out.chunks)
    for chunk in out.chunks:
        assert chunk.seq.status is SequenceStatus.RUNNING and chunk.num_new_tokens > 0
        assert len(chunk.seq.block_table) >= blocks_needed(chunk.start + chunk.num_new_tokens, BLOCK)
    assert not {id(s) for s in out.preempted} & {id(c.seq) for c in out.chunks}
    holders: dict[int, int] = {}
    for seq in sched.running:
        for b in seq.block_table:
            holders[b] = holders.get(b, 0) + 1
    pool = sched.pool
    assert all(pool.refs(b) == holders.get(b, 0) for b in range(pool.num_blocks))
    assert pool.num_free == sum(1 for b in range(pool.num_blocks) if pool.refs(b) == 0)


@pytest.mark.parametrize("seed", range(12))
def test_budgets_and_limits_hold_on_random_workloads(seed):
    rng = random.Random(seed)
    num_slots = rng.randint(1, 4)
    max_total = 48  # longest request, prompt + new tokens
    config = SchedulerConfig(
        max_num_seqs=rng.randint(1, 12), max_num_batched_tokens=rng.randint(4, 64),
        max_batch_prefill_tokens=rng.choice([None, rng.randint(1, 32)]),
        max_batch_total_tokens=rng.choice([None, rng.randint(max_total, 200)]),
        max_active_adapters=rng.choice([None, rng.randint(1, num_slots)]), adapter_cycle_steps=rng.randint(1, 20))
    num_blocks = rng.randint(blocks_needed(max_total, BLOCK), 60)
    sched, slots = make_scheduler(config, num_blocks, num_slots, prefix_caching=rng.random() < 0.8)
    runner = FakeRunner(sched)
    adapters = [None] + [key(f"a{i}") for i in range(6)]
    stems = [[rng.randrange(100) for _ in range(24)] for _ in range(3)]  # shared prefixes
    pending = []
    for i in range(60):
        prompt_len = rng.randint(1, 32)
        prompt = (rng.choice(stems)[:prompt_len] if rng.random() < 0.5
                  else [rng.randrange(100) for _ in range(prompt_len)])
        pending.append(make_seq(f"r{i}", prompt, rng.randint(1, max_total - prompt_len), rng.choice(adapters)))
    added: list[Sequence] = []
    first_start: dict[str, int] = {}
    aborted = set()
    for step in range(3000):
        for _ in range(rng.randrange(4)):
            if pending:
                added.append(pending.pop(0))
                sched.add(added[-1])
        if rng.random() < 0.03 and added:
            victim = rng.choice(added)
            if victim.status is not SequenceStatus.FINISHED:
                sched.finish(victim)
                aborted.add(victim.request_id)
        out = sched.schedule()
        check_step(sched, slots, out)
        for chunk in out.chunks:
            first_start.setdefault(chunk.seq.request_id, step)
        runner.step(out)
        if not pending and not sched.has_work():
            break
    else:
        pytest.fail("the workload did not finish: the scheduler stalled")
    assert len(runner.finished) + len(aborted) == 60
    assert all(len(s.output_token_ids) == s.params.max_new_tokens for s in runner.finished)
    assert sched.pool.num_free == num_blocks and not slots.refs
    for adapter in adapters:  # FCFS within an adapter
        started = [s for s in added if s.adapter == adapter and s.request_id in first_start]
        assert [s.arrival for s in sorted(started, key=lambda s: (first_start[s.request_id], s.arrival))] == \
            sorted(s.arrival for s in started)


def test_prefix_sharing_is_per_adapter_and_counted():
    sched, slots = make_scheduler(SchedulerConfig(), num_blocks=64, num_slots=2)
    runner = FakeRunner(sched)
    prompt = list(range(1, 19))  # 4 full blocks + 2 tokens
    for request_id, adapter in [("a1", key("a")), ("a2", key("a")), ("b1", key("b")), ("base", None)]:
        sched.add(make_seq(request_id, prompt, 3, adapter))
        hits = sched.prefix_cache_hits
        while sched.has_work():
            runner.step(sched.schedule())
        # Only the second request of adapter a finds its prompt: 4 full blocks = 16 tokens.
        assert sched.prefix_cache_hits - hits == (16 if request_id == "a2" else 0), request_id
    assert sched.prefix_cache_queries == 4 * 18
    assert sched.pool.num_free == 64 and sched.pool.num_cached_free > 0


def test_whole_prompt_cached_still_computes_its_last_token():
    sched, slots = make_scheduler(SchedulerConfig(), num_blocks=16, num_slots=1)
    runner = FakeRunner(sched)
    for i in range(2):
        sched.add(make_seq(f"r{i}", list(range(8)), 2, None))  # exactly two full blocks
        while sched.has_work():
            out = sched.schedule()
            if i == 1 and out.chunks and not out.chunks[0].seq.output_token_ids:
                # Block 0 comes from the cache; block 1 would hold token 7, which must be computed.
                assert (out.chunks[0].start, out.chunks[0].num_new_tokens) == (4, 4)
            runner.step(out)
    assert sched.prefix_cache_hits == 4


def test_active_adapter_limit_below_the_slot_count():
    config = SchedulerConfig(max_active_adapters=2, adapter_cycle_steps=4)
    sched, slots = make_scheduler(config, num_blocks=200, num_slots=4)
    runner = FakeRunner(sched)
    for i in range(30):
        sched.add(make_seq(f"r{i}", [i, i + 1, i + 2], 5, key(f"a{i % 6}")))
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        runner.step(out)
    assert slots.most_resident == 2 and len(runner.finished) == 30


def run_until_started(sched: Scheduler, runner: FakeRunner, watched: list[Sequence], max_steps: int,
                      arrivals: dict[int, list[Sequence]] | None = None) -> dict[str, int]:
    """Steps until each watched sequence is first scheduled (0-based step numbers)."""
    started: dict[str, int] = {}
    for step in range(max_steps):
        for seq in (arrivals or {}).get(step, []):
            sched.add(seq)
        out = sched.schedule()
        for chunk in out.chunks:
            if chunk.seq in watched:
                started.setdefault(chunk.seq.request_id, step)
        runner.step(out)
        if len(started) == len(watched):
            break
    return started


def starvation_bound(line_position: int, slots: int, cycle_steps: int, run_steps: int) -> int:
    """The module docstring's bound: a slot within ceil((p + 1) / S)·(C + R) steps, a seat within R more."""
    return math.ceil((line_position + 1) / slots) * (cycle_steps + run_steps) + run_steps


def test_cold_adapters_start_within_the_bound_behind_a_hot_backlog():
    # 1,000 queued requests of one hot adapter, then one request each of 20 cold adapters, 4 slots.
    cycle, new_tokens = 8, 10
    config = SchedulerConfig(max_num_seqs=32, max_num_batched_tokens=512, adapter_cycle_steps=cycle,
                             adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=4096, num_slots=4)
    runner = FakeRunner(sched)
    for i in range(1000):
        sched.add(make_seq(f"hot{i}", [1, 2, 3, 4, 5, 6, 7, i % 50], new_tokens, key("hot")))
    cold = [make_seq(f"cold{i}", [9, 8, 7, 6, 5, 4, 3, i], new_tokens, key(f"cold{i}")) for i in range(20)]
    for seq in cold:
        sched.add(seq)
    run_steps = new_tokens  # one prefill step (8 tokens fit any step) samples the first token
    started = run_until_started(sched, runner, cold, max_steps=1000)
    assert len(started) == 20
    for i, seq in enumerate(cold):  # cold i stands (i + 1)-th in the slot line, behind the hot adapter
        bound = starvation_bound(i + 1, 4, cycle, run_steps)
        assert started[seq.request_id] <= bound, (seq.request_id, started[seq.request_id], bound)
    # Plain FCFS would run the 1,000 hot requests first: ~32 at a time for 10 steps, 300+ steps.
    assert max(started.values()) < 100
    while sched.has_work():
        runner.step(sched.schedule())
    assert len(runner.finished) == 1020


@pytest.mark.parametrize("rotate", [True, False])
def test_slots_rotate_while_hot_adapters_keep_them_busy(rotate):
    # Two hot adapters get new requests every step and would hold both slots forever; 6 cold adapters
    # arrive at step 5. Rotation hands the slots over; without it (C huge) a cold one starts only once it
    # is the senior (every older request has finished), so one at a time, each after the last finished.
    cycle, new_tokens = 6, 8
    config = SchedulerConfig(max_num_seqs=64, max_num_batched_tokens=512,
                             adapter_cycle_steps=cycle if rotate else 10**9, adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=4096, num_slots=2)
    runner = FakeRunner(sched)
    arrivals: dict[int, list[Sequence]] = {
        step: [make_seq(f"h{h}-{step}-{j}", [h, step % 90, j], new_tokens, key(f"hot{h}")) for h in range(2)
               for j in range(2)] for step in range(400)}
    cold = [make_seq(f"cold{i}", [7, 7, i], new_tokens, key(f"cold{i}")) for i in range(6)]
    arrivals[5] += cold
    started = run_until_started(sched, runner, cold, max_steps=400, arrivals=arrivals)
    if not rotate:
        starts = [started[seq.request_id] for seq in cold]
        assert all(later >= earlier + new_tokens for earlier, later in itertools.pairwise(starts)), starts
        return
    # At step 5 the hot adapters hold both slots; cold i is i-th in line (p = i), counted from step 5.
    for i, seq in enumerate(cold):
        bound = 5 + starvation_bound(i, 2, cycle, new_tokens)
        assert started.get(seq.request_id, 10**9) <= bound, (seq.request_id, started.get(seq.request_id), bound)


@dataclass
class RotationRun:
    sched: Scheduler
    steps: int
    started: dict[str, int]
    """Each request's first scheduled step."""
    preempted: set[str]
    outputs: dict[str, list[int]]
    max_parked: int = 0
    preemption_steps: int = 0
    """Steps that preempted requests (here only rotations do: the KV pool is ample)."""


def run_rotation_workload(num_slots: int, prefix_caching: bool = True, max_num_seqs: int = 16,
                          base_first: bool = False) -> RotationRun:
    """2 slots (or more): a busy adapter with 5 requests, two single-request adapters; 40 new tokens each.
    `base_first`: a base-model request of 40 new tokens arrives first, so it is the senior (never parked)
    rather than busy0."""
    cycle = 8
    config = SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=256, adapter_cycle_steps=cycle,
                             adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=256, num_slots=num_slots, prefix_caching=prefix_caching)
    runner = FakeRunner(sched)
    seqs = [make_seq("base", [9, 9, 9], 40, None)] if base_first else []
    seqs += [make_seq(f"busy{i}", [1, 2, i], 40, key("busy")) for i in range(5)]
    seqs += [make_seq(f"solo{i}", [5, 6, 7, i], 40, key(f"solo{i}")) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    run = RotationRun(sched, 0, {}, set(), {})
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        for chunk in out.chunks:
            run.started.setdefault(chunk.seq.request_id, run.steps)
        run.preempted |= {seq.request_id for seq in out.preempted}
        run.preemption_steps += bool(out.preempted)
        run.max_parked = max(run.max_parked, sched.num_parked)
        runner.step(out)
        run.steps += 1
        assert run.steps < 500
    assert len(runner.finished) == len(seqs)
    run.outputs = {seq.request_id: seq.output_token_ids for seq in seqs}
    return run


@pytest.mark.parametrize("prefix_caching", [True, False])
def test_rotation_parks_the_holder_with_the_least_work_left(prefix_caching):
    run = run_rotation_workload(num_slots=2, prefix_caching=prefix_caching, base_first=True)
    # busy and solo0 take the two slots; solo1 waits. After the cycle (8 steps) both holders have 32
    # steps to go, as much as solo1: solo0, running fewer requests, is parked and solo1 takes its slot.
    # Later busy is parked too (least work left), so the three adapters share the two slots and all
    # finish by the 3 × 40 / 2 = 60 steps of slot time they need, plus a cycle; waiting for holders to
    # finish would take 80 (busy and solo0 for 40 steps, then solo1 for 40).
    assert run.started["solo1"] == 8
    assert run.sched.num_parks >= 3 and run.sched.num_rotations == 0 and not run.preempted
    assert run.max_parked == 5  # busy's five requests at once, each keeping its KV
    assert run.steps <= 60 + 8, run.steps
    # Parked requests keep their KV and go on where they stopped: the output of an unconstrained run.
    unconstrained = run_rotation_workload(num_slots=3, base_first=True)
    assert unconstrained.sched.num_parks == 0 and unconstrained.steps == 40
    assert run.outputs == unconstrained.outputs


def test_rotation_preempts_a_holder_when_every_seat_is_taken():
    # Six seats: busy's 5 requests and solo0 fill them, so parking cannot start solo1 (it needs a seat).
    # After max(cycle, block size) = 8 steps, solo0 (1 running, no more than solo1's 1 waiting) is
    # preempted for it, freeing a seat; busy (5 running) never is: that would shrink the batch.
    run = run_rotation_workload(num_slots=2, max_num_seqs=6)
    assert run.started["solo1"] == 8
    assert run.preempted and not any(r.startswith("busy") for r in run.preempted)
    assert run.sched.num_rotations == run.preemption_steps >= 2 and run.sched.num_parks == 0
    # Preempted requests resume from the prefix cache with the output of an unconstrained run.
    assert run.outputs == run_rotation_workload(num_slots=3).outputs
    # Without the prefix cache a preemption would recompute everything: no rotation by preemption.
    run = run_rotation_workload(num_slots=2, prefix_caching=False, max_num_seqs=6)
    assert run.sched.num_rotations == 0 and not run.preempted and run.started["solo1"] >= 40


def test_preemption_requeues_in_arrival_order_and_resumes_from_the_cache():
    # A pool for ~2 requests: later ones get preempted and come back; every request still completes
    # with the same tokens as in a roomy pool (the fake model's tokens depend on the KV it reads).
    def run(num_blocks: int) -> tuple[dict[str, list[int]], Scheduler]:
        sched, slots = make_scheduler(SchedulerConfig(max_num_batched_tokens=16), num_blocks, num_slots=2)
        runner = FakeRunner(sched)
        for i in range(6):
            sched.add(make_seq(f"r{i}", list(range(i, i + 10)), 20, key(f"a{i % 2}") if i % 3 else None))
        while sched.has_work():
            out = sched.schedule()
            check_step(sched, slots, out)
            runner.step(out)
        return {s.request_id: s.output_token_ids for s in runner.finished}, sched

    roomy, _ = run(200)
    tight, sched = run(16)
    assert sched.num_preemptions > 0 and sched.prefix_cache_hits > 0
    assert tight == roomy
    assert sched.pool.num_free == 16


def test_total_token_cap_preempts_instead_of_overflowing():
    config = SchedulerConfig(max_batch_total_tokens=40, max_num_batched_tokens=64)
    sched, slots = make_scheduler(config, num_blocks=100, num_slots=1)
    runner = FakeRunner(sched)
    for i in range(5):
        sched.add(make_seq(f"r{i}", list(range(10 * i, 10 * i + 12)), 20, None))
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        runner.step(out)
    assert len(runner.finished) == 5 and sched.num_preemptions > 0


def test_more_adapters_than_slots_share_the_slots_and_finish_in_the_slot_time_they_need():
    # 24 adapters with Zipf-like popularity (2 to 13 requests, or 1) over 8 slots, every request 24 new
    # tokens. Each adapter needs a slot for 24 steps (its requests run side by side; the prefill step
    # samples the first token), so the whole set needs 24 adapters × 24 steps / 8 slots = 72 steps.
    # Handing slots over only when holders finish takes 3 waves of 24 steps only if every wave starts
    # full; time-sharing finishes within a cycle of the bound whatever the sizes.
    cycle, new_tokens, num_slots = 8, 24, 8
    config = SchedulerConfig(max_num_seqs=256, max_num_batched_tokens=4096, adapter_cycle_steps=cycle,
                             adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=4096, num_slots=num_slots)
    runner = FakeRunner(sched)
    sizes = [13, 9, 6, 5, 4, 3, 3, 2, 2, 2] + [1] * 14
    rng = random.Random(0)
    seqs = [make_seq(f"a{a}-{j}", [a, j, 5, 6], new_tokens, key(f"a{a}")) for a, n in enumerate(sizes) for j in range(n)]
    rng.shuffle(seqs)
    for seq in seqs:
        sched.add(seq)
    steps = 0
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        runner.step(out)
        steps += 1
    assert len(runner.finished) == len(seqs) and not sched.num_preemptions
    bound = len(sizes) * new_tokens // num_slots
    assert bound <= steps <= bound + cycle, (steps, bound)
    # Parked requests go on where they stopped: every output equals an unconstrained run's.
    roomy, _ = make_scheduler(config, num_blocks=4096, num_slots=len(sizes))
    runner = FakeRunner(roomy)
    fresh = [make_seq(s.request_id, s.prompt_token_ids, new_tokens, s.adapter) for s in seqs]
    for seq in fresh:
        roomy.add(seq)
    while roomy.has_work():
        runner.step(roomy.schedule())
    assert {s.request_id: s.output_token_ids for s in fresh} == {s.request_id: s.output_token_ids for s in seqs}


def test_holders_keep_admitting_while_parking_serves_the_line():
    # A 1-step cycle: every holder is expired from its second step on. busy has 8 requests but the first
    # step's token budget admits only some; solo1 waits for a slot. Parking solo0 serves solo1, so busy
    # need not stop admitting (its queued requests would otherwise wait for all its running ones to
    # finish, a second wave of 30 steps): every request starts within the first steps.
    config = SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=16, adapter_cycle_steps=1,
                             adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=256, num_slots=2)
    runner = FakeRunner(sched)
    seqs = [make_seq(f"busy{i}", [1, 2, 3, i], 30, key("busy")) for i in range(8)]
    seqs += [make_seq(f"solo{i}", [5, 6, 7, i], 30, key(f"solo{i}")) for i in range(2)]
    for seq in seqs:
        sched.add(seq)
    started = run_until_started(sched, runner, seqs, max_steps=200)
    assert max(started[f"busy{i}"] for i in range(8)) <= 4, started
    assert started["solo1"] <= 4 and sched.num_parks > 0
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        runner.step(out)
    assert len(runner.finished) == 10


def test_parking_under_kv_pressure_never_stalls():
    # One slot, a 20-block pool: a base-model request s (the senior, 8 blocks at most) runs throughout;
    # a and b (4-token prompts, 30 new tokens) take turns through parking while q's 40-token prompt needs
    # 10 blocks. Parked requests hold KV, so the pool runs dry: the newest parked one is preempted first
    # (its KV sits idle), and no holder is parked for a head the pool cannot take. No step is empty, and
    # everything finishes with the outputs of a roomy run.
    def run(num_blocks: int, num_slots: int) -> tuple[Scheduler, dict[str, list[int]], int]:
        config = SchedulerConfig(adapter_cycle_steps=1, adapter_cycle_time_s=1e9)
        sched, slots = make_scheduler(config, num_blocks=num_blocks, num_slots=num_slots)
        runner = FakeRunner(sched)
        seqs = [make_seq("s", [9], 30, None), make_seq("a", [1, 2, 3, 4], 30, key("a")),
                make_seq("b", [5, 6, 7, 8], 30, key("b")), make_seq("q", list(range(10, 50)), 4, key("q"))]
        for seq in seqs:
            sched.add(seq)
        idle = 0
        for _ in range(500):
            if not sched.has_work():
                break
            out = sched.schedule()
            check_step(sched, slots, out)
            idle += not out.chunks
            runner.step(out)
        assert len(runner.finished) == 4
        return sched, {s.request_id: s.output_token_ids for s in seqs}, idle

    sched, outputs, idle = run(num_blocks=20, num_slots=1)
    assert sched.num_parks > 0 and sched.num_preemptions > 0 and idle == 0
    assert outputs == run(num_blocks=256, num_slots=3)[1]


def test_kv_preemption_takes_a_parked_request_first():
    # One slot, 13 blocks of 4 tokens; a base-model request s (the senior) grows to 6 of them. a is
    # parked for b after its cycle, holding 2 blocks; b grows to 24 tokens (6 blocks) and the pool runs
    # dry. The victim is the parked a, whose KV sits idle, not b, the newest running request.
    config = SchedulerConfig(adapter_cycle_steps=4, adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=13, num_slots=1)
    runner = FakeRunner(sched)
    sched.add(make_seq("s", [9], 24, None))
    for name in ("a", "b"):
        sched.add(make_seq(name, [1, 2, 3, 4], 20, key(name)))
    victims: list[tuple[str, bool, bool]] = []  # (request, it was parked, any request was parked)
    preempt = sched._preempt

    def watched(seq, out, budget):
        any_parked = any(s.status is SequenceStatus.PARKED for s in sched.running)
        victims.append((seq.request_id, seq.status is SequenceStatus.PARKED, any_parked))
        preempt(seq, out, budget)

    sched._preempt = watched
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        runner.step(out)
    assert sched.num_parks > 0 and any(was for _, was, _ in victims), victims
    assert all(was or not any_parked for _, was, any_parked in victims), victims
    assert len(runner.finished) == 3


def test_kv_preemption_takes_the_newest_running_request():
    # Base model, 9 blocks of 4 tokens: r0, r1, r2 (one block of prompt each, 12 new tokens) run side by
    # side and each need a fourth block at the same step, with none free. The newest admitted (r2) is
    # preempted: it has the least work to redo, and the oldest keep going.
    sched, slots = make_scheduler(SchedulerConfig(), num_blocks=9, num_slots=1, prefix_caching=False)
    runner = FakeRunner(sched)
    for i in range(3):
        sched.add(make_seq(f"r{i}", [i, i, i, i], 12, None))
    preempted: list[str] = []
    while sched.has_work():
        out = sched.schedule()
        check_step(sched, slots, out)
        preempted += [s.request_id for s in out.preempted]
        runner.step(out)
    assert preempted and preempted[0] == "r2", preempted
    assert len(runner.finished) == 3


def test_admission_takes_the_adapter_with_the_fewest_running_first():
    # Three seats, two slots. a0, a1, a2 (adapter a) arrive before b0 (adapter b). After a0 starts, b runs
    # fewer requests than a, so b0 takes the second seat although a1 arrived first; then a and b tie at one
    # running each and the older head, a1, takes the third. FCFS across adapters would seat a0, a1, a2.
    config = SchedulerConfig(max_num_seqs=3, adapter_cycle_time_s=1e9)
    sched, slots = make_scheduler(config, num_blocks=64, num_slots=2)
    for name, adapter in [("a0", "a"), ("a1", "a"), ("a2", "a"), ("b0", "b")]:
        sched.add(make_seq(name, [1, 2, 3], 4, key(adapter)))
    out = sched.schedule()
    check_step(sched, slots, out)
    assert sorted(c.seq.request_id for c in out.chunks) == ["a0", "a1", "b0"]


@dataclass
class FakeDrafter:
    """Proposes `n` drafts (token 3) whatever the request, and records the limit each call was given."""

    n: int = 8
    limits: list[tuple[str, int]] = field(default_factory=list)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        self.limits.append((seq.request_id, limit))
        return [3] * min(self.n, limit)

    def finished(self, seq: Sequence) -> None:
        pass


def _decoding(config: SchedulerConfig, num_blocks: int, prompts: list[int], drafter: FakeDrafter,
              max_output: int = 100) -> tuple[Scheduler, list[Sequence]]:
    """A scheduler with `drafter` whose requests (one per prompt length) have each taken their first token."""
    slots = FakeSlots(1)
    sched = Scheduler(config, BlockPool(num_blocks), BLOCK, slots, 1, False, drafter=drafter)
    seqs = [make_seq(f"r{i}", list(range(1, n + 1)), 1000, None) for i, n in enumerate(prompts)]
    for seq in seqs:
        seq.max_output = max_output
        sched.add(seq)
    while not all(s.output_token_ids for s in seqs):
        out = sched.schedule()
        assert not out.num_drafts  # prompts never speculate
        sampled = [c.seq for c in out.chunks if c.samples]
        for chunk in out.chunks:
            chunk.seq.num_computed_tokens += chunk.num_new_tokens
        for seq in sampled:
            seq.output_token_ids.append(1)
    drafter.limits.clear()
    return sched, seqs


def test_drafts_are_bounded_by_the_budget_the_output_left_and_the_cap():
    drafter = FakeDrafter()
    sched, (seq,) = _decoding(SchedulerConfig(max_num_batched_tokens=6), 64, [5], drafter, max_output=4)
    out = sched.schedule()
    # 6 tokens this step: the last token and 5 drafts; the output may hold 4: 1 made, 1 to verify, 2 drafts.
    assert drafter.limits == [("r0", 2)]
    (chunk,) = out.chunks
    assert (chunk.num_new_tokens, chunk.drafts, out.num_drafts) == (3, [3, 3], 2)
    assert len(seq.block_table) == blocks_needed(seq.num_computed_tokens + 3, BLOCK)

    drafter = FakeDrafter()
    sched, (seq,) = _decoding(SchedulerConfig(max_num_batched_tokens=6), 64, [5], drafter)
    out = sched.schedule()
    assert drafter.limits == [("r0", 5)] and out.chunks[0].num_new_tokens == 6 and out.num_drafts == 5

    drafter = FakeDrafter()  # the total-token cap: 5 computed tokens held, 9 allowed: the last token + 3 drafts
    sched, (seq,) = _decoding(SchedulerConfig(max_num_batched_tokens=16, max_batch_total_tokens=9), 64, [5], drafter)
    out = sched.schedule()
    assert drafter.limits == [("r0", 3)] and out.chunks[0].drafts == [3, 3, 3]


def test_drafts_never_take_blocks_that_are_not_free_and_never_preempt():
    drafter = FakeDrafter()
    # Two requests of 5 prompt tokens hold 2 blocks each (positions 0..4); 5 blocks in all: one spare.
    sched, seqs = _decoding(SchedulerConfig(max_num_batched_tokens=32), 5, [5, 5], drafter)
    assert sched.pool.num_free == 1
    out = sched.schedule()  # 1 + 8 tokens at positions 5..13 would need 2 more blocks each: plain decodes
    assert [(c.num_new_tokens, c.drafts) for c in out.chunks] == [(1, []), (1, [])]
    assert not out.preempted and sched.pool.num_free == 1
    for seq in seqs:  # as the engine would: both tokens made
        seq.num_computed_tokens += 1
        seq.output_token_ids.append(1)
    drafter.n = 4  # positions 6..10 need a third block: the first takes the spare, the second decodes plainly
    out = sched.schedule()
    assert sorted((c.seq.request_id, c.num_new_tokens) for c in out.chunks) == [("r0", 5), ("r1", 1)]
    assert not out.preempted and sched.pool.num_free == 0 and out.num_drafts == 4


def test_no_drafts_while_more_requests_run_than_speculate():
    drafter = FakeDrafter()
    sched, seqs = _decoding(SchedulerConfig(max_num_batched_tokens=64, speculative_max_batch=2), 64, [3, 3, 3],
                            drafter)
    out = sched.schedule()
    assert drafter.limits == [] and out.num_drafts == 0 and [c.num_new_tokens for c in out.chunks] == [1, 1, 1]
    sched.finish(seqs[0])
    out = sched.schedule()
    assert [r for r, _ in drafter.limits] == ["r1", "r2"] and out.num_drafts == 2 * 8


def test_trim_returns_the_blocks_of_rejected_drafts_as_a_new_table():
    drafter = FakeDrafter()
    sched, (seq,) = _decoding(SchedulerConfig(max_num_batched_tokens=16), 64, [3], drafter)
    free = sched.pool.num_free
    table = seq.block_table
    out = sched.schedule()
    (chunk,) = out.chunks
    assert chunk.num_new_tokens == 9 and seq.num_computed_tokens == 3  # positions 3..11: blocks 0..2
    assert len(seq.block_table) == 3 and sched.pool.num_free == free - 2
    seq.num_computed_tokens += 2  # the last token and one draft accepted: positions 0..4 computed
    sched.trim(seq)
    assert len(seq.block_table) == 2 and sched.pool.num_free == free - 1
    assert seq.block_table is not table  # decode rows keep the old list: a trimmed table is a new one
    sched.trim(seq)
    assert len(seq.block_table) == 2 and sched.pool.num_free == free - 1
