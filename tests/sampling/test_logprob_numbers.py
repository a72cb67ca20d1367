"""No reported logprob is NaN or infinite (JSON has neither): the sampler's floor and temperature floor."""

from __future__ import annotations

import math

import torch

from loraplex.engine.request import SamplingParams
from loraplex.sampling import LOGPROB_FLOOR, MIN_TEMPERATURE, Sampler
from tests.sampling.rows import rows


def _sample(logits: torch.Tensor, params: list[SamplingParams]):
    return Sampler()(logits, rows(params))


def test_a_tiny_temperature_gives_finite_logprobs_and_the_likeliest_token() -> None:
    logits = torch.randn(3, 64, generator=torch.Generator().manual_seed(0)) * 5
    # logits / 1e-30 overflow float32: the softmax was NaN, and so was every reported logprob.
    params = [SamplingParams(temperature=t, seed=1, logprobs=3) for t in (1e-30, 1e-45, MIN_TEMPERATURE / 2)]
    out = _sample(logits, params)
    for row, lp in enumerate(out.logprobs):
        assert lp is not None
        values = [lp.logprob, *(v for _, v in lp.top)]
        assert all(math.isfinite(v) for v in values), values
        assert out.token_ids[row] == int(logits[row].argmax())  # at T = 0.01 the gaps here decide it


def test_a_zero_probability_token_reports_the_floor_not_minus_infinity() -> None:
    logits = torch.full((1, 16), float("-inf"))
    logits[0, 3] = 2.0
    out = _sample(logits, [SamplingParams(temperature=0.0, logprobs=4)])
    lp = out.logprobs[0]
    assert lp is not None and out.token_ids == [3] and lp.logprob == 0.0
    assert lp.top[0] == (3, 0.0)
    assert [v for _, v in lp.top[1:]] == [LOGPROB_FLOOR] * 3  # -inf before: invalid JSON in every response
