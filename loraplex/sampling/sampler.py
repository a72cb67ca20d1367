"""Batched next-token sampling: penalties, temperature, top-k / top-p / typical filtering, seeded draws."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from loraplex.engine.request import SamplingParams, TokenLogprob
from loraplex.sampling.penalties import TokenHistory, column
from loraplex.sampling.structured import TokenMask

_NEG_INF = float("-inf")

LOGPROB_FLOOR = -9999.0
"""The lowest logprob reported, and what a token of (numerically) zero probability gets: OpenAI's own
value for such tokens. JSON has no -inf or NaN, so no reported logprob may be one."""
MIN_TEMPERATURE = 1e-2
"""Smaller positive temperatures sample as this one (as vLLM does): dividing logits by less overflows
float32 to inf, and the softmax of inf is NaN. At 0.01 sampling is already all but greedy."""


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
    distribution of its filtered softmax, in vocabulary order, at one uniform number that is a hash of
    (seed, t) (`uniforms`). A row's token therefore depends only on its logits, its seed and its step,
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

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, vocab], any float dtype
        rows: Sequence[SampleRow],
        mask: TokenMask | None = None,
    ) -> SamplerOutput:
        batch, vocab = logits.shape
        if len(rows) != batch:
            raise ValueError(f"sampler inputs disagree on batch size: logits {batch}, rows {len(rows)}")
        params = [r.params for r in rows]
        if all(p.plain_greedy for p in params):
            if mask is not None:
                logits = mask.apply(logits)
            # max().indices: the same first-maximum index as argmax, about 2.5x faster on CPU.
            return SamplerOutput(logits.max(dim=-1).indices.tolist(), [None] * batch)

        # Every step below is out of place, so the caller's tensor is never written to.
        logits = self._history.penalize(logits.float(), rows)
        scaled = apply_temperature(logits, params)  # [batch, vocab]
        choice = scaled if mask is None else mask.apply(scaled)  # [batch, vocab]
        # Greedy rows are divided by 1, which is exact, so their argmax is the argmax of the penalized logits.
        token_ids = choice.max(dim=-1).indices  # [batch]

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            index = torch.tensor(sampled, device=logits.device)
            filtered = apply_filters(choice[index], [params[i] for i in sampled])  # [n_sampled, vocab]
            u = uniforms([rows[i].seed for i in sampled], [len(rows[i].output_token_ids) for i in sampled])
            token_ids[index] = draw(filtered.softmax(dim=-1), u.to(logits.device))

        return SamplerOutput(token_ids.tolist(), _logprobs(scaled, token_ids, params))


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


def apply_temperature(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Divide each row by its temperature (HF `TemperatureLogitsWarper`); greedy rows are left as they are.
    Never writes to `logits`: returns it as is when every temperature is 1, else a new tensor."""
    temperatures = [max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params]
    if all(t == 1.0 for t in temperatures):
        return logits  # a copy would be a batch × vocab allocation per step
    return logits / column(temperatures, logits.device)  # [batch, vocab]


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then typical-p, each equal to the HF warper with `min_tokens_to_keep=1`.

    `logits` are already temperature-scaled; removed tokens become -inf. A disabled filter (top_k 0,
    top_p 1, typical_p 1) leaves its rows untouched, as HF then does not add the warper at all.
    """
    logits = _on_rows(logits, params, lambda p: p.top_k > 0 or p.top_p < 1.0, _top_k_top_p)
    return _on_rows(logits, params, lambda p: p.typical_p < 1.0, _typical)


TOP_P_CANDIDATES = 1024
"""Top-p without top-k looks for its cut among this many most likely tokens (one `topk` instead of a sort
of the whole vocabulary, 45 times faster for 256 rows of 49,152 on a CPU); a row whose candidates hold
less than its top_p of the mass falls back to the full sort."""
_MASS_MARGIN = 1e-3  # candidates must hold top_p + this, so float rounding can never hide a kept token


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, as the HF warpers, from the rows' most likely tokens instead of a full sort.

    Top-k keeps the tokens at least as likely as the k-th (ties with it survive, as in HF). Top-p then
    works on the top-k survivors (or the TOP_P_CANDIDATES most likely tokens) in HF's ascending order,
    equal logits ordered by token id as HF's stable sort orders them, and removes the tokens whose
    cumulative probability is at most 1 - top_p, keeping the most likely one."""
    n, vocab = logits.shape
    device = logits.device
    top_k = [min(p.top_k, vocab) if p.top_k > 0 else 0 for p in params]
    width = max(k or min(vocab, TOP_P_CANDIDATES) for k in top_k)
    values, ids = logits.topk(width, dim=-1)  # [n, width] most likely first
    has_k = torch.tensor([k > 0 for k in top_k], device=device).unsqueeze(1)  # [n, 1]
    kth_index = torch.tensor([max(k, 1) - 1 for k in top_k], device=device).unsqueeze(1)  # [n, 1]
    kth = values.gather(1, kth_index).masked_fill(~has_k, _NEG_INF)  # [n, 1]
    masked = logits.masked_fill(logits < kth, _NEG_INF)  # [n, vocab] top-k applied
    wants_p = [p.top_p < 1.0 for p in params]
    if not any(wants_p):
        return masked

    # Candidates in HF's ascending order: by logit, equal logits by token id.
    by_id = ids.argsort(dim=1)  # [n, width]
    order = by_id.gather(1, values.gather(1, by_id).argsort(dim=1, stable=True))
    cand_ids = ids.gather(1, order)  # [n, width] ascending
    cand = logits.gather(1, cand_ids)  # [n, width]
    cand = cand.masked_fill(cand < kth, _NEG_INF)  # the top-k survivors among them
    top = masked.max(dim=-1, keepdim=True).values  # [n, 1]
    total = (masked - top).exp().sum(dim=-1, keepdim=True)  # [n, 1] softmax denominator, whole vocab
    probs = (cand - top).exp() / total  # [n, width]
    mass = probs.sum(dim=-1)  # [n]
    cutoff = column([1.0 - p.top_p for p in params], device)  # [n, 1]
    # What lies below the candidates in ascending order: nothing for top-k rows (their other tokens are
    # removed) or when the candidates are the whole vocabulary, else the uncounted tail's mass.
    rest = torch.zeros(n, 1, device=device)
    if width < vocab:
        rest = torch.where(has_k, rest, (1.0 - mass).clamp(min=0).unsqueeze(1))
    remove = (rest + probs.cumsum(dim=-1)) <= cutoff  # [n, width]
    remove[:, -1] = False  # the most likely token always survives
    kept = torch.full_like(logits, _NEG_INF).scatter_(1, cand_ids, cand.masked_fill(remove, _NEG_INF))
    active = torch.tensor(wants_p, device=device).unsqueeze(1)  # [n, 1]
    out = torch.where(active, kept, masked)

    # Rows the candidates may not settle: ties with the k-th logit beyond the candidates, or (top-p
    # alone) candidates holding too little of the mass for the cut to lie among them.
    if width < vocab:
        survivors = (masked > _NEG_INF).sum(dim=-1)  # [n]
        top_p = torch.tensor([p.top_p for p in params], device=device)
        unsettled = (active.squeeze(1) & (((survivors > width) & has_k.squeeze(1))
                                          | (~has_k.squeeze(1) & (mass < top_p + _MASS_MARGIN)))).tolist()
        rows = [i for i, bad in enumerate(unsettled) if bad]
        if rows:
            index = torch.tensor(rows, device=device)
            out = out.index_copy(0, index, _top_k_top_p_sorted(logits[index], [params[i] for i in rows]))
    return out


