"""Penalties and the watermark: how the history of a row's tokens changes its logits before sampling."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import torch

from loraplex.device import to_device
from loraplex.engine.request import SamplingParams

if TYPE_CHECKING:
    from loraplex.sampling.sampler import SampleRow


def has_penalty(p: SamplingParams) -> bool:
    return p.repetition_penalty != 1.0 or p.frequency_penalty != 0 or p.presence_penalty != 0


class PenaltyTable:
    """The rows' penalty parameters as tensors [n], built once for a batch and kept while the same
    requests come back."""

    def __init__(self, params: Sequence[SamplingParams], device: torch.device) -> None:
        self.device = device
        self.any = any(has_penalty(p) for p in params)
        self.counts = any(p.frequency_penalty != 0 or p.presence_penalty != 0 for p in params)
        self.watermark = any(p.watermark for p in params)
        self.repetition = vector([p.repetition_penalty for p in params], torch.float32, device)  # 1: none
        self.frequency = vector([p.frequency_penalty for p in params], torch.float32, device)
        self.presence = vector([p.presence_penalty for p in params], torch.float32, device)


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
    penalized = [i for i, p in enumerate(params) if has_penalty(p)]
    if not penalized:
        return apply_watermark(logits, params, prompt_token_ids, output_token_ids)
    rows, ids = _flatten(penalized, [[*prompt_token_ids[i], *output_token_ids[i]] for i in penalized],
                         vocab, logits.device)
    support = torch.unique(rows * vocab + ids)  # [n_seen] the (row, token) pairs seen, flattened
    counts = None
    count_rows = [i for i, p in enumerate(params) if p.frequency_penalty != 0 or p.presence_penalty != 0]
    if count_rows:
        rows, ids = _flatten(count_rows, [output_token_ids[i] for i in count_rows], vocab, logits.device)
        counts = torch.zeros(batch, vocab, dtype=torch.float32, device=logits.device)  # [batch, vocab]
        counts.index_put_((rows, ids), torch.ones_like(ids, dtype=torch.float32), accumulate=True)
    logits = _penalize(logits, PenaltyTable(params, logits.device), support, counts)
    return apply_watermark(logits, params, prompt_token_ids, output_token_ids)


PENALIZED_LIMIT = torch.finfo(torch.float32).max / 1e3
"""The largest magnitude a penalized logit keeps: divided by the smallest temperature the sampler uses
(filters.MIN_TEMPERATURE), it is still finite."""


def _penalize(logits: torch.Tensor, table: PenaltyTable, support: torch.Tensor, counts: torch.Tensor | None
              ) -> torch.Tensor:
    """The penalties, given every (row, token) pair a penalized row has seen in its prompt or output, as
    flat indices `row * vocab + token` (`support`), and the output token `counts` ([batch, vocab] float32,
    None when no row has a frequency or presence penalty). Only the seen logits can change, so only they
    are computed: a gather and a scatter instead of passes over [batch, vocab]."""
    if support.numel():
        vocab = logits.shape[1]
        row = support // vocab  # [n_seen]
        out = logits.clone()
        flat = out.view(-1)
        # index_select / index_copy_: advanced indexing (`flat[support]`) is several times slower on a CPU.
        values = flat.index_select(0, support)  # [n_seen]
        penalty = table.repetition.index_select(0, row)  # [n_seen]
        # A tiny repetition penalty divides a positive logit past float32's range (1e-258 did, from the fuzzer),
        # and inf - inf in the softmax is NaN: held at PENALIZED_LIMIT, the largest stay the likeliest.
        values = torch.where(values < 0, values * penalty, values / penalty).clamp(-PENALIZED_LIMIT, PENALIZED_LIMIT)
        if counts is not None:
            frequency = table.frequency.index_select(0, row)
            presence = table.presence.index_select(0, row)
            seen_counts = counts.view(-1).index_select(0, support)  # [n_seen]
            values = values - (frequency * seen_counts + presence * (seen_counts > 0).float())
        flat.index_copy_(0, support, values)
        logits = out
    return logits


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
    """The penalties' per-row tokens, kept between steps for the rows that come back.

    `seen` [rows, vocab] (prompt and output tokens) with `support`, the same pairs as flat indices
    `row * vocab + token`, and `counts` [rows, vocab] (output tokens, for frequency and presence) are
    rebuilt for a row only when it is new or its output shrank; a returning row just adds the tokens it
    gained since the last step. They always equal what `apply_penalties` builds from the full lists.
    """

    def __init__(self) -> None:
        self._rows: list[SampleRow] = []
        self._included: list[int] = []  # per row: output tokens already in the tensors
        self._seen: torch.Tensor | None = None
        self._support: torch.Tensor | None = None
        self._counts: torch.Tensor | None = None

    def penalize(self, logits: torch.Tensor, rows: Sequence[SampleRow], table: PenaltyTable | None = None
                 ) -> torch.Tensor:
        """`apply_penalties` for these rows; `table`: their `PenaltyTable` on the logits' device, if kept."""
        params = [r.params for r in rows]
        t = table or PenaltyTable(params, logits.device)
        if not t.any:
            self._rows, self._included, self._seen, self._support, self._counts = [], [], None, None, None
        else:
            support, counts = self._update(rows, logits.shape[1], logits.device, t.counts)
            logits = _penalize(logits, t, support, counts)
        if not t.watermark:
            return logits
        return apply_watermark(logits, params, [r.prompt_token_ids for r in rows], [r.output_token_ids for r in rows])

    def _update(self, rows: Sequence[SampleRow], vocab: int, device: torch.device,
                want_counts: bool) -> tuple[torch.Tensor, torch.Tensor | None]:
        old_seen, old_support, old_counts = self._seen, self._support, self._counts
        old_rows, old_included = self._rows, self._included
        # Invalid until this update completes: one that raises half way leaves nothing to reuse, rather than
        # tensors that already hold some rows' new tokens (which a later call would count again).
        self._rows, self._included, self._seen, self._support, self._counts = [], [], None, None, None
        reusable = (old_seen is not None and old_support is not None and old_seen.shape[1] == vocab
                    and old_seen.device == device and (old_counts is not None or not want_counts))
        count_rows: list[int] = []
        count_ids: list[int] = []
        lengths = [len(r.output_token_ids) for r in rows]
        one_each = False  # one token per row: no pair can repeat, and the counts add the same pairs
        if (reusable and len(rows) == len(old_rows) and all(map(operator.is_, rows, old_rows))
                and lengths == [n + 1 for n in old_included]):
            # The common decode step: the same rows, one new token each.
            source = list(range(len(rows)))
            seen_rows = list(source)
            seen_ids = [r.output_token_ids[-1] for r in rows]
            one_each = True
            if want_counts:
                count_rows, count_ids = seen_rows, seen_ids
        else:
            source, seen_rows, seen_ids = self._changes(rows, old_rows, old_included, reusable)
            if want_counts:
                count_rows, count_ids = self._outputs(rows, source, old_included)
        identity = reusable and len(rows) == len(old_rows) and source == list(range(len(old_rows)))
        shape = (len(rows), vocab)
        seen = _carry(old_seen, source, identity, shape, torch.bool, device)
        support = old_support if identity and old_support is not None else _remap(old_support, source, vocab, device)
        counts = _carry(old_counts, source, identity, shape, torch.float32, device) if want_counts else None
        pairs = None
        if seen_ids:
            r, t = pairs = _pairs(seen_rows, seen_ids, vocab, device)
            flat = r * vocab + t if one_each else torch.unique(r * vocab + t)
            fresh = flat[~seen.view(-1).index_select(0, flat)]  # pairs not seen before
            seen.view(-1).index_fill_(0, fresh, True)
            support = torch.cat([support, fresh])
        if counts is not None and count_ids:
            r, t = pairs if one_each and pairs is not None else _pairs(count_rows, count_ids, vocab, device)
            counts.index_put_((r, t), torch.ones_like(t, dtype=torch.float32), accumulate=True)
        self._seen, self._support, self._counts = seen, support, counts
        self._rows = list(rows)
        self._included = lengths
        return support, counts

    @staticmethod
    def _changes(rows: Sequence[SampleRow], old_rows: list[SampleRow], old_included: list[int],
                 reusable: bool) -> tuple[list[int], list[int], list[int]]:
        """Per new row its old row (or -1: rebuilt), and the (row, token) pairs to add to `seen`."""
        where = {id(r): i for i, r in enumerate(old_rows)} if reusable else {}
        source: list[int] = []
        seen_rows: list[int] = []
        seen_ids: list[int] = []
        for j, row in enumerate(rows):
            i = where.get(id(row), -1)
            output = row.output_token_ids
            if i >= 0 and (old_rows[i] is not row or len(output) < old_included[i]):
                i = -1
            source.append(i)
            added = output[old_included[i]:] if i >= 0 else [*row.prompt_token_ids, *output]
            seen_rows += [j] * len(added)
            seen_ids += added
        return source, seen_rows, seen_ids

    @staticmethod
    def _outputs(rows: Sequence[SampleRow], source: list[int], old_included: list[int]) -> tuple[list[int], list[int]]:
        """The (row, token) pairs to add to `counts`: a carried row's new output tokens, a rebuilt row's all."""
        count_rows: list[int] = []
        count_ids: list[int] = []
        for j, (row, i) in enumerate(zip(rows, source, strict=True)):
            new = row.output_token_ids[old_included[i]:] if i >= 0 else row.output_token_ids
            count_rows += [j] * len(new)
            count_ids += new
        return count_rows, count_ids


