import math

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


def _run(
    sampler: Sampler,
    logits: torch.Tensor,
    params: list[SamplingParams],
    generators: list[torch.Generator],
    outputs: list[list[int]] | None = None,
):
    n = len(params)
    return sampler(logits, params, generators, [[0, 1]] * n, outputs or [[] for _ in range(n)])


def test_greedy_is_argmax_and_draws_nothing() -> None:
    logits = _logits(5, seed=5)
    generators = [torch.Generator().manual_seed(i) for i in range(5)]
    states = [g.get_state() for g in generators]
    out = _run(Sampler(), logits, [SamplingParams(temperature=0)] * 5, generators)
    assert out.token_ids == logits.argmax(-1).tolist()
    assert out.logprobs == [None] * 5
    assert all(torch.equal(g.get_state(), s) for g, s in zip(generators, states, strict=True))


def test_greedy_with_penalty_is_argmax_of_penalized() -> None:
    logits = torch.zeros(1, 10)
    logits[0, 3], logits[0, 4] = 2.0, 1.9
    out = _run(Sampler(), logits, [SamplingParams(temperature=0, presence_penalty=0.5)],
               [torch.Generator()], outputs=[[3]])
    assert out.token_ids == [4]


def test_input_logits_not_modified_and_low_precision_accepted() -> None:
    logits = _logits(2, seed=6)
    before = logits.clone()
    params = [SamplingParams(repetition_penalty=1.5, frequency_penalty=1.0, top_k=5)] * 2
    _run(Sampler(), logits, params, [torch.Generator(), torch.Generator()], outputs=[[1], [2]])
    assert torch.equal(logits, before)
    out = _run(Sampler(), logits.bfloat16(), params, [torch.Generator(), torch.Generator()])
    assert len(out.token_ids) == 2


def test_mismatched_batch_raises() -> None:
    with pytest.raises(ValueError, match="batch size"):
        Sampler()(_logits(2), [SamplingParams()], [torch.Generator()], [[0]], [[]])


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
    alone_gen = torch.Generator().manual_seed(1234)
    batch_gens = [torch.Generator().manual_seed(100 + i) for i in range(8)]
    batch_gens[slot] = torch.Generator().manual_seed(1234)
    params = OTHERS[:slot] + [TARGET] + OTHERS[slot:]
    alone_out: list[int] = []
    batch_outs: list[list[int]] = [[] for _ in range(8)]
    sampler = Sampler()
    for step in range(steps):
        logits = _logits(8, seed=1000 + step, scale=1.0)
        a = sampler(logits[slot : slot + 1], [TARGET], [alone_gen], [[1, 2, 3]], [alone_out])
        b = sampler(logits, params, batch_gens, [[1, 2, 3]] * 8, batch_outs)
        alone_out = alone_out + a.token_ids
        batch_outs = [seq + [t] for seq, t in zip(batch_outs, b.token_ids, strict=True)]
    assert alone_out == batch_outs[slot]
    assert len(set(alone_out)) > 1


def _sequence(seed: int, steps: int = 50) -> list[int]:
    generator = torch.Generator().manual_seed(seed)
    logits = _logits(1, vocab=100, seed=7, scale=0.5)  # flat enough that seeds visibly disagree
    params = [SamplingParams(temperature=1.0, top_p=0.95)]
    return [_run(Sampler(), logits, params, [generator]).token_ids[0] for _ in range(steps)]


def test_same_seed_same_sequence_different_seeds_differ() -> None:
    assert _sequence(11) == _sequence(11)
    assert _sequence(11) != _sequence(12)


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
    vocab, rows, steps = 24, 6000, 2
    logits = _logits(1, vocab=vocab, seed=8, scale=1.5).expand(rows, vocab)
    prompts, outputs = [[0, 5]] * rows, [[] for _ in range(rows)]
    generators = [torch.Generator().manual_seed(i) for i in range(rows)]
    counts = torch.zeros(vocab)
    sampler = Sampler()
    for _ in range(steps):
        tokens = sampler(logits, [params] * rows, generators, prompts, outputs).token_ids
        counts += torch.bincount(torch.tensor(tokens), minlength=vocab)

    penalized = apply_penalties(logits[:1], [params], prompts[:1], outputs[:1])
    probs = apply_filters(apply_temperature(penalized, [params]), [params]).softmax(-1)[0]
    expected = probs * rows * steps
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
    gens = [torch.Generator().manual_seed(i) for i in range(4)]
    out = Sampler()(logits, params, gens, [[1]] * 4, outputs)

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
    out = Sampler()(logits, params, [torch.Generator().manual_seed(i) for i in range(3)], [[1]] * 3, [[]] * 3)
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
    gens = [torch.Generator().manual_seed(i) for i in range(6)]
    out = _run(Sampler(), logits, params, gens)
    argmax = logits.argmax(-1).tolist()
    assert out.token_ids[0] == argmax[0] and out.token_ids[3] == argmax[3]
    assert out.token_ids[1] == argmax[1]
    assert out.token_ids[2] in logits[2].topk(3).indices.tolist()
    for row in (4, 5):
        allowed = torch.isfinite(apply_filters(logits[row : row + 1], [params[row]]))[0]
        assert allowed[out.token_ids[row]]
    # Each sampled row matches the same row run alone with a fresh generator of the same seed.
    for row in (2, 4, 5):
        alone = _run(Sampler(), logits[row : row + 1], [params[row]], [torch.Generator().manual_seed(row)])
        assert alone.token_ids[0] == out.token_ids[row]
