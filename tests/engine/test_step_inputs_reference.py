"""The step loop's fast paths against the code they replaced, on random workloads in lockstep: requests
join, decode, finish, get aborted, preempted (KV and seat pressure, rotation) and parked in every order
the liveness simulation produces, with prefix caching, prompt logprobs and LoRA slots.

- The scheduler's inline decode pass (`_schedule_decodes`) against the per-request `_chunk_size` /
  `_reserve` / `take` loop it replaced: the same chunks, preemptions and pool state at every step.
- The runner's step inputs (`ModelRunner.prepare`, with its inline decode rows and one-fill block tables,
  and decode-only steps built from the persistent rows of `DecodeRows`) against the list-built inputs of
  before, tensor for tensor.
"""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from loraplex.engine.scheduler import ScheduledChunk, Scheduler, SchedulerOutput, _StepBudget
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.model.attention import AttentionMetadata, PrefillChunk
from loraplex.model.decode_rows import DecodeInputs, DecodeRows
from loraplex.model.runner import ModelRunner, StepInputs
from tests.engine.test_scheduler import BLOCK, FakeRunner, check_step
from tests.engine.test_scheduler_liveness import Sim, random_sim
from tests.lora.test_batch import _segments_by_loop


class ReferenceScheduler(Scheduler):
    """The decode pass as it was: every running decode through `_chunk_size`, `_reserve` and `take`, then
    the prompt pass over every running request again."""

    def _schedule_decodes(self, order: list[Sequence], out: SchedulerOutput, budget: _StepBudget) -> list[Sequence]:
        for seq in order:
            if seq.status is not SequenceStatus.RUNNING or not seq.is_decode:
                continue
            n = self._chunk_size(seq, seq.num_tokens - seq.num_computed_tokens, budget)
            if n > 0 and self._reserve(seq, n, out, budget):
                out.chunks.append(ScheduledChunk(seq, n))
                budget.take(seq, n)
        return order  # the prompt pass went over every running request


