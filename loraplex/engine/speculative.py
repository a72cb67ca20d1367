"""Speculative decoding: draft tokens proposed before a step, verified by the step itself.

A speculating request's step computes its last token and its k drafts in one chunk (a prefill chunk of
k + 1 tokens over its KV cache, with its own adapter, beside everyone else's rows) and samples a token at
every position of it. Verification is *exact match with shared random numbers*: the token at position i
is drawn exactly as a step without speculation would draw it (the sampler's draw for step t is a function
of the row's logits, its seed and t alone, `loraplex.sampling.sampler`), and drafts are accepted while
they equal the tokens drawn; the first token drawn that differs (or the one after the last draft) is
kept as well. So every token is the token plain decoding would produce: greedy output is identical, and
sampled output has the target distribution (with the same seed, it is the very same output). For a
draft proposed deterministically (n-gram lookup, a head's argmax) this accepts draft d with probability
p(d), as the rejection sampling of Leviathan et al. / Chen et al. does with a one-hot draft distribution,
so nothing is lost to it.

The KV cache of rejected drafts is rolled back by accounting alone: `num_computed_tokens` advances by the
accepted drafts plus one, so rejected positions are never attended to (a later step overwrites them), are
never hashed into the prefix cache (only computed full blocks are), and blocks allocated for them alone are
returned to the pool (`Scheduler.trim`).

Drafting (`NgramDrafter`): prompt lookup. The last n tokens of prompt + output (n from `ngram_max` down to
`ngram_min`) are looked up among earlier n-grams of the same sequence; the tokens that followed the most
recent earlier occurrence are the drafts. Each sequence keeps an index from n-gram to its latest end,
extended by the tokens added since the last lookup, so drafting costs O(new tokens × n) per step, not a
search of the whole history. Where the request's own tokens have no match, the recent outputs of the same
adapter are looked up (`OutputHistory`, as SuffixDecoding (Oliaro et al., 2024) keeps a global tree of
past outputs): an extraction adapter writes the same keys and punctuation in every answer. Drafts never
change what a request gets, only how fast; like the prefix cache, the history is per adapter.

Drafting (`MedusaDrafter`): the Medusa heads of the request's adapter (loraplex/lora/medusa.py), read after
each step at the hidden state of the row that picked the request's last token.

"Exactly as plain decoding": the same logits up to float rounding. A chunk of k + 1 tokens is computed by
the prefill attention path and different GEMM shapes than a one-token decode, as a request batched with
others is computed differently from one alone; in float32 that has not changed a token in the tests.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import torch

if TYPE_CHECKING:
    from loraplex.adapters.ref import AdapterIdentity
    from loraplex.engine.request import SamplingParams
    from loraplex.engine.sequence import Sequence
    from loraplex.lora.medusa import MedusaHeads

METHODS = ("ngram", "medusa")


@dataclass
class DraftRow:
    """A sampler row for draft position i of a speculating request: its output as if the first i drafts
    were accepted, so the draw (step = its length), penalties and watermark are those of that step."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    grammar: None = None


class NgramIndex:
    """For each n, each n-gram of a token list → the end of its latest occurrence that has a token after it."""

    def __init__(self, ngram_min: int, ngram_max: int) -> None:
        self.maps: dict[int, dict[tuple[int, ...], int]] = {n: {} for n in range(ngram_min, ngram_max + 1)}
        self.indexed = 0
        """n-grams ending before this index are registered."""

    def extend(self, tokens: list[int], lo: int, total: int) -> None:
        """Register the n-grams ending at [indexed, total), given `tokens` = the list's [lo, total)."""
        for n, table in self.maps.items():
            for end in range(max(self.indexed, n, lo + n), total):
                if tokens[end - lo] != SEPARATOR:
                    table[tuple(tokens[end - n - lo:end - lo])] = end
        self.indexed = total

    def find(self, key: tuple[int, ...]) -> int | None:
        return self.maps[len(key)].get(key)


SEPARATOR = -1
"""Between two outputs in an `OutputHistory`: no token, so no n-gram across it matches and no draft crosses it."""


