import math
import random

import pytest
import torch
from transformers.generation.logits_process import (
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
    TypicalLogitsWarper,
)

from loraplex.engine.request import SamplingParams
from loraplex.sampling import Sampler, apply_filters, apply_penalties, apply_temperature
from loraplex.sampling import filters as filters_module
from loraplex.sampling import sampler as sampler_module
from loraplex.sampling.penalties import TokenHistory
from loraplex.sampling.sampler import draw, uniforms
from loraplex.sampling.structured import TokenMask
from tests.sampling.rows import Row, rows

VOCAB = 512


def _logits(batch: int, vocab: int = VOCAB, seed: int = 0, scale: float = 3.0) -> torch.Tensor:
    # A scale of a few nats gives peaked distributions, so top-p and typical-p cut somewhere in the middle.
    return torch.randn(batch, vocab, generator=torch.Generator().manual_seed(seed)) * scale


def _short(p: SamplingParams) -> str:
    default = SamplingParams()
    return ",".join(f"{k}={v}" for k, v in vars(p).items() if v != getattr(default, k)) or "default"


def _hf_warp(row: torch.Tensor, p: SamplingParams) -> torch.Tensor:
    """The HF warper chain `generate()` builds for these parameters, on one row."""
    scores = row.unsqueeze(0)
    ids = torch.zeros(1, 1, dtype=torch.long)
    scores = TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k > 0:
        scores = TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = TopPLogitsWarper(p.top_p)(ids, scores)
    if p.typical_p < 1.0:
        scores = TypicalLogitsWarper(p.typical_p)(ids, scores)
    return scores.squeeze(0)


FILTER_PARAMS = [
    SamplingParams(temperature=1.0),
    SamplingParams(temperature=0.7, top_k=20),
    SamplingParams(temperature=1.3, top_k=1),
    SamplingParams(temperature=1.0, top_k=VOCAB + 10),
    SamplingParams(temperature=0.9, top_p=0.8),
    SamplingParams(temperature=1.0, top_p=0.3),
    SamplingParams(temperature=1.0, top_p=1e-8),  # only the min_tokens_to_keep guard leaves a token
    SamplingParams(temperature=0.6, typical_p=0.5),
    SamplingParams(temperature=1.1, typical_p=0.95),
    SamplingParams(temperature=0.8, top_k=40, top_p=0.9),
    SamplingParams(temperature=1.5, top_k=100, top_p=0.7, typical_p=0.8),
]


@pytest.mark.parametrize("params", FILTER_PARAMS, ids=_short)
def test_filters_match_hf_warpers(params: SamplingParams) -> None:
    logits = _logits(4, seed=1)
    ours = apply_filters(apply_temperature(logits, [params] * 4), [params] * 4)
    for row in range(4):
        expected = _hf_warp(logits[row], params)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected))
        torch.testing.assert_close(ours[row].softmax(-1), expected.softmax(-1))


@pytest.mark.parametrize(("top_p", "kept"), [(0.5, 2), (0.25, 1), (0.75, 3), (0.5000001, 3)])
def test_top_p_exactly_on_the_boundary_matches_hf(top_p: float, kept: int) -> None:
    # Four equal tokens: the cumulative mass hits 1 - top_p exactly, and HF removes a token whose
    # cumulative probability is <= 1 - top_p, so top_p 0.5 keeps 2 of 4, not 3.
    params = SamplingParams(temperature=1.0, top_p=top_p)
    logits = torch.zeros(1, 4)
    ours = apply_filters(logits, [params])[0]
    expected = _hf_warp(logits[0], params)
    assert int(torch.isfinite(expected).sum()) == kept
    assert torch.equal(torch.isinf(ours), torch.isinf(expected))


def test_filters_per_row_params_in_one_batch_match_hf() -> None:
    # Each row gets different parameters, so the vectorized per-row thresholds are exercised together.
    logits = _logits(len(FILTER_PARAMS), seed=2)
    ours = apply_filters(apply_temperature(logits, FILTER_PARAMS), FILTER_PARAMS)
    for row, p in enumerate(FILTER_PARAMS):
        expected = _hf_warp(logits[row], p)
        assert torch.equal(torch.isinf(ours[row]), torch.isinf(expected)), p
        torch.testing.assert_close(ours[row].softmax(-1), expected.softmax(-1))
    assert 0 < int(torch.isinf(ours).sum()) < ours.numel()