def _remap(support: torch.Tensor | None, source: list[int], vocab: int, device: torch.device) -> torch.Tensor:
    """The flat (row, token) indices of the old rows that `source` carries over, at their new rows."""
    empty = torch.zeros(0, dtype=torch.long, device=device)
    kept = [(j, i) for j, i in enumerate(source) if i >= 0]
    if support is None or not kept or not support.numel():
        return empty
    to, frm = zip(*kept, strict=True)
    new_row = torch.full((max(frm) + 1,), -1, dtype=torch.long)
    new_row[list(frm)] = vector(to, torch.long)
    old_row = support // vocab
    inside = old_row <= max(frm)
    support, old_row = support[inside], old_row[inside]
    row = to_device(new_row, device)[old_row]
    stays = row >= 0
    return row[stays] * vocab + support[stays] % vocab


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
    r = vector(rows, torch.long)
    t = vector(ids, torch.long)
    keep = t < vocab
    return to_device(r[keep], device), to_device(t[keep], device)


def _flatten(
    rows: list[int], seqs: list[Sequence[int]], vocab: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """(row index, token id) pairs for scattering per-row token lists into a [batch, vocab] tensor."""
    ids = vector(list(itertools.chain.from_iterable(seqs)), torch.long)  # [n_tokens]
    row_of = torch.repeat_interleave(vector(rows, torch.long), vector([len(s) for s in seqs], torch.long))
    keep = ids < vocab
    return to_device(row_of[keep], device), to_device(ids[keep], device)


def column(values: list[float], device: torch.device) -> torch.Tensor:
    return vector(values, torch.float32, device).unsqueeze(1)  # [n, 1]


_NUMPY = {torch.float32: np.float32, torch.long: np.int64, torch.bool: np.bool_}


def vector(values: Sequence[float] | Sequence[int] | Sequence[bool], dtype: torch.dtype,
           device: torch.device | str = "cpu") -> torch.Tensor:
    """A 1-d tensor of a Python list by way of numpy: `torch.tensor` converts element by element, about
    six times slower for a batch's 256 values (75 µs against 12 on a CPU), and a step builds a dozen."""
    return to_device(torch.from_numpy(np.asarray(values, dtype=_NUMPY[dtype])), device)