class OutputHistory:
    """The latest outputs of one adapter (or of the base model), each after the last prompt tokens before it,
    at most `capacity` tokens: the drafts for what requests of that adapter tend to write (the JSON keys of
    an extraction adapter, a template's boilerplate) where their own prompt has no match."""

    def __init__(self, ngram_min: int, ngram_max: int, capacity: int) -> None:
        self.ngram_min, self.ngram_max, self.capacity = ngram_min, ngram_max, capacity
        self.tokens: list[int] = []
        self.index = NgramIndex(ngram_min, ngram_max)

    def add(self, context: list[int], output: list[int]) -> None:
        self.tokens += [*context, *output, SEPARATOR]
        if len(self.tokens) > self.capacity:  # keep the newer half, from an output's start: O(1) per token
            cut = len(self.tokens) - self.capacity // 2
            cut = next((i + 1 for i in range(cut - 1, len(self.tokens)) if self.tokens[i] == SEPARATOR), len(self.tokens))
            self.tokens = self.tokens[cut:]
            self.index = NgramIndex(self.ngram_min, self.ngram_max)
        self.index.extend(self.tokens, 0, len(self.tokens))

    def drafts(self, key: tuple[int, ...], limit: int) -> list[int]:
        end = self.index.find(key)
        if end is None:
            return []
        drafts = self.tokens[end:end + limit]
        return drafts[:drafts.index(SEPARATOR)] if SEPARATOR in drafts else drafts


class NgramDrafter:
    """Prompt lookup, then the adapter's output history: for n from `ngram_max` down to `ngram_min`, the
    tokens that followed the latest earlier occurrence of the request's last n tokens in its own prompt and
    output, else in the recent outputs of requests of the same adapter (`history_tokens` per adapter, for
    the `max_histories` adapters used last; 0 turns it off)."""

    def __init__(self, num_tokens: int, ngram_max: int = 3, ngram_min: int = 1, history_tokens: int = 0,
                 max_histories: int = 64) -> None:
        if num_tokens < 1:
            raise ValueError(f"speculative tokens must be >= 1, got {num_tokens}")
        if not 1 <= ngram_min <= ngram_max:
            raise ValueError(f"need 1 <= ngram_min <= ngram_max, got {ngram_min} and {ngram_max}")
        self.num_tokens = num_tokens
        self.ngram_max = ngram_max
        self.ngram_min = ngram_min
        self.history_tokens = history_tokens
        self.max_histories = max_histories
        self.histories: OrderedDict[AdapterIdentity | None, OutputHistory] = OrderedDict()

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to min(`limit`, num_tokens) drafts to follow `seq`'s tokens ([] when nothing matches). A request
        with a grammar (structured output) gets none: its matcher would have to be advanced through the
        drafts and rolled back."""
        limit = min(limit, self.num_tokens)
        if limit <= 0 or seq.grammar is not None or not seq.params.speculate:
            return []
        index = seq.ngrams
        if index is None:
            index = seq.ngrams = NgramIndex(self.ngram_min, self.ngram_max)
        total = seq.num_tokens
        lo = max(0, index.indexed - self.ngram_max)
        tokens = seq.tokens(lo, total)  # total - n >= lo for every n: the keys are in it
        index.extend(tokens, lo, total)  # every n-gram ending before the last token has a token after it
        history = self.histories.get(seq.adapter)
        for n in range(self.ngram_max, self.ngram_min - 1, -1):
            if n >= total:
                continue
            key = tuple(tokens[total - n - lo:total - lo])
            end = index.find(key)
            if end is not None:
                return seq.tokens(end, min(end + limit, total))
            if history is not None:
                drafts = history.drafts(key, limit)
                if drafts:
                    return drafts
        return []

    def finished(self, seq: Sequence) -> None:
        """Keep a finished request's output (after its last prompt tokens) in its adapter's history."""
        if not self.history_tokens or not seq.output_token_ids:
            return
        history = self.histories.pop(seq.adapter, None) or OutputHistory(self.ngram_min, self.ngram_max,
                                                                          self.history_tokens)
        self.histories[seq.adapter] = history  # the most recently used last
        while len(self.histories) > self.max_histories:
            self.histories.popitem(last=False)
        history.add(seq.prompt_token_ids[-self.ngram_max:], seq.output_token_ids)


class Drafter(Protocol):
    def propose(self, seq: Sequence, limit: int) -> list[int]:
        """Up to `limit` draft tokens to follow `seq`'s tokens."""
        ...

    def finished(self, seq: Sequence) -> None:
        """`seq` ended normally (what it wrote may help later drafts)."""
        ...