def test_repetition_penalty_matches_hf() -> None:
    logits = _logits(3, seed=3)
    params = [SamplingParams(repetition_penalty=r) for r in (1.3, 0.7, 1.0)]
    prompts = [[1, 2, 2, 300], [5, 6], [7, 8]]
    # VOCAB + 7 lies outside the logits (embedding larger than lm_head): HF ignores it, so must we.
    outputs = [[2, 9, 9, VOCAB + 7], [], [1, 2]]
    ours = apply_penalties(logits, params, prompts, outputs)
    for row, p in enumerate(params):
        ids = torch.tensor([prompts[row] + outputs[row]])
        expected = RepetitionPenaltyLogitsProcessor(p.repetition_penalty)(ids, logits[row : row + 1].clone())
        torch.testing.assert_close(ours[row], expected[0], rtol=0, atol=0)
    assert not torch.equal(ours[0], logits[0])
    assert torch.equal(ours[2], logits[2])


def test_frequency_and_presence_penalties_follow_openai_formula() -> None:
    logits = _logits(2, seed=4)
    params = [
        SamplingParams(frequency_penalty=0.5, presence_penalty=0.25),
        SamplingParams(frequency_penalty=-0.3, presence_penalty=1.5),
    ]
    prompts = [[40, 41, 42], [40]]  # prompt tokens must not be penalized
    outputs = [[3, 3, 3, 7, 42], [9, 9]]
    ours = apply_penalties(logits, params, prompts, outputs)
    expected = logits.clone()
    for row, p in enumerate(params):
        for token in set(outputs[row]):
            count = outputs[row].count(token)
            expected[row, token] -= p.frequency_penalty * count + p.presence_penalty
    torch.testing.assert_close(ours, expected)
    assert ours[0, 40] == logits[0, 40] and ours[0, 41] == logits[0, 41]


def _run(sampler: Sampler, logits: torch.Tensor, params: list[SamplingParams], seeds: list[int] | None = None,
         outputs: list[list[int]] | None = None):
    return sampler(logits, rows(params, seeds, [[0, 1]] * len(params), outputs))


def test_greedy_is_argmax() -> None:
    logits = _logits(5, seed=5)
    out = _run(Sampler(), logits, [SamplingParams(temperature=0)] * 5)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5


def test_greedy_with_penalty_is_argmax_of_penalized() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 4] = 2.0, 1.9
    out = _run(Sampler(), logits, [SamplingParams(temperature=0, presence_penalty=0.5)], outputs=[[3]])
    assert out.token_ids == [4]


def test_input_logits_not_modified_and_low_precision_accepted() -> None:
    logits = _logits(2, seed=6)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, top_k=5)] * 2
    _run(Sampler(), logits, params, outputs=[[1], [2]])
    assert torch.equal(logits, before)
    out = _run(Sampler(), logits.bfloat16(), params)
    assert len(out.token_ids) == 2


def test_mismatched_batch_raises() -> None:
    with pytest.raises(ValueError, match="batch size"):
        Sampler()(_logits(2), rows([SamplingParams()]))


TARGET = SamplingParams(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, seed=1234)
OTHERS = [
    SamplingParams(temperature=0),
    SamplingParams(temperature=1.2, logprobs=3),
    SamplingParams(temperature=0.5, typical_p=0.7),
    SamplingParams(temperature=1.0, top_k=5, frequency_penalty=0.5),
    SamplingParams(temperature=0, presence_penalty=1.0, logprobs=0),
    SamplingParams(temperature=2.0, top_p=0.5),
    SamplingParams(temperature=0.3, top_k=2, typical_p=0.9, repetition_penalty=0.8),
]


def test_seeded_row_gives_same_tokens_alone_and_batched() -> None:
    steps, slot = 12, 3
    alone = Row(TARGET, seed=1234, prompt_token_ids=[1, 2, 3])
    batch = rows(OTHERS[:slot] + [TARGET] + OTHERS[slot:], seeds=[100 + i for i in range(8)],
                 prompts=[[1, 2, 3]] * 8)
    batch[slot].seed = 1234
    sampler, alone_sampler = Sampler(), Sampler()
    for step in range(steps):
        logits = _logits(8, seed=1000 + step, scale=1.0)
        a = alone_sampler(logits[slot : slot + 1], [alone])
        b = sampler(logits, batch)
        alone.output_token_ids.append(a.token_ids[0])
        for row, token in zip(batch, b.token_ids, strict=True):
            row.output_token_ids.append(token)
    assert alone.output_token_ids == batch[slot].output_token_ids
    assert len(set(alone.output_token_ids)) > 1


