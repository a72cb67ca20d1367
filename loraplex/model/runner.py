"""ModelRunner: SchedulerOutput → one flat forward pass → logits at sampling positions → sampled tokens."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from loraplex.engine.scheduler import ScheduledChunk, SchedulerOutput
from loraplex.engine.sequence import Sequence
from loraplex.kv.block_pool import KVCache
from loraplex.lora.batch import EMPTY_SLOT, LoRABatch
from loraplex.model.attention import AttentionMetadata, PrefillChunk
from loraplex.model.context import ForwardContext, forward_context
from loraplex.model.decoder import CausalLM
from loraplex.sampling import Sampler, SamplerOutput
from loraplex.sampling.structured import token_mask


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


class ModelRunner:
    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device) -> None:
        self.model = model
        self.kv_cache = kv_cache
        self.block_size = kv_cache.block_size
        self.device = device
        self.sampler = Sampler()

    @torch.inference_mode()
    def execute(self, sched: SchedulerOutput) -> tuple[list[ScheduledChunk], SamplerOutput | None]:
        """Run one step; returns the chunks that sampled a token and the sampler's output for them."""
        inputs = self.prepare(sched)
        logits = self.forward(inputs)
        if logits is None:
            return [], None
        if inputs.scored:
            logits = self._score_prompts(logits, inputs.scored)
        if not inputs.sampled:
            return [], None
        seqs = [c.seq for c in inputs.sampled]
        mask = token_mask([s.grammar for s in seqs], logits.shape[-1], self.device)
        out = self.sampler(logits, [s.params for s in seqs], [s.generator for s in seqs],
                           [s.prompt_token_ids for s in seqs], [s.output_token_ids for s in seqs], mask)
        return inputs.sampled, out

    @torch.inference_mode()
    def forward(self, inputs: StepInputs) -> torch.Tensor | None:
        """The model on a prepared step: logits [sampled + scored, vocab] at the sampling rows, then the
        prompt rows to score (None if there are none)."""
        with forward_context(ForwardContext(attn=inputs.attn, kv_cache=self.kv_cache, lora=inputs.lora)):
            hidden = self.model(inputs.input_ids, inputs.positions, inputs.long_rope)  # [tokens, hidden]
        if not inputs.sampled and not inputs.scored:
            return None
        # The LM head sees only the sampled rows, so its LoRA batch maps rows, not tokens, to slots.
        with forward_context(ForwardContext(attn=inputs.attn, kv_cache=self.kv_cache, lora=inputs.sample_lora)):
            return self.model.compute_logits(hidden[inputs.sample_rows])  # [sampled, vocab]

    @staticmethod
    def _score_prompts(logits: torch.Tensor, scored: list[tuple[Sequence, int]]) -> torch.Tensor:
        """Record the prompt logprobs of the scored rows (after the sampled ones); return the sampled rows."""
        num_sampled = logits.shape[0] - len(scored)
        targets = torch.tensor([seq.prompt_token_ids[p + 1] for seq, p in scored], device=logits.device)
        logprobs = torch.log_softmax(logits[num_sampled:].float(), dim=-1)  # [scored, vocab]
        values = logprobs.gather(1, targets[:, None]).squeeze(1).tolist()
        for (seq, p), value in zip(scored, values, strict=True):
            assert seq.prompt_logprobs is not None
            seq.prompt_logprobs[p + 1] = value
        return logits[:num_sampled]

    def _lora_batch(self, slots: list[int]) -> LoRABatch | None:
        # Base-model-only steps build no LoRA metadata at all: the wrappers see None and add nothing.
        if all(slot == EMPTY_SLOT for slot in slots):
            return None
        return LoRABatch.from_token_slots(slots, self.device)

    def prepare(self, sched: SchedulerOutput) -> StepInputs:
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
        prefills: list[PrefillChunk] = []
        long_rope: list[bool] = []
        token_slots: list[int] = []
        long_from = getattr(self.model.rope, "long_from", None)
        for chunk in sched.chunks:
            seq, start, n = chunk.seq, chunk.start, chunk.num_new_tokens
            q_start = len(ids)
            ids += seq.tokens(start, start + n)
            table = seq.block_table
            for p in range(start, start + n):
                positions.append(p)
                slots.append(table[p // bs] * bs + p % bs)
            if long_from is not None:
                long_rope += [seq.num_tokens > long_from] * n
            token_slots += [seq.lora_slot] * n
            if n == 1:
                decode_tables.append(table)
                decode_lens.append(start + 1)
            else:
                prefills.append(PrefillChunk(q_start, n, start + n, torch.tensor(table, device=self.device)))
            if chunk.samples:
                sample_rows.append(len(ids) - 1)
                sampled.append(chunk)
            if seq.computes_prompt_logprobs:  # rows whose next token is a prompt token get scored
                last = min(start + n, len(seq.prompt_token_ids) - 1)
                score_rows += range(q_start, q_start + max(0, last - start))
                scored += [(seq, p) for p in range(start, last)]
        width = max((len(t) for t in decode_tables), default=0)
        device = self.device
        attn = AttentionMetadata(
            slot_mapping=torch.tensor(slots, dtype=torch.long, device=device),
            num_decode=len(decode_tables),
            decode_block_tables=torch.tensor([t + [0] * (width - len(t)) for t in decode_tables],
                                             dtype=torch.long, device=device).view(len(decode_tables), width),
            decode_context_lens=torch.tensor(decode_lens, dtype=torch.long, device=device),
            prefills=prefills,
        )
        return StepInputs(
            input_ids=torch.tensor(ids, dtype=torch.long, device=device),
            positions=torch.tensor(positions, dtype=torch.long, device=device),
            long_rope=torch.tensor(long_rope, device=device) if long_from is not None else None,
            attn=attn,
            lora=self._lora_batch(token_slots),
            sample_lora=(self._lora_batch([c.seq.lora_slot for c in sampled] + [s.lora_slot for s, _ in scored])
                         if self.model.lora_head is not None else None),
            sample_rows=torch.tensor(sample_rows + score_rows, dtype=torch.long, device=device),
            sampled=sampled,
            scored=scored,
        )
