"""Batched next-token sampling: penalties, temperature, top-k / top-p / typical filtering, seeded draws."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from loraplex.device import to_device
from loraplex.engine.request import SamplingParams, TokenLogprob
from loraplex.sampling.filters import (
    Candidates,
    FilterTable,
    apply_filters,
    candidate_tiers,
    temperature_column,
    uses_candidates,
)
from loraplex.sampling.penalties import PenaltyTable, TokenHistory, vector
from loraplex.sampling.structured import TokenMask

LOGPROB_FLOOR = -9999.0
"""The lowest logprob reported, and what a token of (numerically) zero probability gets: OpenAI's own
value for such tokens. JSON has no -inf or NaN, so no reported logprob may be one."""


@dataclass
class SamplerOutput:
    """One step's result for a batch: a token per row, and its logprobs where the row asked for them."""

    token_ids: list[int]
    logprobs: list[TokenLogprob | None]
    """Per row; None where `params.logprobs` is None."""


class SampleRow(Protocol):
    """What the sampler reads of one batch row (the engine's `Sequence` is one)."""

    params: SamplingParams
    seed: int
    prompt_token_ids: list[int]
    output_token_ids: list[int]
    """Append-only while the row lives; its length is the step whose token is drawn."""


class Sampler:
    """Picks the next token for every row of a batch, applying each row's own `SamplingParams`.

    Order, as HF transformers applies its processors: repetition penalty (prompt + output tokens),
    then frequency / presence penalties (output tokens), then greedy argmax when `temperature == 0`;
    otherwise temperature, top-k, top-p, typical-p, and a draw from the resulting softmax.

    Determinism: a sampled row's draw at step t (its `len(output_token_ids)`) inverts the cumulative
    distribution of its filtered softmax at one uniform number that is a hash of (seed, t) (`uniforms`):
    in the order of decreasing probability (equal ones: the higher token id first) for the rows whose
    only filters are top-k / top-p, worked out among their most likely tokens, in vocabulary order for
    the others. A row's token therefore depends only on its logits, its seed and its step,
    never on the rest of the batch or on what was sampled before, and every row is drawn in one batched
    operation with no per-row random generator. Greedy rows draw nothing.

    Logprobs come from the log-softmax of the logits after penalties and temperature (temperature 1
    for greedy rows), before top-k / top-p / typical filtering: they describe the model's distribution
    at this temperature, so a token the filters removed still gets a finite logprob, and the values
    do not jump when a client changes `top_p`. They are never below LOGPROB_FLOOR (nor NaN).

    A grammar `mask` (structured output) removes the tokens its rows may not sample before the greedy
    pick and the filters. Like the filters, it does not change the logprobs: they stay the model's.

    The penalties' token counts are kept from step to step for the rows that come back (the same row
    objects, their outputs grown by the tokens sampled since), so a step adds only the new tokens
    instead of scattering every row's whole history again.
    """

    def __init__(self) -> None:
        self._history = TokenHistory()
        self._table: _BatchTable | None = None

    def _table_for(self, params: list[SamplingParams], vocab: int, device: torch.device) -> _BatchTable:
        """The batch's parameter table: the last one while the same requests' parameters come back."""
        t = self._table
        if t is None or t.vocab != vocab or t.device != device or list(map(id, params)) != t.ids:
            t = self._table = _BatchTable(params, vocab, device)
        return t

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, vocab], any float dtype
        rows: Sequence[SampleRow],
        mask: TokenMask | None = None,
    ) -> SamplerOutput:
        table, scaled, tokens = self._pick(logits, rows, mask)
        token_ids: list[int] = tokens.tolist()
        t = logprob_tensors(scaled, tokens, table.params) if scaled is not None and table.logprobs else None
        if t is None:
            return SamplerOutput(token_ids, [None] * len(token_ids))
        # One transfer per tensor: per-row .tolist() would sync with the device once per row.
        return SamplerOutput(token_ids, t.build(token_ids, table.params, t.chosen.tolist(), t.top_ids.tolist(),
                                                t.top_values.tolist()))

    def tokens(self, logits: torch.Tensor, rows: Sequence[SampleRow], mask: TokenMask | None = None
               ) -> tuple[torch.Tensor, LogprobTensors | None]:
        """Each row's token, as `__call__` picks it, as a long tensor [batch] on the logits' device that the
        host has not waited for (the next step's inputs read it there: async scheduling), and the logprobs of
        the rows that want them, as tensors."""
        table, scaled, tokens = self._pick(logits, rows, mask)
        return tokens, logprob_tensors(scaled, tokens, table.params) if scaled is not None and table.logprobs else None

    def _pick(self, logits: torch.Tensor, rows: Sequence[SampleRow], mask: TokenMask | None
              ) -> tuple[_BatchTable, torch.Tensor | None, torch.Tensor]:
        """The batch's parameter table, the penalized, temperature-scaled logits the logprobs come from (None
        for a plain greedy batch), and each row's token, long [batch] on the logits' device."""
        batch, vocab = logits.shape
        if len(rows) != batch:
            raise ValueError(f"sampler inputs disagree on batch size: logits {batch}, rows {len(rows)}")
        table = self._table_for([r.params for r in rows], vocab, logits.device)
        if table.plain_greedy:
            return table, None, argmax(logits if mask is None else mask.apply(logits))
        # Every step below is out of place, so the caller's tensor is never written to.
        penalized = self._history.penalize(logits.float(), rows, table.penalties)
        scaled = penalized if table.temperature is None else penalized / table.temperature  # [batch, vocab]
        choice = scaled if mask is None else mask.apply(scaled)  # [batch, vocab]
        # Greedy rows are divided by 1, which is exact, so their argmax is the argmax of the penalized logits.
        greedy = argmax(_rows(choice, table.greedy)) if table.greedy else None
        drawn = self._draw(_rows(choice, table.sampled), [rows[i] for i in table.sampled], table) if table.sampled else None
        if drawn is None or greedy is None:
            tokens = greedy if drawn is None else drawn
            assert tokens is not None
        else:
            tokens = torch.empty(batch, dtype=torch.long, device=logits.device)
            tokens.index_copy_(0, vector(table.greedy, torch.long, logits.device), greedy)
            tokens.index_copy_(0, vector(table.sampled, torch.long, logits.device), drawn)
        # A row of NaN logits draws whatever its draw gives: kept inside the vocabulary, so that the logprobs'
        # gather and (async scheduling) the next step's embedding lookup never read out of bounds before the
        # row is found and ended (the caller checks that the logits were finite).
        return table, scaled, tokens.clamp_(0, vocab - 1)

    @staticmethod
    def _draw(logits: torch.Tensor, rows: Sequence[SampleRow], table: _BatchTable) -> torch.Tensor:
        """A seeded draw for each (sampled) row of temperature-scaled `logits` [n, vocab] from its filtered
        softmax: the tokens, long [n] on the logits' device."""
        u = to_device(uniforms([r.seed for r in rows], [len(r.output_token_ids) for r in rows]), logits.device)  # [n]
        ranked, in_order = table.ranked, table.in_order
        picked = drawn = None
        if ranked:
            x, u_ranked = _rows(logits, ranked), _rows(u, ranked)
            first, wider = candidate_tiers(x, table.ranked_params, table.filters)
            picked = _draw_ranked(first, u_ranked)
            for index, c in wider:
                picked = picked.index_copy(0, index, _draw_ranked(c, u_ranked.index_select(0, index)))
            if not in_order:
                return picked
        if in_order:
            x = apply_filters(_rows(logits, in_order), table.in_order_params)  # typical-p, or nothing
            weights = (x - x.amax(dim=-1, keepdim=True)).exp()  # [m, vocab] the softmax, unnormalized
            drawn = draw(weights, _rows(u, in_order))
            if not ranked:
                return drawn
        assert picked is not None and drawn is not None
        token_ids = torch.empty(len(rows), dtype=torch.long, device=logits.device)
        token_ids.index_copy_(0, vector(ranked, torch.long, logits.device), picked)
        return token_ids.index_copy_(0, vector(in_order, torch.long, logits.device), drawn)