def _sequence(seed: int, steps: int = 50) -> list[int]:
    logits = _logits(1, vocab=100, seed=7, scale=0.5)  # flat enough that seeds visibly disagree
    row = Row(SamplingParams(temperature=1.0, top_p=0.95), seed=seed)
    sampler = Sampler()
    for _ in range(steps):
        row.output_token_ids += sampler(logits, [row]).token_ids
    return row.output_token_ids


def test_same_seed_same_sequence_different_seeds_differ() -> None:
    assert _sequence(11) == _sequence(11)
    assert _sequence(11) != _sequence(12)
    assert len(set(_sequence(11))) > 10  # each step is a new draw, not the first one again


def test_uniforms_are_uniform_and_independent_across_seeds_and_steps() -> None:
    seeds = [s for s in range(200) for _ in range(50)]
    steps = [t for _ in range(200) for t in range(50)]
    u = uniforms(seeds, steps)
    assert u.dtype == torch.float64 and bool(((u >= 0) & (u < 1)).all())
    assert len(set(u.tolist())) == len(seeds)
    counts = torch.histc(u.float(), bins=20, min=0, max=1)
    expected = len(seeds) / 20
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert chi2 < 19 + 6 * math.sqrt(2 * 19), chi2
    # Neighbouring seeds and steps are uncorrelated.
    grid = u.view(200, 50)
    assert abs(float(torch.corrcoef(torch.stack([grid[:-1].flatten(), grid[1:].flatten()]))[0, 1])) < 0.05
    assert abs(float(torch.corrcoef(torch.stack([grid[:, :-1].flatten(), grid[:, 1:].flatten()]))[0, 1])) < 0.05
    assert torch.equal(uniforms([7], [3]), uniforms([7, 8], [3, 3])[:1])


def test_uniforms_are_splitmix64_as_published() -> None:
    """`uniforms` against SplitMix64 written out with Python integers (Steele, Lea & Flood 2014: Java's
    SplittableRandom.mix64 and its golden gamma), the reference checked first against the generator's
    first two outputs for seed 0 as published (0xe220a8397b1dcdaf, 0x6e789e6aa1b965f4)."""
    mask = (1 << 64) - 1
    gamma, key = 0x9E3779B97F4A7C15, 0x5851F42D4C957F2D

    def mix64(z: int) -> int:
        z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & mask
        z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    assert [mix64(gamma), mix64(2 * gamma & mask)] == [0xE220A8397B1DCDAF, 0x6E789E6AA1B965F4]
    seeds, steps = [0, 1, 7, 2**63 + 5, 2**64 - 1], [0, 1, 2, 1000, 2**40]
    # uniforms: the seed mixed once, then SplitMix64's output for step t + 1 from there; its top 53 bits.
    want = [(mix64((mix64(s ^ key) + (t + 1) * gamma) & mask) >> 11) * 2.0**-53 for s in seeds for t in steps]
    got = uniforms([s for s in seeds for _ in steps], [t for _ in seeds for t in steps])
    assert got.dtype == torch.float64 and got.tolist() == want


def test_reported_logprobs_are_floored() -> None:
    """-inf, NaN and anything below the floor are reported as the floor (JSON has no -inf nor NaN)."""
    floor = sampler_module.LOGPROB_FLOOR
    got = sampler_module._floored(torch.tensor([-math.inf, math.nan, floor - 1, floor, -1.5, 0.0]))
    assert got.tolist() == [floor, floor, floor, floor, -1.5, 0.0]


def test_draw_never_picks_a_zero_probability_token() -> None:
    probs = torch.tensor([[0.0, 0.5, 0.0, 0.5, 0.0], [0.0, 0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0, 0.0]])
    for u in (0.0, 0.25, 0.4999999, 0.5, 0.75, 1 - 2**-53):
        tokens = draw(probs, torch.full((3,), u, dtype=torch.float64)).tolist()
        assert tokens[0] in (1, 3) and tokens[1] == 4 and tokens[2] == 0
    assert draw(probs[:1], torch.tensor([0.49], dtype=torch.float64)).tolist() == [1]
    assert draw(probs[:1], torch.tensor([0.51], dtype=torch.float64)).tolist() == [3]


