"""ModelRunner: SchedulerOutput → one flat forward pass → logits at sampling positions → sampled tokens.

A failure that belongs to one request (its inputs, its logits turning non-finite, its grammar or sampling
parameters) leaves that request out of the step and is reported with it; only a failure of the batch as
a whole (the forward pass) raises, so one request can never fail the others.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import operator
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np
import torch

from loraplex.adapters.ref import shown_id
from loraplex.device import to_device
from loraplex.engine.request import TokenLogprob
from loraplex.engine.scheduler import ScheduledChunk, SchedulerOutput
from loraplex.engine.sequence import Sequence, SequenceStatus
from loraplex.engine.speculative import DraftRow
from loraplex.engine.step_timer import NO_TIMER, NullTimer
from loraplex.kv.block_pool import KVCache
from loraplex.lora.adapter import AdapterInvalid
from loraplex.lora.batch import EMPTY_SLOT, LoRABatch
from loraplex.model.attention import AttentionMetadata, PrefillChunk
from loraplex.model.context import ForwardContext, forward_context
from loraplex.model.cuda_graphs import DecodeGraphs, GraphStep
from loraplex.model.decode_rows import DecodeInputs, DecodeRows
from loraplex.model.decoder import CausalLM
from loraplex.sampling import LOGPROB_FLOOR, Sampler, SamplerOutput
from loraplex.sampling.penalties import vector
from loraplex.sampling.sampler import LogprobTensors
from loraplex.sampling.structured import token_mask

log = logging.getLogger(__name__)
Broken = list[tuple[Sequence, Exception]]
"""Requests that failed on their own in a step, with the error each failed with."""


@dataclass
class StepInputs:
    input_ids: torch.Tensor      # [tokens] long
    positions: torch.Tensor      # [tokens] long
    long_rope: torch.Tensor | None  # [tokens] bool, longrope models only
    attn: AttentionMetadata
    lora: LoRABatch | None         # slots of the tokens
    sample_lora: LoRABatch | None  # slots of the sampled rows, for the LM head
    sample_rows: torch.Tensor    # [sampled + scored] long: each sampling chunk's last token, then prompt rows
    sampled: list[ScheduledChunk]
    scored: list[tuple[Sequence, int]] = field(default_factory=list)
    """(sequence, position p) of each prompt row after the sampled ones: it scores prompt token p + 1."""
    broken: Broken = field(default_factory=list)
    """Scheduled requests whose inputs could not be built; they are not in the step."""
    graph: GraphStep | None = None
    """A decode step that replays a CUDA graph (its inputs are the graph's static buffers)."""


@dataclass
class Launched:
    """A step whose forward and sampling are queued (async scheduling): its tokens stay on the device, where
    the next step's inputs read them, until `read` brings them to the host."""

    sampled: list[ScheduledChunk]
    """The chunks that sample, in the order of `tokens`' rows."""
    tokens: torch.Tensor  # [rows] long, on the device
    host: torch.Tensor  # [2, rows] long: the tokens and whether each row's logits were finite, copied back
    copied: torch.cuda.Event | None
    broken: Broken
    """Requests whose inputs could not be built: not in the step."""
    logprobs: LogprobTensors | None = None
    """The logprobs of the rows that want them; their values and ids are copied back into `host_logprobs`."""
    host_logprobs: tuple[torch.Tensor, torch.Tensor] | None = None  # [m, 1 + k] float (chosen, top), [m, k] long
    known: list[TokenLogprob | None] | None = None
    """Each row's logprobs when the host sampled the step (the fallback of `launch`)."""
    _rows: dict[Sequence, int] | None = None

    def row_of(self, seq: Sequence) -> int:
        """The row of `seq`'s token (it sampled in this step)."""
        if self._rows is None:
            self._rows = {c.seq: i for i, c in enumerate(self.sampled)}
        return self._rows[seq]

    def read(self) -> tuple[list[int], list[int], list[TokenLogprob | None]]:
        """The tokens, per row 1 if its logits were all finite (0 if not), and per row its logprobs (None
        where not wanted); waits for the step."""
        if self.copied is not None:
            self.copied.synchronize()
        tokens, finite = self.host.tolist()
        if self.known is not None:
            return tokens, finite, self.known
        if self.logprobs is None or self.host_logprobs is None:
            return tokens, finite, [None] * len(tokens)
        values, ids = (t.tolist() for t in self.host_logprobs)
        return tokens, finite, self.logprobs.build(tokens, [c.seq.params for c in self.sampled],
                                                   [v[0] for v in values], ids, [v[1:] for v in values])


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self._helper: ThreadPoolExecutor | None = None  # runs a step's `alongside` work on a CPU
        self.sampler = Sampler()
        self._decode_rows = DecodeRows(self.block_size)
        self._decode_lora_slots: list[int] = []  # the last decode-only step's LoRA batch, for the next
        self._decode_lora: LoRABatch | None = None
        self.graphs: DecodeGraphs | None = None
        """Decode CUDA graphs (loraplex/model/cuda_graphs.py); decode steps they hold replay one."""
        self.sample_hidden: torch.Tensor | None = None
        """The last step's final hidden states [rows, hidden] of the rows `execute` returned (Medusa drafts)."""

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput, timer: NullTimer = NO_TIMER,
                alongside: Callable[[], None] | None = None) -> tuple[list[ScheduledChunk], SamplerOutput | None, Broken]:
        """Run one step; returns the chunks that sampled a token, the sampler's output for them, and the
        requests that failed on their own (left out of the step). A failure of the whole batch raises.
        `timer` gets a lap as the inputs and the forward end (the caller's next lap is the sampling's).

        `alongside` (host work that touches no tensor: the last step's outputs) runs once while the forward
        does: on a GPU right after the forward's kernels are queued, before anything waits for them; on a
        CPU, whose kernels run as they are called, on a helper thread beside them."""
        inputs = self.prepare(sched)
        timer.lap("inputs")
        broken = list(inputs.broken)
        logits = None
        with self._beside(alongside):
            if inputs.input_ids.numel():
                logits = self.forward(inputs)
        if logits is not None and inputs.scored:
            logits = self._score_prompts(logits, inputs.scored)
        timer.lap("forward")
        if logits is None or not inputs.sampled:
            return [], None, broken
        return self._sample_chunks(inputs.sampled, logits, sched.num_drafts > 0, broken)

    def _sample_chunks(self, sampled: list[ScheduledChunk], logits: torch.Tensor, drafts: bool,
                       broken: Broken) -> tuple[list[ScheduledChunk], SamplerOutput | None, Broken]:
        """Sample the rows of `logits` whose logits are finite, one request's failure failing it alone (as
        `execute` returns)."""
        sampled, logits, kept = self._finite_rows(sampled, logits, broken)
        if kept is not None and self.sample_hidden is not None:
            self.sample_hidden = self.sample_hidden[kept]
        if not sampled:
            return [], None, broken
        # The common step has no drafts: its rows are the sequences, with no per-row work to find out.
        rows: list[Sequence | DraftRow] = _sample_rows(sampled) if drafts else [c.seq for c in sampled]
        try:
            return sampled, self._sample(logits, rows), broken
        except Exception as e:
            if len(sampled) == 1:
                return [], None, broken + [(sampled[0].seq, e)]
            log.warning("sampling a batch of %d failed (%r); sampling its rows one by one", len(sampled), e)
        # Some row's own state (its grammar, its parameters) broke the batch: each row alone finds which. A
        # row's token depends only on its logits, its seed and its step, and every per-row processor runs
        # before the draws, so the rows that succeed get exactly the tokens the batch would give.
        kept_chunks: list[ScheduledChunk] = []
        kept_rows: list[int] = []
        token_ids: list[int] = []
        logprobs: list[TokenLogprob | None] = []
        for row, chunk in enumerate(sampled):
            try:
                out = self._sample(logits[row:row + 1], rows[row:row + 1])
            except Exception as e:
                broken.append((chunk.seq, e))
                continue
            kept_chunks.append(chunk)
            kept_rows.append(row)
            token_ids += out.token_ids
            logprobs += out.logprobs
        if self.sample_hidden is not None:
            self.sample_hidden = self.sample_hidden[kept_rows]
        return kept_chunks, SamplerOutput(token_ids, logprobs) if kept_chunks else None, broken

    @torch.inference_mode()
    def launch(self, sched: SchedulerOutput, fed: Launched | None, timer: NullTimer = NO_TIMER,
               between: Callable[[], None] | None = None) -> Launched:
        """Queue one step and its sampling without waiting for them (async scheduling). A chunk whose input
        is its sequence's UNREAD token (`Sequence.unread`) takes the token `fed` sampled for it, on the
        device. `between` (the engine reading `fed`'s tokens) runs once the forward is queued and before
        the sampling, so on a GPU it runs beside the forward, and the sampling sees every token read (and
        each grammar advanced by it). No chunk may verify drafts or score prompt tokens; a request `between`
        ended is sampled (its row is dropped when the tokens are read) without its grammar. Non-finite
        logits are found when the tokens are read (`Launched.read`); a sampling failure samples the step on
        the host instead (as `execute`), and a failure of the whole step raises."""
        inputs = self.prepare(sched)
        if inputs.scored:  # their logprobs are read on the host (`_score_prompts`): such a step cannot be queued ahead
            raise ValueError("a step that scores prompt tokens cannot be queued ahead; run it with execute")
        if fed is not None:
            self._feed(inputs, fed)
        timer.lap("inputs")
        logits = self.forward(inputs) if inputs.input_ids.numel() else None
        timer.lap("forward")
        if between is not None:
            between()
            timer.lap("postprocess")
        sampled = inputs.sampled
        device = self.device
        host = torch.empty((2, len(sampled)), dtype=torch.long, pin_memory=device.type == "cuda")
        if logits is None or not sampled:
            return Launched([], torch.empty(0, dtype=torch.long, device=device), host[:, :0], None, inputs.broken)
        try:
            rows = [c.seq for c in sampled]
            grammars = [None if seq.status is SequenceStatus.FINISHED else seq.grammar for seq in rows]
            tokens, logprobs = self.sampler.tokens(logits, rows, token_mask(grammars, logits.shape[-1], device))
        except Exception as e:  # as `execute`, the rows then sampled on the host, and a failing one failed alone
            log.warning("sampling a batch of %d on the device failed (%r); sampling it on the host", len(sampled), e)
            broken = list(inputs.broken)
            kept, result, broken = self._sample_chunks(sampled, logits, False, broken)
            ids = result.token_ids if result is not None else []
            host = torch.tensor([ids, [1] * len(ids)], dtype=torch.long).view(2, len(ids))
            return Launched(kept, to_device(host[0], device), host, None, broken,
                            known=result.logprobs if result is not None else [])
        finite = logits.sum(dim=-1, dtype=torch.float32).isfinite()  # as `_finite_rows`
        pinned = device.type == "cuda"
        host[0].copy_(tokens, non_blocking=True)
        host[1].copy_(finite, non_blocking=True)
        host_logprobs = None
        if logprobs is not None:  # copied back with the tokens: reading them later must not wait for later steps
            values = torch.cat([logprobs.chosen.unsqueeze(1), logprobs.top_values], dim=1).float()
            host_logprobs = (torch.empty(values.shape, dtype=torch.float32, pin_memory=pinned),
                             torch.empty(logprobs.top_ids.shape, dtype=torch.long, pin_memory=pinned))
            host_logprobs[0].copy_(values, non_blocking=True)
            host_logprobs[1].copy_(logprobs.top_ids, non_blocking=True)
        copied = None
        if pinned:
            copied = torch.cuda.Event()
            copied.record()
        return Launched(list(sampled), tokens, host, copied, inputs.broken, logprobs, host_logprobs)

    @staticmethod
    def _feed(inputs: StepInputs, fed: Launched) -> None:
        """Write into `inputs.input_ids` the tokens `fed` sampled for the chunks whose input is still UNREAD."""
        sampled, input_ids = inputs.sampled, inputs.input_ids
        if (len(sampled) == len(fed.sampled) == input_ids.shape[0]
                and all(map(operator.is_, (c.seq for c in sampled), (c.seq for c in fed.sampled)))):
            # The common step: the same requests decoding in the same order (each has the UNREAD token `fed`
            # sampled for it), one input row each.
            input_ids.copy_(fed.tokens)
            return
        rows = [(j, fed.row_of(c.seq)) for j, c in enumerate(sampled) if c.seq.unread]
        if not rows:
            return
        device = fed.tokens.device
        tokens = fed.tokens.index_select(0, vector([i for _, i in rows], torch.long, device))
        # A chunk that takes an UNREAD token is a decode of that one token, which samples: its input's row
        # is its sample row.
        targets = inputs.sample_rows
        if len(rows) != len(sampled):
            targets = targets.index_select(0, vector([j for j, _ in rows], torch.long, device))
        input_ids.index_copy_(0, targets, tokens)

    @contextlib.contextmanager
    def _beside(self, work: Callable[[], None] | None) -> Iterator[None]:
        """Run `work` once while the body runs (see `execute`); its error is raised after the body's."""
        if work is None:
            yield
        elif self.device.type == "cpu":
            if self._helper is None:
                self._helper = ThreadPoolExecutor(1, thread_name_prefix="loraplex-outputs")
            done = self._helper.submit(work)
            try:
                yield
            finally:
                done.result()
        else:
            try:
                yield  # the kernels are queued, not run: the host is free until something reads a result
            finally:
                work()

    def _sample(self, logits: torch.Tensor, rows: list[Sequence | DraftRow]) -> SamplerOutput:
        mask = token_mask([r.grammar for r in rows], logits.shape[-1], self.device)
        return self.sampler(logits, rows, mask)

    @staticmethod
    def _finite_rows(sampled: list[ScheduledChunk], logits: torch.Tensor,
                     broken: Broken) -> tuple[list[ScheduledChunk], torch.Tensor, list[int] | None]:
        """The rows whose logits are all finite; the others' requests go to `broken`. A NaN or infinite
        logit (an adapter whose weights overflow in this dtype) would sample garbage and report a NaN
        logprob; rows are independent, so such a row ends alone (with all its rows, if it speculates)."""
        # A row's sum is finite exactly when all its logits are (they are far too small to overflow it):
        # one pass over [rows, vocab] instead of isfinite's two.
        finite = logits.sum(dim=-1, dtype=torch.float32).isfinite()  # [rows]
        if bool(finite.all()):
            return sampled, logits, None
        bad: dict[Sequence, None] = {}
        for chunk, ok in zip(sampled, finite.tolist(), strict=True):
            if not ok:
                bad[chunk.seq] = None
        broken += [(seq, non_finite_logits(seq)) for seq in bad]
        rows = [i for i, chunk in enumerate(sampled) if chunk.seq not in bad]
        return [sampled[i] for i in rows], logits[rows], rows

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model on a prepared step: logits [sampled + scored, vocab] at the sampling rows, then the
        prompt rows to score (None if there are none)."""
        if inputs.graph is not None:  # a decode step: every row samples, the head runs on them all
            self.sample_hidden = inputs.graph.run()
            with forward_context(ForwardContext(attn=inputs.attn, kv_cache=self.kv_cache, lora=inputs.sample_lora)):
                return self.model.compute_logits(self.sample_hidden)
        with forward_context(ForwardContext(attn=inputs.attn, kv_cache=self.kv_cache, lora=inputs.lora)):
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.long_rope)  # [tokens, hidden]
        if not inputs.sampled and not inputs.scored:
            return None
        # The LM head sees only the sampled rows, so its LoRA batch maps rows, not tokens, to slots.
        self.sample_hidden = hidden[inputs.sample_rows]  # [sampled + scored, hidden]
        with forward_context(ForwardContext(attn=inputs.attn, kv_cache=self.kv_cache, lora=inputs.sample_lora)):
            return self.model.compute_logits(self.sample_hidden)  # [sampled, vocab]

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Record the prompt logprobs of the scored rows (after the sampled ones); return the sampled rows."""
        num_sampled = logits.shape[0] - len(scored)
        targets = torch.tensor([seq.prompt_token_ids[p + 1] for seq, p in scored], device=logits.device)
        logprobs = torch.log_softmax(logits[num_sampled:].float(), dim=-1)  # [scored, vocab]
        picked = logprobs.gather(1, targets[:, None]).squeeze(1)  # [scored]
        # As for sampled tokens: never -inf or NaN, which JSON cannot carry (see LOGPROB_FLOOR).
        values = picked.nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp(min=LOGPROB_FLOOR).tolist()
        for (seq, p), value in zip(scored, values, strict=True):
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs[p + 1] = value
        return logits[:num_sampled]

    def _lora_batch(self, slots: list[int]) -> LoRABatch | None:
        # Base-model-only steps build no LoRA metadata at all: the wrappers see None and add nothing.
        if slots.count(EMPTY_SLOT) == len(slots):
            return None
        return LoRABatch.from_token_slots(slots, self.device)

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
        long_from = getattr(self.model.rope, "long_from", None)
        decode = self._decode_rows.build(sched.chunks) if long_from is None else None
        if decode is not None:
            return self._decode_inputs(sched, decode)
        bs = self.block_size
        ids: list[int] = []
        positions: list[int] = []
        slots: list[int] = []
        sample_rows: list[int] = []
        sampled: list[ScheduledChunk] = []
        score_rows: list[int] = []
        scored: list[tuple[Sequence, int]] = []
        decode_tables: list[list[int]] = []
        decode_lens: list[int] = []
        prefills: list[tuple[int, int, int, list[int]]] = []  # (q_start, q_len, context_len, block table)
        long_rope: list[bool] = []
        token_slots: list[int] = []
        broken: Broken = []
        for chunk in sched.chunks:
            seq, n = chunk.seq, chunk.num_new_tokens
            start = seq.num_computed_tokens
            table = seq.block_table
            if n == 1 and long_from is None and seq.prompt_logprobs is None:
                # The common row, a decode (or a prompt's last token), inline: this runs for every request
                # at every step. Its token and KV slot come first, so a broken row appends nothing.
                try:
                    token = seq.token_at(start)
                    slot = table[start // bs] * bs + start % bs
                except Exception as e:
                    broken.append((seq, e))
                    continue
                ids.append(token)
                positions.append(start)
                slots.append(slot)
                token_slots.append(seq.lora_slot)
                decode_tables.append(table)
                decode_lens.append(start + 1)
                if start + 1 == len(seq.prompt_token_ids) + len(seq.output_token_ids):  # reaches the end: it samples
                    sample_rows.append(len(ids) - 1)
                    sampled.append(chunk)
                continue
            drafts = chunk.drafts
            try:  # what may fail for one request's own state is built before anything is appended
                chunk_ids = [seq.token_at(start), *drafts] if drafts else seq.tokens(start, start + n)
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
            if long_from is not None:
                long_rope += [seq.num_tokens > long_from] * n
            token_slots += [seq.lora_slot] * n
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefills.append((q_start, n, start + n, table))
            if drafts:  # speculative: every position samples (loraplex/engine/speculative.py)
                sample_rows += range(q_start, q_start + n)
                sampled += [chunk] * n
            elif chunk.samples:
                sample_rows.append(len(ids) - 1)
                sampled.append(chunk)
            if seq.computes_prompt_logprobs:  # rows whose next token is a prompt token get scored
                last = min(start + n, len(seq.prompt_token_ids) - 1)
                score_rows += range(q_start, q_start + max(0, last - start))
                scored += [(seq, p) for p in range(start, last)]
        lora = self._lora_batch(token_slots)
        sample_lora = None
        if self.model.lora_head is not None:
            sample_slots = [c.seq.lora_slot for c in sampled] + [s.lora_slot for s, _ in scored]
            # A decode-only step samples every token in order: the head's rows are the tokens' rows.
            sample_lora = lora if sample_slots == token_slots else self._lora_batch(sample_slots)
        device = self.device
        (input_ids, positions_t, slot_mapping, context_lens, rows, *prefill_tables), block_tables = _upload(
            [ids, positions, slots, decode_lens, sample_rows + score_rows, *(p[3] for p in prefills)],
            decode_tables, device)
        attn = AttentionMetadata(
            slot_mapping=slot_mapping,
            num_decode=len(decode_tables),
            decode_block_tables=block_tables,
            decode_context_lens=context_lens,
            prefills=[PrefillChunk(q_start, n, ctx, table)
                      for (q_start, n, ctx, _), table in zip(prefills, prefill_tables, strict=True)],
        )
        return StepInputs(
            input_ids=input_ids,
            positions=positions_t,
            long_rope=torch.tensor(long_rope, device=device) if long_from is not None else None,
            attn=attn,
            lora=lora,
            sample_lora=sample_lora,
            sample_rows=rows,
            sampled=sampled,
            scored=scored,
            broken=broken,
        )

    def _decode_inputs(self, sched: SchedulerOutput, rows: DecodeInputs) -> StepInputs:
        """A decode-only step's inputs from its persistent rows (`DecodeRows`): every row samples."""
        if self.graphs is not None:
            step = self.graphs.prepare(rows)
            if step is not None:
                return self._graph_inputs(sched, rows, step)
        n = len(rows.input_ids)
        tables = rows.tables
        host = torch.empty(5 * n + tables.size, dtype=torch.long, pin_memory=self.device.type == "cuda")
        buffer = host.numpy()
        for i, column in enumerate((rows.input_ids, rows.positions, rows.slots, rows.positions + 1, np.arange(n))):
            buffer[i * n:(i + 1) * n] = column
        buffer[5 * n:].reshape(tables.shape)[:] = tables
        on_device = host.to(self.device, non_blocking=True)
        input_ids, positions, slot_mapping, context_lens, sample_rows = on_device[:5 * n].view(5, n)
        if rows.lora_slots != self._decode_lora_slots:
            self._decode_lora_slots, self._decode_lora = rows.lora_slots, self._lora_batch(rows.lora_slots)
        lora = self._decode_lora
        attn = AttentionMetadata(slot_mapping=slot_mapping, num_decode=n,
                                 decode_block_tables=on_device[5 * n:].view(tables.shape),
                                 decode_context_lens=context_lens, prefills=[])
        # Every row samples its token in order: the LM head's rows are the tokens' rows.
        return StepInputs(input_ids=input_ids, positions=positions, long_rope=None, attn=attn, lora=lora,
                          sample_lora=lora if self.model.lora_head is not None else None, sample_rows=sample_rows,
                          sampled=list(sched.chunks))


    def _graph_inputs(self, sched: SchedulerOutput, rows: DecodeInputs, step: GraphStep) -> StepInputs:
        """A decode step whose inputs are in the graphs' static buffers; the graph runs the decoder body, and
        only the LM head (with its LoRA, if any adapter has one) needs a batch of its own."""
        graphs, n = self.graphs, step.rows
        assert graphs is not None
        sample_lora = None
        if self.model.lora_head is not None:
            if rows.lora_slots != self._decode_lora_slots:
                self._decode_lora_slots, self._decode_lora = rows.lora_slots, self._lora_batch(rows.lora_slots)
            sample_lora = self._decode_lora
        attn = AttentionMetadata(slot_mapping=graphs.slots[:n], num_decode=n, decode_block_tables=graphs.tables[:n],
                                 decode_context_lens=graphs.context_lens[:n], prefills=[])
        return StepInputs(input_ids=graphs.input_ids[:n], positions=graphs.positions[:n], long_rope=None, attn=attn,
                          lora=None, sample_lora=sample_lora, sample_rows=graphs.rows[:n], sampled=list(sched.chunks),
                          graph=step)


def _upload(columns: list[list[int]], tables: list[list[int]],
            device: torch.device) -> tuple[list[torch.Tensor], torch.Tensor]:
    """The step's integer inputs on `device` in one host buffer and one copy: each of `columns` as a long
    tensor [len], and `tables` as one [len(tables), longest] long tensor padded with block 0. On CUDA the
    buffer is pinned and the copy asynchronous, so the host goes on preparing while it runs."""
    lengths = [len(c) for c in columns]
    flat = sum(lengths)
    table_lengths = np.fromiter(map(len, tables), dtype=np.int64, count=len(tables))
    width = int(table_lengths.max()) if len(tables) else 0
    host = torch.empty(flat + len(tables) * width, dtype=torch.long, pin_memory=device.type == "cuda")
    buffer = host.numpy()
    buffer[:flat] = np.fromiter(itertools.chain.from_iterable(columns), dtype=np.int64, count=flat)
    grid = buffer[flat:].reshape(len(tables), width)
    grid.fill(0)
    # Row-major order of the cells left of each row's length is exactly the tables' concatenation.
    grid[np.arange(width) < table_lengths[:, None]] = np.fromiter(
        itertools.chain.from_iterable(tables), dtype=np.int64, count=int(table_lengths.sum()))
    on_device = host.to(device, non_blocking=True)
    offsets = np.cumsum([0, *lengths]).tolist()
    parts = [on_device[a:b] for a, b in itertools.pairwise(offsets)]
    return parts, on_device[flat:].view(len(tables), width)


def _sample_rows(sampled: list[ScheduledChunk]) -> list[Sequence | DraftRow]:
    """The sampler's row for each sampled row: its sequence, or for the i-th position (i >= 1) of a chunk
    with drafts, the sequence as if its first i drafts were accepted (`DraftRow`)."""
    rows: list[Sequence | DraftRow] = []
    last: ScheduledChunk | None = None
    i = 0
    for chunk in sampled:
        seq = chunk.seq
        i = i + 1 if chunk is last else 0
        last = chunk
        rows.append(seq if i == 0 else DraftRow(seq.params, seq.seed, seq.prompt_token_ids,
                                                 seq.output_token_ids + chunk.drafts[:i]))
    return rows


def non_finite_logits(seq: Sequence) -> Exception:
    """The error of a request whose logits were NaN or infinite."""
    if seq.adapter is not None:
        return AdapterInvalid(f"adapter {shown_id(seq.adapter.id)} produced non-finite logits (NaN or infinity): its weights "
                              "overflow this model's activations")
    return FloatingPointError("the model produced non-finite logits (NaN or infinity) for this request")
