"""Structured output: decoding constrained to a JSON schema, with llguidance as the grammar engine.

A request's schema is checked when its `SamplingParams` are built (`check_json_schema`), compiled once
per distinct schema text against the engine's tokenizer (`GrammarCompiler`), and followed token by
token by a per-sequence `GrammarMatcher`. Each step, `token_mask` asks the constrained rows' matchers
which tokens may come next; the sampler then draws only among those. Unconstrained rows pay nothing.
"""

from __future__ import annotations

import functools
import json
import logging
import threading
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import llguidance
import llguidance.hf
import torch
from transformers import PreTrainedTokenizerFast

from loraplex.device import to_device

if TYPE_CHECKING:
    from llguidance._lib import JsonCompileOptions
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)

MAX_SCHEMA_BYTES = 64 * 1024
JSON_OBJECT_SCHEMA = '{"type": "object"}'
"""What `response_format: {"type": "json_object"}` asks for: any JSON object."""

# No free whitespace: small models given the choice tend to emit newlines until max_new_tokens. The
# separators are json.dumps' defaults, the spelling models have seen most.
_JSON_OPTIONS: JsonCompileOptions = {
    "whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}
_BITS = 32  # llguidance packs the allowed-token set into int32 words, bit i of word w = token 32·w + i


def check_json_schema(schema: str) -> None:
    """ValueError naming the problem unless `schema` is JSON-schema text that llguidance can compile."""
    _grammar(schema)


@functools.lru_cache(maxsize=256)
def _grammar(schema: str) -> str:
    """The llguidance grammar for a schema; cached because every request carrying it is validated."""
    if not isinstance(schema, str):
        raise ValueError(f"json_schema must be a string holding a JSON schema, got {type(schema).__name__}")
    size = len(schema.encode())
    if size > MAX_SCHEMA_BYTES:
        raise ValueError(f"json_schema is {size} bytes; at most {MAX_SCHEMA_BYTES} are allowed")
    try:
        parsed = json.loads(schema)
    except json.JSONDecodeError as e:
        raise ValueError(f"json_schema is not valid JSON: {e}") from None
    if not isinstance(parsed, dict):
        raise ValueError(f"json_schema must be a JSON object, got {schema[:80]!r}")
    try:
        grammar = llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=_JSON_OPTIONS)
        error = llguidance.LLMatcher.validate_grammar(grammar)
    except Exception as e:  # whatever the grammar library raises on a hostile schema is the request's (422)
        raise ValueError(f"json_schema is not a usable JSON schema: {e}") from None
    if error:
        raise ValueError(f"json_schema is not a usable JSON schema: {error}")
    return grammar


class GrammarMatcher:
    """One sequence's position in its grammar: which tokens may come next, advanced by each sampled token.

    Its state is a function of the sequence's output tokens alone, so a preempted sequence (whose KV is
    recomputed, while its output tokens are kept) keeps its matcher as it is.
    """

    def __init__(self, matcher: llguidance.LLMatcher, vocab_size: int) -> None:
        self._matcher = matcher
        self.vocab_size = vocab_size
        """Tokens the grammar's tokenizer knows (>= the model's logits width)."""

    def advance(self, token_id: int) -> None:
        # The mask makes a refused token impossible; should one slip through anyway the matcher enters
        # its error state, whose mask allows only EOS, so the sequence ends instead of running unconstrained.
        # (The error state counts as stopped: whether the grammar had stopped is read before the token.)
        stopped = self._matcher.is_stopped()
        if not self._matcher.consume_token(token_id) and not stopped:
            log.warning("grammar refused token %d: %s", token_id, self._matcher.get_error())

    @property
    def done(self) -> bool:
        """Whether the grammar is complete and nothing but EOS may follow."""
        return self._matcher.is_stopped()

    @property
    def error(self) -> str:
        """The matcher's error message; empty while it follows the grammar."""
        return self._matcher.get_error()