class _BatchTable:
    """What the sampler derives from a batch's parameters (which rows draw, and how; the per-row parameter
    tensors): built when the batch's requests change, kept while the same ones come back, so a decode
    step does no per-row Python work for it."""

    def __init__(self, params: list[SamplingParams], vocab: int, device: torch.device) -> None:
        self.params = params  # held: while they live, their ids cannot name other objects
        self.ids = list(map(id, params))
        self.vocab = vocab
        self.device = device
        self.plain_greedy = all(p.plain_greedy for p in params)
        self.greedy = [i for i, p in enumerate(params) if p.greedy]
        self.sampled = [i for i, p in enumerate(params) if not p.greedy]
        self.logprobs = any(p.logprobs is not None for p in params)
        self.temperature = temperature_column(params, device)
        self.penalties = PenaltyTable(params, device)
        sampled = [params[i] for i in self.sampled]
        # Among the sampled rows: those whose filters `candidates` works out, and the others.
        self.ranked = [j for j, p in enumerate(sampled) if p.typical_p == 1.0 and uses_candidates(p)]
        ranked = set(self.ranked)
        self.in_order = [j for j in range(len(sampled)) if j not in ranked]
        self.ranked_params = [sampled[j] for j in self.ranked]
        self.in_order_params = [sampled[j] for j in self.in_order]
        self.filters = FilterTable(self.ranked_params, vocab, device)


def _rows(x: torch.Tensor, rows: list[int]) -> torch.Tensor:
    """`x[rows]`, without the copy when `rows` are all of them in order."""
    return x if len(rows) == x.shape[0] else x.index_select(0, vector(rows, torch.long, x.device))


