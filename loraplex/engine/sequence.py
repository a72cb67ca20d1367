"""A request's mutable state inside the engine: its tokens, KV blocks, progress and seed."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from loraplex.engine.request import FinishReason, SamplingParams, TokenLogprob

if TYPE_CHECKING:
    from loraplex.adapters.ref import AdapterIdentity
    from loraplex.engine.detokenizer import IncrementalDetokenizer
    from loraplex.engine.speculative import NgramIndex
    from loraplex.sampling.structured import GrammarMatcher


UNREAD = -1
"""A placeholder in `output_token_ids` for a token sampled on the device and not read yet (`Sequence.unread`)."""


class SequenceStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    PARKED = "parked"
    """Admitted (it keeps its KV blocks and seat) while its adapter waits for a device slot."""
    FINISHED = "finished"


@dataclass(eq=False)
class Sequence:
    request_id: str
    prompt_token_ids: list[int]
    params: SamplingParams
    seed: int
    """Its draws' seed: the token of step t is drawn at a uniform number hashed from (seed, t)."""
    detokenizer: IncrementalDetokenizer | None = None
    prompt: str | None = None
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)
    block_table: list[int] = field(default_factory=list)
    num_computed_tokens: int = 0
    """Tokens whose keys and values are in the KV cache."""
    status: SequenceStatus = SequenceStatus.WAITING
    finish_reason: FinishReason | None = None
    adapter: AdapterIdentity | None = None
    """The request's LoRA adapter; None serves the base model."""
    lora_slot: int = -1
    """The device slot holding the adapter while the sequence runs; -1 when it holds none."""
    arrival: int = -1
    """Order in which the scheduler received the sequence (FCFS within an adapter, across preemptions)."""
    block_hashes: list[bytes] = field(default_factory=list)
    """Prefix-cache hashes of the first full blocks of prompt + output, computed as needed."""
    num_cached_blocks: int = 0
    """Leading blocks of `block_table` registered in the prefix cache."""
    prompt_logprobs: list[float | None] | None = None
    """Filled by the runner as the prompt is computed, when `params.prompt_logprobs` asks for them."""
    grammar: GrammarMatcher | None = None
    """Structured output: where the output stands in `params.json_schema`'s grammar; None = unconstrained."""
    every_token: bool = True
    """Whether the caller reads an output at every step; if not, the engine builds only the first (for
    time-to-first-token) and the final one."""
    stop_ids: frozenset[int] = frozenset()
    """The tokens that end it as EOS_TOKEN: `params.stop_token_ids`, and the model's EOS tokens unless
    `params.ignore_eos` (a grammar's EOS always ends it). Set by the engine when it takes the request."""
    max_output: int = 1 << 62
    """Output tokens at which it ends as LENGTH: `params.max_new_tokens`, or fewer where the model's length
    runs out first. Set by the engine when it takes the request."""
    ngrams: NgramIndex | None = None
    """Speculative decoding: the n-gram index its drafts are looked up in (built on its first lookup)."""
    draft_tokens: int = 0
    """Draft tokens it proposed (speculative decoding)."""
    accepted_tokens: int = 0
    """Of those, the ones accepted."""
    verify_steps: int = 0
    """Steps that verified drafts of it."""
    medusa_drafts: list[int] = field(default_factory=list)
    """Speculative decoding by Medusa heads: the drafts its heads proposed after its last step."""
    unread: int = 0
    """Async scheduling: the last `unread` of `output_token_ids` are placeholders (UNREAD) for tokens a
    queued step sampled on the device and the host has not read yet. At most 1: a step's tokens are read
    before the next one's sampling is queued."""

    @property
    def computes_prompt_logprobs(self) -> bool:
        """Still computing the prompt and asked for its logprobs (so every prompt position must be run)."""
        return self.prompt_logprobs is not None and not self.output_token_ids

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def is_decode(self) -> bool:
        """Whether the next step computes just the last sampled token (anything else is prefill)."""
        return bool(self.output_token_ids) and self.num_computed_tokens == self.num_tokens - 1

    def token_at(self, i: int) -> int:
        """Token i >= 0 of prompt + output."""
        n = len(self.prompt_token_ids)
        if i < 0:
            raise IndexError(f"token {i} of a sequence of {self.num_tokens}")
        return self.prompt_token_ids[i] if i < n else self.output_token_ids[i - n]

    def tokens(self, start: int, end: int) -> list[int]:
        """Tokens [start, end) of prompt + output, without concatenating the whole history."""
        n = len(self.prompt_token_ids)
        if end <= n:
            return self.prompt_token_ids[start:end]
        if start >= n:
            return self.output_token_ids[start - n:end - n]
        return self.prompt_token_ids[start:] + self.output_token_ids[:end - n]