@pytest.mark.parametrize(
    "params",
    [
        SamplingParams(temperature=0.9, top_k=12, top_p=0.9),
        SamplingParams(temperature=1.2, typical_p=0.8),
        SamplingParams(temperature=0.7, repetition_penalty=1.4),
    ],
    ids=_short,
)
def test_empirical_frequencies_match_filtered_softmax(params: SamplingParams) -> None:
    # Many rows and few steps: the per-call overhead, not the row count, dominates on a CPU.
    vocab, num_rows, steps = 24, 6000, 2
    logits = _logits(1, vocab=vocab, seed=8, scale=1.5).expand(num_rows, vocab)
    batch = rows([params] * num_rows, prompts=[[0, 5]] * num_rows)
    counts = torch.zeros(vocab)
    sampler = Sampler()
    for step in range(steps):
        # The rows' outputs stay empty (so the penalties stay the same); the step moves via the seeds.
        for i, row in enumerate(batch):
            row.seed = step * num_rows + i
        tokens = sampler(logits, batch).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=vocab)

    penalized = apply_penalties(logits[:1], [params], [[0, 5]], [[]])
    probs = apply_filters(apply_temperature(penalized, [params]), [params]).softmax(-1)[0]
    expected = probs * num_rows * steps
    assert counts[probs == 0].sum() == 0
    kept = probs > 0
    chi2 = float(((counts[kept] - expected[kept]) ** 2 / expected[kept]).sum())
    dof = int(kept.sum()) - 1
    # Mean dof, sd sqrt(2 dof): six sds leaves a seeded test far from flaky yet catches a wrong distribution.
    assert chi2 < dof + 6 * math.sqrt(2 * dof), (chi2, dof)


def test_logprobs_values_and_alternatives() -> None:
    logits = _logits(4, seed=9)
    params = [
        SamplingParams(temperature=0.5, top_k=1, logprobs=5, presence_penalty=1.0),
        SamplingParams(temperature=0, logprobs=3, repetition_penalty=1.2),
        SamplingParams(temperature=1.0, logprobs=0),
        SamplingParams(temperature=1.0),
    ]
    outputs = [[int(logits[0].argmax())], [4], [], []]
    out = Sampler()(logits, rows(params, outputs=outputs))

    penalized = apply_penalties(logits, params, [[1]] * 4, outputs)
    for row, temperature, k in ((0, 0.5, 5), (1, 1.0, 3), (2, 1.0, 0)):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row]
        reference = (penalized[row] / temperature).log_softmax(-1)  # before filtering
        assert lp.logprob == pytest.approx(float(reference[lp.token_id]), abs=1e-5)
        assert [t for t, _ in lp.top] == reference.topk(k).indices.tolist()
        values = [v for _, v in lp.top]
        assert values == sorted(values, reverse=True)
        assert values == pytest.approx(reference.topk(k).values.tolist(), abs=1e-5)
    # top_k=1 keeps one token for the draw, yet the alternatives still carry finite logprobs.
    assert all(math.isfinite(v) for _, v in out.logprobs[0].top)
    assert out.token_ids[1] == int(penalized[1].argmax())
    assert out.logprobs[3] is None


def test_logprobs_on_every_greedy_row_leave_the_logits_alone() -> None:
    # The common served case (greedy, token logprobs on every row) skips the temperature and row copies:
    # the caller's logits must still come back unchanged, and the logprobs be the plain log_softmax.
    logits = _logits(3, seed=11)
    before = logits.clone()
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=0, logprobs=0),
              SamplingParams(temperature=1.0, top_k=1, logprobs=1)]
    out = Sampler()(logits, rows(params))
    assert torch.equal(logits, before)
    reference = logits.log_softmax(-1)
    for row, k in enumerate((2, 0, 1)):
        lp = out.logprobs[row]
        assert lp is not None and lp.token_id == out.token_ids[row] == int(logits[row].argmax())
        assert lp.logprob == pytest.approx(float(reference[row, lp.token_id]), abs=1e-6)
        assert [t for t, _ in lp.top] == reference[row].topk(k).indices.tolist()


