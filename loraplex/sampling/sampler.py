"""Batched next-token sampling: penalties, temperature, top-k / top-p / typical filtering, seeded draws."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from loraplex.engine.request import SamplingParams, TokenLogprob
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


class Sampler:
    """Picks the next token for every row of a batch, applying each row's own `SamplingParams`.

    Order, as HF transformers applies its processors: repetition penalty (prompt + output tokens),
    then frequency / presence penalties (output tokens), then greedy argmax when `temperature == 0`;
    otherwise temperature, top-k, top-p, typical-p, and a draw from the resulting softmax.

    Determinism: every sampled row draws exactly one vector of `vocab` Exp(1) variates per step from its
    own generator and takes `argmax(probs / noise)` (the exponential race, an exact sample from `probs`).
    A row's token therefore depends only on its logits and its generator, never on the rest of the
    batch, and the generator's stream advances by the same amount every step. Greedy rows draw nothing.

    Logprobs come from the log-softmax of the logits after penalties and temperature (temperature 1
    for greedy rows), before top-k / top-p / typical filtering: they describe the model's distribution
    at this temperature, so a token the filters removed still gets a finite logprob, and the values
    do not jump when a client changes `top_p`. They are never below LOGPROB_FLOOR (nor NaN).

    A grammar `mask` (structured output) removes the tokens its rows may not sample before the greedy
    pick and the filters. Like the filters, it does not change the logprobs: they stay the model's.
    """

    def __call__(
        self,
        logits: torch.Tensor,  # [batch, vocab], any float dtype
        params: list[SamplingParams],
        generators: list[torch.Generator],
        prompt_token_ids: list[list[int]],
        output_token_ids: list[list[int]],
        mask: TokenMask | None = None,
    ) -> SamplerOutput:
        batch, vocab = logits.shape
        if not len(params) == len(generators) == len(prompt_token_ids) == len(output_token_ids) == batch:
            raise ValueError(
                f"sampler inputs disagree on batch size: logits {batch}, params {len(params)}, generators "
                f"{len(generators)}, prompts {len(prompt_token_ids)}, outputs {len(output_token_ids)}"
            )
        if all(p.greedy and p.logprobs is None and not _has_penalty(p) for p in params):
            if mask is not None:
                logits = mask.apply(logits)
            # max().indices: the same first-maximum index as argmax, about 2.5x faster on CPU.
            return SamplerOutput(logits.max(dim=-1).indices.tolist(), [None] * batch)

        # Every step below is out of place, so the caller's tensor is never written to.
        logits = apply_penalties(logits.float(), params, prompt_token_ids, output_token_ids)
        scaled = apply_temperature(logits, params)  # [batch, vocab]
        choice = scaled if mask is None else mask.apply(scaled)  # [batch, vocab]
        # Greedy rows are divided by 1, which is exact, so their argmax is the argmax of the penalized logits.
        token_ids = choice.max(dim=-1).indices  # [batch]

        sampled = [i for i, p in enumerate(params) if not p.greedy]
        if sampled:
            rows = torch.tensor(sampled, device=logits.device)
            filtered = apply_filters(choice[rows], [params[i] for i in sampled])  # [n_sampled, vocab]
            probs = filtered.softmax(dim=-1)
            noise = torch.stack(
                [torch.empty(vocab, device=logits.device).exponential_(generator=generators[i]) for i in sampled]
            )  # [n_sampled, vocab]
            # A zero variate would turn a filtered (p = 0) token into 0 / 0; the clamp keeps it at 0.
            noise.clamp_(min=torch.finfo(torch.float32).tiny)
            token_ids[rows] = probs.div_(noise).max(dim=-1).indices

        return SamplerOutput(token_ids.tolist(), _logprobs(scaled, token_ids, params))


def apply_penalties(
    logits: torch.Tensor,  # [batch, vocab] float32
    params: Sequence[SamplingParams],
    prompt_token_ids: Sequence[Sequence[int]],
    output_token_ids: Sequence[Sequence[int]],
) -> torch.Tensor:
    """Repetition penalty (HF definition, prompt + output), then OpenAI frequency / presence penalties
    (output only), then the watermark bias. Never writes to `logits`: returns it as is when no row has a
    penalty, else a new tensor; token ids outside the logits' vocab are ignored, as in HF."""
    batch, vocab = logits.shape
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        rows, ids = _flatten(rep_rows, [[*prompt_token_ids[i], *output_token_ids[i]] for i in rep_rows],
                             vocab, logits.device)
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)  # [batch, vocab]
        seen[rows, ids] = True
        penalty = _column([p.repetition_penalty for p in params], logits.device)  # [batch, 1]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)

    count_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if count_rows:
        rows, ids = _flatten(count_rows, [output_token_ids[i] for i in count_rows], vocab, logits.device)
        counts = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)  # [batch, vocab]
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
        frequency = _column([p.frequency_penalty for p in params], logits.device)  # [batch, 1]
        presence = _column([p.presence_penalty for p in params], logits.device)  # [batch, 1]
        logits = logits - (frequency * counts + presence * (counts > 0).float())

    marked = [i for i, p in enumerate(params) if p.watermark]
    if marked:
        logits = logits.clone()  # the rows are updated in place below; the caller's tensor must not be
        for i in marked:
            previous = output_token_ids[i][-1] if output_token_ids[i] else prompt_token_ids[i][-1]
            logits[i, watermark_greenlist(previous, vocab, logits.device)] += WATERMARK_DELTA
    return logits