class GrammarCompiler:
    """Compiles schemas against one tokenizer, each distinct schema once (a bounded, thread-safe LRU).

    Building the llguidance tokenizer takes about a second, so one compiler lives as long as its engine.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, vocab_size: int, eos_token_ids: Iterable[int],
                 cache_size: int = 128) -> None:
        if cache_size < 1:
            raise ValueError(f"cache_size must be >= 1, got {cache_size}")
        # The model's vocabulary may be padded past the tokenizer's; the mask must cover every logit.
        self.vocab_size = max(vocab_size, len(tokenizer))
        if not isinstance(tokenizer, PreTrainedTokenizerFast):
            raise ValueError(f"structured output needs a fast (tokenizers) tokenizer, not {type(tokenizer).__name__}")
        self._tokenizer = llguidance.hf.from_tokenizer(tokenizer, n_vocab=self.vocab_size,
                                                       eos_token=sorted(eos_token_ids))
        self._cache_size = cache_size
        self._templates: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._lock = threading.Lock()

    def matcher(self, schema: str) -> GrammarMatcher:
        """A fresh matcher at the start of `schema`'s grammar; ValueError naming the problem if it has none."""
        with self._lock:
            template = self._templates.get(schema)
            if template is not None:
                self._templates.move_to_end(schema)
                return GrammarMatcher(template.deep_copy(), self.vocab_size)
        grammar = _grammar(schema)
        try:
            template = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
        except Exception as e:  # the request's schema, not the server, is at fault: HTTP 422
            raise ValueError(f"json_schema cannot be compiled: {e}") from None
        if template.is_error():
            raise ValueError(f"json_schema cannot be compiled: {template.get_error()}")
        with self._lock:
            self._templates[schema] = template
            while len(self._templates) > self._cache_size:
                self._templates.popitem(last=False)
        return GrammarMatcher(template.deep_copy(), self.vocab_size)

    def __len__(self) -> int:
        with self._lock:
            return len(self._templates)


@dataclass
class TokenMask:
    """The tokens the constrained rows of one step may sample; the other rows are untouched."""

    rows: torch.Tensor     # [n] long: batch rows that carry a grammar
    allowed: torch.Tensor  # [n, vocab] bool

    def apply(self, logits: torch.Tensor) -> torch.Tensor:
        """`logits` [batch, vocab] with the refused tokens of the constrained rows at -inf (out of place)."""
        masked = logits[self.rows].masked_fill(~self.allowed, float("-inf"))  # [n, vocab]
        return logits.index_copy(0, self.rows, masked)


def token_mask(matchers: Sequence[GrammarMatcher | None], vocab_size: int,
               device: torch.device) -> TokenMask | None:
    """The allowed tokens of every row with a matcher (None when no row has one)."""
    constrained = [(i, m) for i, m in enumerate(matchers) if m is not None]
    if not constrained:
        return None
    rows = [i for i, _ in constrained]
    # Every matcher of an engine shares one tokenizer, whose vocabulary may be padded past the logits'.
    words = -(-max(m.vocab_size for _, m in constrained) // _BITS)
    assert words * _BITS >= vocab_size, f"grammar vocabulary {words * _BITS} < logits width {vocab_size}"
    bitmask = torch.empty(len(rows), words, dtype=torch.int32)  # [n, words], filled by llguidance
    # The executor computes the rows' masks in parallel, without the GIL, straight into the tensor.
    _executor().unsafe_compute_mask_ptr([(m._matcher, j) for j, (_, m) in enumerate(constrained)],
                                        bitmask.data_ptr(), words * 4, len(rows))
    bitmask = to_device(bitmask, device)
    shifts = torch.arange(_BITS, dtype=torch.int32, device=device)  # [32]
    bits = (bitmask.unsqueeze(-1) >> shifts) & 1  # [n, words, 32]
    allowed = bits.view(len(rows), words * _BITS)[:, :vocab_size].bool()  # [n, vocab]
    return TokenMask(to_device(torch.tensor(rows, dtype=torch.long), device), allowed)


@functools.cache
def _executor() -> llguidance.LLExecutor:
    return llguidance.LLExecutor()