class MedusaDrafter:
    """Drafts from Medusa heads (loraplex/lora/medusa.py): a request's own adapter's heads, else `base` (the
    server's head set, if any); requests with neither draft only by `lookup`, if given. After each step the heads read the
    hidden state of the position that picked each request's last token (`draft`), and their argmax tokens
    are the request's drafts for the next step: a chain, verified as n-gram drafts are.

    Chain, not tree: the drafts of a request are then one causal chunk, which the paged attention of every
    backend (and the mixed batch) already runs; a tree of candidates would need a tree mask in each of
    them. Top-1 chains accept fewer tokens per step than Medusa's trees (the paper's figures: about 0.3 to
    0.5 fewer), and verify fewer rows.
    """

    def __init__(self, num_tokens: int, head_logits: Callable[[torch.Tensor], torch.Tensor],
                 heads_of: Callable[[AdapterIdentity], MedusaHeads | None], base: MedusaHeads | None,
                 device: torch.device, dtype: torch.dtype, lookup: NgramDrafter | None = None) -> None:
        """`head_logits`: the base LM head that version-2 heads read through (`CausalLM.draft_logits`).
        `lookup`: drafts by prompt lookup in the request's own tokens first, where they match (heads see
        no prompt: they cannot copy a name or a number from it)."""
        self.num_tokens = num_tokens
        self.lookup = lookup
        self.head_logits = head_logits
        self.heads_of = heads_of
        self.device, self.dtype = device, dtype
        self.base = base.to(device, dtype) if base is not None else None
        self._on_device: OrderedDict[int, tuple[MedusaHeads, MedusaHeads]] = OrderedDict()  # id(host) → (host, device)

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        if seq.grammar is not None or not seq.params.speculate:
            return []
        if self.lookup is not None:
            drafts = self.lookup.propose(seq, limit)
            if drafts:
                return drafts
        return seq.medusa_drafts[:min(limit, self.num_tokens)]

    def finished(self, seq: Sequence) -> None:
        pass

    def heads(self, seq: Sequence) -> MedusaHeads | None:
        """The heads drafting for `seq` (on the device), or None."""
        host = self.heads_of(seq.adapter) if seq.adapter is not None else None
        if host is None:
            return self.base
        entry = self._on_device.pop(id(host), None)
        if entry is None or entry[0] is not host:
            entry = (host, host.to(self.device, self.dtype))
        self._on_device[id(host)] = entry  # most recently used last
        while len(self._on_device) > 64:
            self._on_device.popitem(last=False)
        return entry[1]

    @torch.inference_mode()
    def draft(self, rows: dict[Sequence, int], hidden: torch.Tensor) -> None:
        """Set each request's next drafts from `hidden` [rows, hidden], the final hidden states of the step's
        sampled rows; `rows` maps each request that goes on to the row that picked its last token."""
        groups: dict[int, tuple[MedusaHeads, list[Sequence], list[int]]] = {}
        for seq, row in rows.items():
            if seq.finish_reason is not None or seq.grammar is not None or not seq.params.speculate:
                continue
            heads = self.heads(seq)
            if heads is None:
                seq.medusa_drafts = []
                continue
            group = groups.setdefault(id(heads), (heads, [], []))
            group[1].append(seq)
            group[2].append(row)
        for heads, seqs, index in groups.values():
            x = hidden.index_select(0, torch.tensor(index, device=hidden.device))  # [n, hidden]
            h = heads.hidden(x)  # [heads, n, hidden]
            if heads.out is None:
                logits = self.head_logits(h.reshape(-1, h.shape[-1])).view(h.shape[0], len(seqs), -1)
            else:
                logits = torch.stack([torch.nn.functional.linear(h[i], w) for i, w in enumerate(heads.out)])
            drafts = logits.argmax(dim=-1).t().tolist()  # [n, heads]
            for seq, tokens in zip(seqs, drafts, strict=True):
                seq.medusa_drafts = tokens


def check_method(method: str) -> str:
    if method not in METHODS:
        raise ValueError(f"speculative_method must be one of {', '.join(METHODS)}, got {method!r}")
    return method