def _top_k_top_p_sorted(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k then top-p by one ascending sort of the whole vocabulary (the rows the candidates cannot settle)."""
    # One ascending sort serves both filters: top-k only sends the smallest entries to -inf, so the
    # sorted order, and hence the top-p cumulative sums, are exactly those HF computes after re-sorting.
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [n, vocab] ascending
    k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
    kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [n, 1]; ties with the k-th value survive
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)

    cutoff = column([1.0 - p.top_p for p in params], device)  # [n, 1]
    active = torch.tensor([p.top_p < 1.0 for p in params], device=device).unsqueeze(1)  # [n, 1]
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= cutoff  # [n, vocab]
    remove[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove & active, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _typical(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    # Keep the tokens whose surprisal is closest to the entropy until their mass reaches typical_p.
    mass = column([p.typical_p for p in params], logits.device)  # [n, 1]
    log_probs = logits.log_softmax(dim=-1)  # [n, vocab]
    entropy = -(log_probs * log_probs.exp()).nansum(dim=-1, keepdim=True)  # [n, 1]; -inf * 0 is nan
    distance, order = (-log_probs - entropy).abs().sort(dim=-1)  # [n, vocab] ascending
    cumulative = logits.gather(1, order).softmax(dim=-1).cumsum(dim=-1)  # [n, vocab]
    last = (cumulative < mass).sum(dim=1).clamp_(max=logits.shape[-1] - 1)  # [n]
    remove = distance > distance.gather(1, last.unsqueeze(1))  # [n, vocab] in sorted order
    remove[:, 0] = False
    return logits.masked_fill(remove.scatter(1, order, remove), _NEG_INF)


def _logprobs(
    scaled: torch.Tensor,  # [batch, vocab] penalized, temperature-scaled
    token_ids: torch.Tensor,  # [batch]
    params: Sequence[SamplingParams],
) -> list[TokenLogprob | None]:
    out: list[TokenLogprob | None] = [None] * len(params)
    wanted = [i for i, p in enumerate(params) if p.logprobs is not None]
    if not wanted:
        return out
    if len(wanted) < len(params):
        rows = torch.tensor(wanted, device=scaled.device)
        scaled, token_ids = scaled[rows], token_ids[rows]
    log_probs = scaled.log_softmax(dim=-1)  # [n, vocab]
    chosen = _floored(log_probs.gather(1, token_ids.unsqueeze(1)).squeeze(1)).tolist()  # [n]
    k_max = min(max(params[i].logprobs or 0 for i in wanted), log_probs.shape[-1])
    top_values, top_ids = log_probs.topk(k_max, dim=-1)  # [n, k_max], most likely first
    top_values = _floored(top_values)
    # One transfer per tensor: per-row .tolist() would sync with the device once per row.
    picked, top_ids_rows, top_values_rows = token_ids.tolist(), top_ids.tolist(), top_values.tolist()
    for j, i in enumerate(wanted):
        k = params[i].logprobs or 0
        top = tuple(zip(top_ids_rows[j][:k], top_values_rows[j][:k], strict=True))
        out[i] = TokenLogprob(picked[j], chosen[j], top)
    return out


def _floored(logprobs: torch.Tensor) -> torch.Tensor:
    """`logprobs` with -inf, NaN and anything below LOGPROB_FLOOR at the floor (only the few values reported)."""
    return logprobs.nan_to_num(nan=LOGPROB_FLOOR, neginf=LOGPROB_FLOOR).clamp_(min=LOGPROB_FLOOR)


def _on_rows(
    logits: torch.Tensor,  # [batch, vocab]
    params: Sequence[SamplingParams],
    wanted: Callable[[SamplingParams], bool],
    fn: Callable[[torch.Tensor, Sequence[SamplingParams]], torch.Tensor],
) -> torch.Tensor:
    """Apply a row-wise filter only to the rows that enable it, sparing the sort on the others."""
    rows = [i for i, p in enumerate(params) if wanted(p)]
    if not rows:
        return logits
    if len(rows) == len(params):
        return fn(logits, params)
    index = torch.tensor(rows, device=logits.device)
    return logits.index_copy(0, index, fn(logits[index], [params[i] for i in rows]))
