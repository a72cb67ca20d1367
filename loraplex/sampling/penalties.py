"""Penalties and the watermark: how the history of a row's tokens changes its logits before sampling."""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from loraplex.engine.request import SamplingParams

if TYPE_CHECKING:
    from loraplex.sampling.sampler import SampleRow


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
    seen = counts = None
    rep_rows = [i for i, p in enumerate(params) if p.repetition_penalty != 1.0]
    if rep_rows:
        rows, ids = _flatten(rep_rows, [[*prompt_token_ids[i], *output_token_ids[i]] for i in rep_rows],
                             vocab, logits.device)
        seen = torch.zeros(batch, vocab, dtype=torch.bool, device=logits.device)  # [batch, vocab]
        seen[rows, ids] = True
    count_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if count_rows:
        rows, ids = _flatten(count_rows, [output_token_ids[i] for i in count_rows], vocab, logits.device)
        counts = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)  # [batch, vocab]
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    return _penalize(logits, params, seen, counts, prompt_token_ids, output_token_ids)


def _penalize(logits: torch.Tensor, params: Sequence[SamplingParams], seen: torch.Tensor | None,
              counts: torch.Tensor | None, prompt_token_ids: Sequence[Sequence[int]],
              output_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The penalties given each row's `seen` tokens (prompt + output, [batch, vocab] bool) and output
    token `counts` ([batch, vocab] float32), each None when no row needs it; then the watermark."""
    if seen is not None:
        penalty = column([p.repetition_penalty for p in params], logits.device)  # [batch, 1]
        penalized = torch.where(logits < 0, logits * penalty, logits / penalty)
        logits = torch.where(seen, penalized, logits)
    if counts is not None:
        frequency = column([p.frequency_penalty for p in params], logits.device)  # [batch, 1]
        presence = column([p.presence_penalty for p in params], logits.device)  # [batch, 1]
        logits = logits - (frequency * counts + presence * (counts > 0).float())
    return apply_watermark(logits, params, prompt_token_ids, output_token_ids)


def apply_watermark(logits: torch.Tensor, params: Sequence[SamplingParams],
                    prompt_token_ids: Sequence[Sequence[int]], output_token_ids: Sequence[Sequence[int]]) -> torch.Tensor:
    """The watermark bias on the rows that ask for it (a new tensor if any does)."""
    marked = [i for i, p in enumerate(params) if p.watermark]
    if marked:
        logits = logits.clone()  # the rows are updated in place below; the caller's tensor must not be
        for i in marked:
            previous = output_token_ids[i][-1] if output_token_ids[i] else prompt_token_ids[i][-1]
            logits[i, watermark_greenlist(previous, logits.shape[1], logits.device)] += WATERMARK_DELTA
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


class TokenHistory:
    """The penalties' per-row token sets and counts, kept between steps for the rows that come back.

    `seen` [rows, vocab] (prompt and output tokens, for the repetition penalty) and `counts` [rows,
    vocab] (output tokens, for frequency and presence) are rebuilt for a row only when it is new or its
    output shrank; a returning row just adds the tokens it gained since the last step. The tensors
    always equal what `apply_penalties` builds from the full lists.
    """

    def __init__(self) -> None:
        self._rows: list[SampleRow] = []
        self._included: list[int] = []  # per row: output tokens already in the tensors
        self._seen: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def penalize(self, logits: torch.Tensor, rows: Sequence[SampleRow]) -> torch.Tensor:
        params = [r.params for r in rows]
        want_seen = any(p.repetition_penalty != 1.0 for p in params)
        want_counts = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        if not (want_seen or want_counts):
            self._rows, self._included, self._seen, self._counts = [], [], None, None
            return apply_penalties(logits, params, [r.prompt_token_ids for r in rows],
                                   [r.output_token_ids for r in rows])
        seen, counts = self._update(rows, logits.shape[1], logits.device, want_seen, want_counts)
        return _penalize(logits, params, seen, counts, [r.prompt_token_ids for r in rows],
                         [r.output_token_ids for r in rows])

    def _update(self, rows: Sequence[SampleRow], vocab: int, device: torch.device, want_seen: bool,
                want_counts: bool) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        old_seen, old_counts = self._seen, self._counts
        old_rows, old_included = self._rows, self._included
        # Invalid until this update completes: one that raises half way leaves nothing to reuse, rather than
        # tensors that already hold some rows' new tokens (which a later call would count again).
        self._rows, self._included = [], []
        some = old_seen if old_seen is not None else old_counts
        reusable = (some is not None and some.shape[1] == vocab and some.device == device
                    and (old_seen is not None or not want_seen) and (old_counts is not None or not want_counts))
        where = {id(r): i for i, r in enumerate(old_rows)} if reusable else {}
        source: list[int] = []  # per new row: its old row, or -1
        seen_rows: list[int] = []
        seen_ids: list[int] = []
        count_rows: list[int] = []
        count_ids: list[int] = []
        for j, row in enumerate(rows):
            i = where.get(id(row), -1)
            output = row.output_token_ids
            if i >= 0 and (old_rows[i] is not row or len(output) < old_included[i]):
                i = -1
            source.append(i)
            new = output[old_included[i]:] if i >= 0 else output
            if want_seen:
                added = new if i >= 0 else [*row.prompt_token_ids, *output]
                seen_rows += [j] * len(added)
                seen_ids += added
            if want_counts:
                count_rows += [j] * len(new)
                count_ids += new
        identity = reusable and len(rows) == len(old_rows) and source == list(range(len(old_rows)))
        self._seen = _carry(old_seen, source, identity, (len(rows), vocab), torch.bool, device) if want_seen else None
        self._counts = (_carry(old_counts, source, identity, (len(rows), vocab), torch.float32, device)
                        if want_counts else None)
        if self._seen is not None and seen_ids:
            r, t = _pairs(seen_rows, seen_ids, vocab, device)
            self._seen[r, t] = True
        if self._counts is not None and count_ids:
            r, t = _pairs(count_rows, count_ids, vocab, device)
            self._counts.index_put_((r, t), torch.ones_like(t, dtype=torch.float32), accumulate=True)
        self._rows = list(rows)
        self._included = [len(r.output_token_ids) for r in rows]
        return self._seen, self._counts


def _carry(old: torch.Tensor | None, source: list[int], identity: bool, shape: tuple[int, int],
           dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """The new rows' tensor: the old rows named by `source` (-1: a zero row), in place when unchanged."""
    if old is not None and identity:
        return old
    new = torch.zeros(shape, dtype=dtype, device=device)
    kept = [(j, i) for j, i in enumerate(source) if i >= 0]
    if old is not None and kept:
        to, frm = zip(*kept, strict=True)
        new[list(to)] = old[list(frm)]
    return new


def _pairs(rows: list[int], ids: list[int], vocab: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(row, token) index tensors, tokens outside the logits' vocab left out (as HF ignores them)."""
    r = torch.tensor(rows, dtype=torch.long)
    t = torch.tensor(ids, dtype=torch.long)
    keep = t < vocab
    return r[keep].to(device), t[keep].to(device)


def _flatten(
    rows: list[int], seqs: list[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for scattering per-row token lists into a [batch, vocab] tensor."""
    ids = torch.tensor(list(itertools.chain.from_iterable(seqs)), dtype=torch.long)  # [n_tokens]
    row_of = torch.repeat_interleave(torch.tensor(rows), torch.tensor([len(s) for s in seqs]))  # [n_tokens]
    keep = ids < vocab
    return row_of[keep].to(device), ids[keep].to(device)


def column(values: list[float], device: torch.device) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float32, device=device).unsqueeze(1)  # [n, 1]