def reference_prepare(runner: ModelRunner, sched: SchedulerOutput) -> StepInputs:
    """`ModelRunner.prepare` before the fast paths (2362499), verbatim but for the LoRA batches."""
    bs = runner.block_size
    ids: list[int] = []
    positions: list[int] = []
    slots: list[int] = []
    sample_rows: list[int] = []
    sampled: list[ScheduledChunk] = []
    score_rows: list[int] = []
    scored: list[tuple[Sequence, int]] = []
    decode_tables: list[list[int]] = []
    decode_lens: list[int] = []
    prefills: list[PrefillChunk] = []
    token_slots: list[int] = []
    broken = []
    for chunk in sched.chunks:
        seq, start, n = chunk.seq, chunk.start, chunk.num_new_tokens
        table = seq.block_table
        try:
            chunk_ids = seq.tokens(start, start + n)
            chunk_slots = [table[p // bs] * bs + p % bs for p in range(start, start + n)]
            if len(chunk_ids) != n:
                raise IndexError(f"tokens [{start}, {start + n}) of a sequence of {seq.num_tokens}")
        except Exception as e:
            broken.append((seq, e))
            continue
        q_start = len(ids)
        ids += chunk_ids
        positions += range(start, start + n)
        slots += chunk_slots
        token_slots += [seq.lora_slot] * n
        if n == 1:
            decode_tables.append(table)
            decode_lens.append(start + 1)
        else:
            prefills.append(PrefillChunk(q_start, n, start + n, torch.tensor(table)))
        if chunk.samples:
            sample_rows.append(len(ids) - 1)
            sampled.append(chunk)
        if seq.computes_prompt_logprobs:
            last = min(start + n, len(seq.prompt_token_ids) - 1)
            score_rows += range(q_start, q_start + max(0, last - start))
            scored += [(seq, p) for p in range(start, last)]
    width = max((len(t) for t in decode_tables), default=0)
    attn = AttentionMetadata(
        slot_mapping=torch.tensor(slots, dtype=torch.long),
        num_decode=len(decode_tables),
        decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                         dtype=torch.long).view(len(decode_tables), width),
        decode_context_lens=torch.tensor(decode_lens, dtype=torch.long),
        prefills=prefills,
    )
    return StepInputs(
        input_ids=torch.tensor(ids, dtype=torch.long),
        positions=torch.tensor(positions, dtype=torch.long),
        long_rope=None,
        attn=attn,
        lora=token_slots,  # type: ignore[arg-type]  # compared as segments below
        sample_lora=[c.seq.lora_slot for c in sampled] + [s.lora_slot for s, _ in scored],  # type: ignore[arg-type]
        sample_rows=torch.tensor(sample_rows + score_rows, dtype=torch.long),
        sampled=sampled,
        scored=scored,
        broken=broken,
    )


def _runner() -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # prepare reads no weights: a model with a rope and a head
    runner.block_size, runner.device = BLOCK, torch.device("cpu")
    runner.model = SimpleNamespace(rope=SimpleNamespace(), lora_head=object())  # type: ignore[assignment]
    runner._decode_rows = DecodeRows(BLOCK)
    runner._decode_lora_slots, runner._decode_lora = [], None
    runner.graphs = None
    return runner


def _same_inputs(got: StepInputs, want: StepInputs) -> None:
    for name in ("input_ids", "positions", "sample_rows"):
        assert torch.equal(getattr(got, name), getattr(want, name)), name
    g, w = got.attn, want.attn
    assert torch.equal(g.slot_mapping, w.slot_mapping) and g.num_decode == w.num_decode
    assert torch.equal(g.decode_block_tables, w.decode_block_tables), (g.decode_block_tables, w.decode_block_tables)
    assert torch.equal(g.decode_context_lens, w.decode_context_lens)
    assert [(p.q_start, p.q_len, p.context_len, p.block_table.tolist()) for p in g.prefills] == \
        [(p.q_start, p.q_len, p.context_len, p.block_table.tolist()) for p in w.prefills]
    for batch, slots in ((got.lora, want.lora), (got.sample_lora, want.sample_lora)):
        if batch is None:
            assert all(s == -1 for s in slots)  # type: ignore[union-attr]
        else:
            assert (batch.seg_starts_list, batch.seg_lens_list, batch.seg_slots_list, batch.active_slots_list) \
                == _segments_by_loop(slots)  # type: ignore[arg-type]
            assert batch.token_slots.tolist() == slots
    assert [c.seq for c in got.sampled] == [c.seq for c in want.sampled]
    assert got.scored == want.scored and got.broken == want.broken


def _step(sim: Sim, runner: FakeRunner, step: int, unfinished: list[Sequence]) -> SchedulerOutput:
    for seq in sim.arrivals.get(step, []):
        sim.sched.add(seq)
        unfinished.append(seq)
    if unfinished and sim.rng.random() < sim.abort_rate:
        sim.sched.finish(sim.rng.choice(unfinished))
    out = sim.sched.schedule()
    check_step(sim.sched, sim.slots, out)
    return out


@pytest.mark.parametrize("seed", range(60))
def test_fast_paths_equal_the_reference_in_lockstep(seed: int) -> None:
    fast, ref = random_sim(seed), random_sim(seed)
    ref.sched.__class__ = ReferenceScheduler
    # Some requests ask for prompt logprobs: every prompt position runs, through the runner's general path.
    for sim in (fast, ref):
        for i, seq in enumerate(s for steps in sim.arrivals.values() for s in steps):
            if i % 5 == 0:
                seq.prompt_logprobs = [None] * len(seq.prompt_token_ids)
    runner = _runner()
    kept = 0  # steps built from the persistent decode rows
    build = runner._decode_rows.build

    def counted(chunks: list[ScheduledChunk]) -> DecodeInputs | None:
        nonlocal kept
        rows = build(chunks)
        kept += rows is not None
        return rows

    runner._decode_rows.build = counted  # type: ignore[method-assign]
    fast_runner, ref_runner = FakeRunner(fast.sched), FakeRunner(ref.sched)
    fast_unfinished: list[Sequence] = []
    ref_unfinished: list[Sequence] = []
    step = 0
    last_arrival = max(fast.arrivals)
    while step <= last_arrival or fast.sched.has_work():
        got = _step(fast, fast_runner, step, fast_unfinished)
        want = _step(ref, ref_runner, step, ref_unfinished)
        assert [(c.seq.request_id, c.num_new_tokens) for c in got.chunks] == \
            [(c.seq.request_id, c.num_new_tokens) for c in want.chunks], step
        assert [s.request_id for s in got.preempted] == [s.request_id for s in want.preempted]
        assert fast.sched.pool.num_free == ref.sched.pool.num_free
        assert [s.block_table for s in fast.sched.running] == [s.block_table for s in ref.sched.running]
        _same_inputs(runner.prepare(got), reference_prepare(runner, got))
        fast_runner.step(got)
        ref_runner.step(want)
        fast_unfinished = [s for s in fast_unfinished if s.status is not SequenceStatus.FINISHED]
        ref_unfinished = [s for s in ref_unfinished if s.status is not SequenceStatus.FINISHED]
        step += 1
        assert step < 20_000
    assert not ref.sched.has_work()
    assert kept > 0