WATERMARK_GAMMA = 0.5
WATERMARK_DELTA = 2.0
_WATERMARK_HASH_KEY = 15485863


def watermark_greenlist(previous_token: int, vocab: int, device: torch.device) -> torch.Tensor:
    """The "green" tokens after `previous_token` (Kirchenbauer et al. 2023, as TGI does it): a random
    `WATERMARK_GAMMA` share of the vocabulary seeded by the previous token. Watermarked text favours
    them by `WATERMARK_DELTA` in the logits, which a detector that knows the key can test for."""
    generator = torch.Generator(device="cpu").manual_seed(_WATERMARK_HASH_KEY * previous_token)
    greenlist = torch.randperm(vocab, generator=generator)[: int(WATERMARK_GAMMA * vocab)]
    return greenlist.to(device)


def apply_temperature(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Divide each row by its temperature (HF `TemperatureLogitsWarper`); greedy rows are left as they are.
    Never writes to `logits`: returns it as is when every temperature is 1, else a new tensor."""
    temperatures = [max(p.temperature, MIN_TEMPERATURE) if not p.greedy else 1.0 for p in params]
    if all(t == 1.0 for t in temperatures):
        return logits  # a copy would be a batch × vocab allocation per step
    return logits / _column(temperatures, logits.device)  # [batch, vocab]


def apply_filters(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    """Top-k, then top-p, then typical-p, each equal to the HF warper with `min_tokens_to_keep=1`.

    `logits` are already temperature-scaled; removed tokens become -inf. A disabled filter (top_k 0,
    top_p 1, typical_p 1) leaves its rows untouched, as HF then does not add the warper at all.
    """
    logits = _on_rows(logits, params, lambda p: p.top_k > 0 or p.top_p < 1.0, _top_k_top_p)
    return _on_rows(logits, params, lambda p: p.typical_p < 1.0, _typical)


def _top_k_top_p(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    # One ascending sort serves both filters: top-k only sends the smallest entries to -inf, so the
    # sorted order, and hence the top-p cumulative sums, are exactly those HF computes after re-sorting.
    vocab = logits.shape[-1]
    device = logits.device
    sorted_logits, sorted_ids = logits.sort(dim=-1)  # [n, vocab] ascending
    k = torch.tensor([min(p.top_k, vocab) if p.top_k > 0 else vocab for p in params], device=device)
    kth = sorted_logits.gather(1, (vocab - k).unsqueeze(1))  # [n, 1]; ties with the k-th value survive
    sorted_logits = sorted_logits.masked_fill(sorted_logits < kth, _NEG_INF)

    cutoff = _column([1.0 - p.top_p for p in params], device)  # [n, 1]
    active = torch.tensor([p.top_p < 1.0 for p in params], device=device).unsqueeze(1)  # [n, 1]
    remove = sorted_logits.softmax(dim=-1).cumsum(dim=-1) <= cutoff  # [n, vocab]
    remove[:, -1] = False  # the most likely token always survives
    sorted_logits = sorted_logits.masked_fill(remove & active, _NEG_INF)
    return torch.empty_like(logits).scatter_(1, sorted_ids, sorted_logits)


def _typical(logits: torch.Tensor, params: Sequence[SamplingParams]) -> torch.Tensor:
    # Keep the tokens whose surprisal is closest to the entropy until their mass reaches typical_p.
    mass = _column([p.typical_p for p in params], logits.device)  # [n, 1]
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


def _flatten(
    rows: list[int], seqs: list[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for scattering per-row token lists into a [batch, vocab] tensor."""
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)  # [n_tokens]
    row_of = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(s) for s in seqs]))  # [n_tokens]
    keep = ids < vocab
    return row_of[keep].to(device), ids[keep].to(device)


def _column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # [n, 1]


def _has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0.0 or p.presence_penalty != 0.0 or p.watermark