def argmax(logits: torch.Tensor) -> torch.Tensor:
    """Each row's first most likely token, long [rows] on the logits' device. On a CPU numpy's argmax is
    2.5-9 times faster than torch's max / argmax (which vectorise the value but not the index)."""
    if logits.device.type == "cpu" and logits.dtype == torch.float32:
        return torch.from_numpy(logits.numpy().argmax(axis=1).astype(np.int64))
    return logits.max(dim=-1).indices


def _draw_ranked(c: Candidates, u: torch.Tensor) -> torch.Tensor:
    """The draw over the kept candidates, most likely first: their cumulative weights inverted at `u`."""
    weights = (c.values - c.values[:, :1]).exp().masked_fill(~c.keep, 0.0)  # [n, width]
    return c.ids.gather(1, draw(weights, u).unsqueeze(1)).squeeze(1)  # [n]


_GOLDEN_GAMMA = np.uint64(0x9E3779B97F4A7C15)
_SEED_KEY = np.uint64(0x5851F42D4C957F2D)


def _mix64(z: np.ndarray) -> np.ndarray:
    """SplitMix64's output function (Steele et al. 2014): a bijection of uint64 that mixes every bit."""
    z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms(seeds: Sequence[int], steps: Sequence[int]) -> torch.Tensor:
    """One uniform number in [0, 1) per (seed, step) pair, float64 [n]: SplitMix64 seeded by the mixed
    seed and advanced to the step, so every step of every seed is an independent, reproducible draw that
    needs no generator state."""
    with np.errstate(over="ignore"):  # uint64 arithmetic wraps modulo 2**64, which the mixing relies on
        base = _mix64(np.array(seeds, dtype=np.uint64) ^ _SEED_KEY)
        z = _mix64(base + (np.array(steps, dtype=np.uint64) + np.uint64(1)) * _GOLDEN_GAMMA)
    return torch.from_numpy((z >> np.uint64(11)).astype(np.float64) * 2.0**-53)


def draw(probs: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Inverse-CDF sampling: per row of `probs` [n, vocab] (rows sum to about 1, zeros allowed), the
    first token whose cumulative probability exceeds `u` [n] times the row's total: token i has chance
    probs[i] / total, and a token of probability 0 is never drawn."""
    cdf = probs.cumsum(dim=-1)  # [n, vocab]
    total = cdf[:, -1:]  # [n, 1]
    # u < 1, yet u * total may round up to total; the largest float below it still lands on a token p > 0.
    x = torch.minimum(u.to(cdf.dtype).unsqueeze(1) * total, torch.nextafter(total, torch.zeros_like(total)))
    return torch.searchsorted(cdf, x, right=True).squeeze(1)  # [n]


@dataclass
class LogprobTensors:
    """The logprobs of a batch's rows that want them, on the device: `rows` (indices into the batch), the
    chosen tokens' logprobs `chosen` [m], and the `top` [m, k] most likely (`top_ids`, `top_values`), with k
    the most any of those rows asks for."""

    rows: list[int]
    chosen: torch.Tensor  # [m] float
    top_values: torch.Tensor  # [m, k] float
    top_ids: torch.Tensor  # [m, k] long

    def build(self, token_ids: list[int], params: Sequence[SamplingParams], chosen: list[float],
              top_ids: list[list[int]], top_values: list[list[float]]) -> list[TokenLogprob | None]:
        """Each row's TokenLogprob (None where not wanted) from these tensors as lists, read on the host."""
        out: list[TokenLogprob | None] = [None] * len(params)
        for j, i in enumerate(self.rows):
            k = params[i].logprobs or 0
            out[i] = TokenLogprob(token_ids[i], chosen[j], tuple(zip(top_ids[j][:k], top_values[j][:k], strict=True)))
        return out


def logprob_tensors(
    scaled: torch.Tensor,  # [batch, vocab] penalized, temperature-scaled
    token_ids: torch.Tensor,  # [batch] long, on the logits' device
    params: Sequence[SamplingParams],
) -> LogprobTensors | None:
    """The logprobs of the rows whose parameters want them, as tensors (None if none does)."""
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return None
    log_probs = _rows(scaled, wanted).log_softmax(dim=-1)  # [m, vocab]
    chosen = _floored(log_probs.gather(1, _rows(token_ids, wanted).unsqueeze(1)).squeeze(1))  # [m]
    k_max = min(max(params[i].logprobs or 0 for i in wanted), log_probs.shape[-1])
    top_values, top_ids = log_probs.topk(k_max, dim=-1)  # [m, k_max], most likely first
    return LogprobTensors(wanted, chosen, _floored(top_values), top_ids)


def _floored(logprobs: torch.Tensor) -> torch.Tensor:
    """`logprobs` with -inf, NaN and anything below LOGPROB_FLOOR at the floor (only the few values reported)."""
    return logprobs.nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)