def test_mixed_greedy_and_sampled_batch() -> None:
    logits = _logits(6, seed=10)
    params = [
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_k=1),
        SamplingParams(temperature=0.7, top_k=3),
        SamplingParams(temperature=0),
        SamplingParams(temperature=1.0, top_p=0.5),
        SamplingParams(temperature=1.0, typical_p=0.5),
    ]
    out = _run(Sampler(), logits, params)
    argmax = logits.argmax(-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[3] == argmax[3]
    assert out.token_ids[1] == argmax[1]
    assert out.token_ids[2] in logits[2].topk(3).indices.tolist()
    for row in (4, 5):
        allowed = torch.isfinite(apply_filters(logits[row : row + 1], [params[row]]))[0]
        assert allowed[out.token_ids[row]]
    # Each sampled row matches the same row run alone with the same seed.
    for row in (2, 4, 5):
        alone = _run(Sampler(), logits[row : row + 1], [params[row]], seeds=[row])
        assert alone.token_ids[0] == out.token_ids[row]


@pytest.mark.parametrize("vocab", [64, 3000])
def test_fast_top_k_top_p_equals_the_full_sort(vocab: int) -> None:
    # The candidates path (topk) against the sort of the whole vocabulary, on peaked and flat rows; with
    # 3000 tokens the flat rows' candidates hold too little mass and fall back to the sort.
    params = [SamplingParams(top_k=k, top_p=p) for k in (0, 1, 7, 40, vocab + 5) for p in (1.0, 0.95, 0.5, 1e-6)
              if k or p < 1.0]
    for seed, scale in ((1, 3.0), (2, 0.05), (3, 1.0)):
        logits = _logits(len(params), vocab=vocab, seed=seed, scale=scale)
        fast = filters_module._top_k_top_p(logits, params)
        full = filters_module._top_k_top_p_sorted(logits, params)
        assert torch.equal(fast.isinf(), full.isinf()), (seed, scale)
        assert torch.equal(fast[fast.isfinite()], logits[fast.isfinite()])


def test_ranked_draws_follow_the_softmax_of_large_logits() -> None:
    """Candidates' weights are exp(logit - the largest): logits near 100 (exp overflows float32 past ~88)
    still draw each token with its softmax share, here 0.665 / 0.245 / 0.090 for 100, 99, 98 under top-k 3."""
    logits = torch.full((1, 64), 0.0)
    logits[0, [5, 9, 2]] = torch.tensor([100.0, 99.0, 98.0])
    first, _ = filters_module.candidate_tiers(logits, [SamplingParams(temperature=1.0, top_k=3)])
    for u, token in ((0.0, 5), (0.6, 5), (0.7, 9), (0.9, 9), (0.92, 2), (1 - 2**-40, 2)):
        assert sampler_module._draw_ranked(first, torch.tensor([u], dtype=torch.float64)).tolist() == [token], u


def test_top_p_rows_go_through_wider_candidates_until_settled() -> None:
    # Row 0 is peaked (128 candidates settle it), row 1 spreads its mass over 500 tokens (1,024 do),
    # row 2 over all 3,000 (only the full sort does); each gets what the full sort gives, in draws too.
    vocab = 3000
    logits = torch.full((3, vocab), -30.0)
    logits[0, :5] = 5.0
    logits[1, 1000:1500] = torch.linspace(0, 0.5, 500)
    logits[2] = torch.linspace(0, 0.1, vocab)
    params = [SamplingParams(temperature=1.0, top_p=0.9)] * 3
    first, wider = filters_module.candidate_tiers(logits, params)
    tiers = list(wider)
    assert first.values.shape[-1] == 128 and first.unsettled == [1, 2]
    assert [(index.tolist(), c.values.shape[-1]) for index, c in tiers] == [([1, 2], 1024), ([2], vocab)]
    assert torch.equal(filters_module._top_k_top_p(logits, params).isinf(),
                       filters_module._top_k_top_p_sorted(logits, params).isinf())
    full = filters_module.candidates(logits, params, full=True)
    for u in torch.linspace(0, 1 - 2**-40, 33, dtype=torch.float64):
        us = torch.full((3,), float(u), dtype=torch.float64)
        got = sampler_module._draw_ranked(first, us)
        for index, c in tiers:
            got = got.index_copy(0, index, sampler_module._draw_ranked(c, us[index]))
        assert got.tolist() == sampler_module._draw_ranked(full, us).tolist(), float(u)
    batch = [Row(p, seed=i) for i, p in enumerate(params)]  # the sampler takes the same path
    want = sampler_module._draw_ranked(full, uniforms([0, 1, 2], [0, 0, 0])).tolist()
    assert Sampler()(logits, batch).token_ids == want


def test_fast_top_k_keeps_ties_like_hf() -> None:
    # Equal logits: top-k keeps every tie of the k-th, beyond the candidates (HF's rule); top-p keeps as
    # many of a tie group as HF (which ones is up to the sort, in HF too).
    logits = torch.zeros(3, 2000)
    logits[:, :10] = 1.0
    params = [SamplingParams(top_k=3), SamplingParams(top_k=3, top_p=0.5), SamplingParams(top_p=0.5)]
    fast = filters_module._top_k_top_p(logits, params)
    for row, p in enumerate(params):
        assert int(fast[row].isfinite().sum()) == int(_hf_warp(logits[row], p).isfinite().sum()), p
    assert fast[0].isfinite().nonzero().flatten().tolist() == list(range(10))
    assert int(fast[1].isfinite().sum()) == 5 and bool(fast[1, 10:].isinf().all())
    # Top-p alone: the ten likelier tokens hold too little mass, the cut falls among the 1,990 others.
    assert bool(fast[2, :10].isfinite().all()) and 10 < int(fast[2].isfinite().sum()) < 2000


def test_penalty_history_equals_the_full_rebuild_as_rows_join_grow_and_leave() -> None:
    vocab = 50
    rng = random.Random(0)
    kinds = [SamplingParams(repetition_penalty=1.3), SamplingParams(frequency_penalty=0.7, presence_penalty=0.2),
             SamplingParams(repetition_penalty=0.8, presence_penalty=-0.5), SamplingParams()]
    live = [Row(kinds[i % 4], i, [rng.randrange(vocab + 3) for _ in range(5)]) for i in range(6)]
    history = TokenHistory()
    for step in range(40):
        logits = _logits(len(live), vocab=vocab, seed=step)
        got = history.penalize(logits, live)
        want = apply_penalties(logits, [r.params for r in live], [r.prompt_token_ids for r in live],
                               [r.output_token_ids for r in live])
        assert torch.equal(got, want), step
        for row in live:
            row.output_token_ids.append(rng.randrange(vocab + 3))  # ids past the vocab are ignored
        action = rng.random()
        if action < 0.2 and len(live) > 1:
            live.pop(rng.randrange(len(live)))
        elif action < 0.4:
            live.insert(rng.randrange(len(live) + 1), Row(kinds[step % 4], 100 + step, [rng.randrange(vocab)]))
        elif action < 0.5:
            rng.shuffle(live)
        elif action < 0.55:
            live[0].output_token_ids = live[0].output_token_ids[:1]  # an output that shrank: rebuilt
        elif action < 0.6:
            live = [Row(kinds[3], 999, [1])]  # no penalty at all: the history is dropped, then rebuilt


def test_penalty_history_that_failed_half_way_is_rebuilt_not_counted_twice(monkeypatch: pytest.MonkeyPatch) -> None:
    # A failure inside an update (after some rows' new tokens went in) must not leave counts that the
    # next call adds the same tokens to again: every row's penalty would drift, not only the failing one's.
    vocab = 20
    live = [Row(SamplingParams(frequency_penalty=1.0), i, [1], [3, 4]) for i in range(3)]
    history = TokenHistory()
    logits = _logits(3, vocab=vocab, seed=1)
    history.penalize(logits, live)
    for row in live:
        row.output_token_ids.append(5)
    calls = 0
    real_put = torch.Tensor.index_put_

    def put_then_fail(self: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        nonlocal calls
        calls += 1
        real_put(self, *args, **kwargs)
        raise RuntimeError("injected after the write")

    monkeypatch.setattr(torch.Tensor, "index_put_", put_then_fail)
    with pytest.raises(RuntimeError, match="injected"):
        history.penalize(logits, live)
    monkeypatch.undo()
    assert calls == 1
    want = apply_penalties(logits, [r.params for r in live], [r.prompt_token_ids for r in live],
                           [r.output_token_ids for r in live])
    assert torch.equal(history.penalize(logits, live), want)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_argmax_is_the_first_maximum(dtype: torch.dtype) -> None:
    logits = _logits(64, vocab=300, seed=20).to(dtype)
    logits[:, 7] = logits[:, 250] = 50.0  # a tie: the first one wins, as torch.argmax and HF's greedy pick
    logits[0, 3] = 60.0
    assert sampler_module.argmax(logits).tolist() == [3] + [7] * 63
    assert sampler_module.argmax(logits[:, 100:]).tolist() == (logits[:, 100:].float().argmax(dim=-1)).tolist()


def test_a_row_draws_the_same_token_from_its_candidates_as_from_the_full_sort() -> None:
    # Which path settles a row depends on the batch (the candidates' width is the batch's largest top-k),
    # so both must give the same token for the same logits and uniform number, ties included (logits in
    # steps of 1/4, as coarse as a low-precision model's, so the candidates hold many equal values).
    params = [SamplingParams(top_k=k, top_p=p) for k in (0, 3, 40) for p in (1.0, 0.9, 0.3) if k or p < 1.0]
    logits = (_logits(len(params), vocab=3000, seed=21, scale=1.0) * 4).round() / 4
    fast = filters_module.candidates(logits, params)
    full = filters_module.candidates(logits, params, full=True)
    assert not fast.unsettled or set(fast.unsettled) < set(range(len(params)))
    settled = [i for i in range(len(params)) if i not in fast.unsettled]
    for u in torch.linspace(0, 1 - 2**-40, 97, dtype=torch.float64):
        us = torch.full((len(params),), float(u), dtype=torch.float64)
        a = sampler_module._draw_ranked(fast, us)
        b = sampler_module._draw_ranked(full, us)
        assert a[settled].tolist() == b[settled].tolist(), float(u)


def test_the_kept_parameter_table_follows_the_rows_parameters() -> None:
    # The sampler keeps per-row parameter tensors while the same parameters come back; a row whose
    # parameters change (or a new batch) must be sampled with the new ones, as a fresh sampler would.
    logits = _logits(4, seed=22)
    kinds = [SamplingParams(temperature=0.7, top_k=5, seed=1), SamplingParams(temperature=0.0),
             SamplingParams(temperature=1.2, top_p=0.5, repetition_penalty=1.3), SamplingParams(typical_p=0.6)]
    batch = rows(kinds, prompts=[[1, 2]] * 4)
    kept = Sampler()
    for step in range(6):
        if step == 3:
            batch[1].params = SamplingParams(temperature=0.9, top_k=2)
            batch[2].params = SamplingParams(temperature=0.0, frequency_penalty=1.0)
        if step == 5:
            batch = batch[::-1]
        got = kept(logits, batch).token_ids
        assert got == Sampler()(logits, batch).token_ids, step
        for row, token in zip(batch, got, strict=True):
            row.output_token_ids.append(token)


def test_parameters_that_overflow_the_logits_still_draw_a_likely_token() -> None:
    # Found by the fuzzer (tests/e2e/test_fuzz.py, slow sweep): a repetition penalty of 1e-258 divides the
    # positive logits of seen tokens to +inf, and the softmax's inf - inf gave an out-of-range draw.
    logits = torch.tensor([[3.0, 1.0, -2.0, 2.5, 0.5]])
    for params, seen in ((SamplingParams(temperature=6.4e15, top_p=1.6e-211, repetition_penalty=1.3e-258,
                                         frequency_penalty=-1.3, seed=1), [0, 3]),
                         (SamplingParams(temperature=1e-40, seed=2, logprobs=1), [])):
        out = _run(Sampler(), logits, [params], outputs=[seen])
        assert out.token_ids in ([0], [3])  # the overflowed (or sharpest) tokens, never out of range
    assert out.logprobs[0] is not None and math.isfinite(out.logprobs[0].logprob)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kinds", ["greedy", "sampled", "mixed"])
def test_tokens_on_the_device_are_the_tokens_call_picks(kinds: str, dtype: torch.dtype) -> None:
    """`Sampler.tokens` (async scheduling) gives every row the token and the logprobs `__call__` gives it, over
    batches of greedy rows, sampled rows whose candidates settle them (top-k / top-p, through the wider tiers)
    and ones drawn in vocabulary order (typical-p, no filter), some wanting logprobs, at several steps."""
    greedy = [SamplingParams(temperature=0), SamplingParams(temperature=0, logprobs=2)]
    sampled = [SamplingParams(temperature=0.8, top_k=20), SamplingParams(temperature=1.0, top_p=0.99),
               SamplingParams(temperature=0.6, typical_p=0.5, logprobs=0), SamplingParams(temperature=1.3),
               SamplingParams(temperature=0.9, top_k=40, top_p=0.9, logprobs=5)]
    choices = {"greedy": greedy, "sampled": sampled, "mixed": greedy + sampled}[kinds]
    rng = random.Random(kinds)
    for trial in range(8):
        batch = rng.randrange(1, 24)
        params = [rng.choice(choices) for _ in range(batch)]
        logits = _logits(batch, seed=trial, scale=rng.choice([0.5, 3.0])).to(dtype)
        batch_rows = rows(params, seeds=[rng.randrange(1 << 40) for _ in range(batch)],
                          outputs=[[7] * rng.randrange(5) for _ in range(batch)])
        tokens, logprobs = Sampler().tokens(logits, batch_rows)
        expected = Sampler()(logits, batch_rows)
        assert tokens.dtype == torch.long and tokens.shape == (batch,)
        assert tokens.tolist() == expected.token_ids, (kinds, trial)
        if logprobs is None:
            assert expected.logprobs == [None] * batch
            continue
        got = logprobs.build(tokens.tolist(), params, logprobs.chosen.tolist(), logprobs.top_ids.tolist(),
                             logprobs.top_values.tolist())
        assert got == expected.logprobs, (kinds, trial)


@pytest.mark.parametrize("kinds", ["greedy", "plain greedy", "mixed"])
def test_tokens_under_a_grammar_mask_are_the_tokens_call_picks(kinds: str) -> None:
    """With a grammar's mask on some rows, `tokens` picks what `__call__` picks (the mask before the greedy pick
    and the draws), and the logprobs stay the model's."""
    rng = random.Random(kinds)
    params = {"greedy": [SamplingParams(temperature=0, logprobs=1)], "plain greedy": [SamplingParams(temperature=0)],
              "mixed": [SamplingParams(temperature=0), SamplingParams(temperature=0.8, top_k=10, logprobs=2),
                        SamplingParams(temperature=1.0, repetition_penalty=1.3)]}[kinds]
    for trial in range(6):
        batch = rng.randrange(2, 12)
        batch_rows = rows([rng.choice(params) for _ in range(batch)], seeds=list(range(batch)),
                          outputs=[[3] * rng.randrange(3) for _ in range(batch)])
        logits = _logits(batch, seed=trial)
        constrained = sorted(rng.sample(range(batch), rng.randrange(1, batch)))
        allowed = torch.rand(len(constrained), VOCAB, generator=torch.Generator().manual_seed(trial)) < 0.1
        allowed[:, 0] = True  # at least one token each
        mask = TokenMask(torch.tensor(constrained), allowed)
        tokens, logprobs = Sampler().tokens(logits, batch_rows, mask)
        expected = Sampler()(logits, batch_rows, mask)
        assert tokens.tolist() == expected.token_ids, (kinds, trial)
        for j, i in enumerate(constrained):
            assert allowed[j, tokens[i]], (kinds, trial)
        if logprobs is not None:
            assert logprobs.build(tokens.tolist(), [r.params for r in batch_rows], logprobs.chosen.tolist(),
                                  logprobs.top_ids.tolist(), logprobs.top_values.tolist()) == expected.logprobs


def test_tokens_of_non_finite_logits_stay_in_the_vocabulary() -> None:
    """A NaN row's token (found and failed by the engine later) is still a valid index: the next step's
    embedding lookup and the logprobs' gather read it before anyone checks."""
    logits = _logits(3)
    logits[1] = float("nan")
    for params in (SamplingParams(temperature=0), SamplingParams(temperature=1.0, logprobs=1),
                   SamplingParams(temperature=0.7, typical_p=0.5)):
        tokens, _ = Sampler().tokens(logits, rows([params] * 3))
        assert bool(((tokens >= 0) & (tokens < VOCAB)).all()), params
