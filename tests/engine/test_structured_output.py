"""Structured output through the engine on the demo model: JSON that parses and follows its schema,
for the base model and an adapter, greedy and sampled, batched with unconstrained requests."""

from __future__ import annotations

import json

import jsonschema
import pytest

from loraplex import LLM, SamplingParams
from loraplex.engine.request import FinishReason
from loraplex.examples import example_adapters

PERSON = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 16},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "pet": {"enum": ["cat", "dog", "none"]},
        "tags": {"type": "array", "items": {"type": "string", "maxLength": 10}, "maxItems": 3},
    },
    "required": ["name", "age", "pet", "tags"],
    "additionalProperties": False,
}
INVOICE = {"type": "object", "properties": {"name": {"type": "string"}, "amount": {"type": "number"}},
           "required": ["name", "amount"], "additionalProperties": False}
PROMPTS = ["Describe a person as JSON:", "User: give me a JSON record for Alice, 31, who has a dog.\nAssistant:"]
FREE_PROMPTS = ["The capital of France is", "Once upon a time", "1, 2, 3, 4,"]
# The bounded schema keeps any valid document under this many tokens.
ROOM = 96


@pytest.fixture(scope="module")
def llm(demo_model_path) -> LLM:
    return LLM(str(demo_model_path), max_loras=2, max_lora_rank=8)


def _valid(text: str, schema: dict) -> dict:
    doc = json.loads(text)
    jsonschema.validate(doc, schema)
    return doc


def _structured(seed: int | None, schema: dict = PERSON, **options: object) -> SamplingParams:
    sampling = dict(temperature=0.0) if seed is None else dict(temperature=1.0, seed=seed)
    return SamplingParams(max_new_tokens=ROOM, json_schema=json.dumps(schema), **sampling, **options)  # type: ignore[arg-type]


def test_greedy_and_sampled_outputs_follow_the_schema(llm):
    params = [_structured(None), _structured(None)] + [_structured(seed) for seed in range(3)]
    prompts = PROMPTS + [PROMPTS[i % 2] for i in range(3)]
    outs = llm.generate(prompts, params)
    for out in outs:
        assert out.finish_reason is FinishReason.EOS_TOKEN, out.text
        _valid(out.text, PERSON)
    assert len({o.text for o in outs[2:]}) > 1  # sampling really sampled within the grammar


def test_json_object_without_schema_is_any_object(llm):
    # Greedy: an unbounded object sampled at temperature 1 may well ramble on past any max_new_tokens.
    outs = llm.generate(PROMPTS, SamplingParams(max_new_tokens=ROOM, temperature=0, json_schema='{"type": "object"}'))
    for out in outs:
        assert out.finish_reason is FinishReason.EOS_TOKEN
        assert isinstance(json.loads(out.text), dict)


def test_unconstrained_requests_are_unchanged_by_constrained_neighbours(llm):
    free = [SamplingParams(max_new_tokens=12, temperature=0), SamplingParams(max_new_tokens=12, temperature=1.0, seed=5),
            SamplingParams(max_new_tokens=12, temperature=0.8, top_p=0.9, seed=6, logprobs=2)]
    structured = [_structured(None), _structured(11)]
    alone_free = llm.generate(FREE_PROMPTS, free)
    alone_structured = llm.generate(PROMPTS, structured)
    mixed = llm.generate([*FREE_PROMPTS, *PROMPTS], [*free, *structured])
    assert [o.token_ids for o in mixed[:3]] == [o.token_ids for o in alone_free]
    # Same tokens and the same logprobs up to float rounding: a CPU GEMM's blocking (so its last bits)
    # depends on the batch's row count, which the neighbours change.
    for got, want in zip(mixed[:3], alone_free, strict=True):
        assert (got.logprobs is None) == (want.logprobs is None)
        for g, w in zip(got.logprobs or [], want.logprobs or [], strict=True):
            assert g.token_id == w.token_id and [t for t, _ in g.top] == [t for t, _ in w.top]
            assert [g.logprob, *(lp for _, lp in g.top)] == pytest.approx([w.logprob, *(lp for _, lp in w.top)],
                                                                          rel=1e-4, abs=1e-5)
    assert [o.token_ids for o in mixed[3:]] == [o.token_ids for o in alone_structured]
    for out in mixed[3:]:
        _valid(out.text, PERSON)


def test_adapter_request_follows_the_schema(llm):
    """The invoice adapter already answers in this schema: the grammar must leave its greedy answer as it is,
    while the base model, batched beside it, is held to the schema too."""
    adapter = str(example_adapters()["invoice-json"])
    messages = [{"role": "user", "content": "Please pay $75.99 to Priya Raman before June 3."}]
    free = llm.chat(messages, SamplingParams(max_new_tokens=40, temperature=0), adapter_id=adapter)[0]
    both = llm.chat([messages, messages], _structured(None, INVOICE), adapter_id=[adapter, None])
    assert both[0].text == free.text
    assert _valid(both[0].text, INVOICE) == {"name": "Priya Raman", "amount": 75.99}
    _valid(both[1].text, INVOICE)
    assert all(o.finish_reason is FinishReason.EOS_TOKEN for o in both)


def test_ignore_eos_cannot_run_past_the_end_of_the_json(llm):
    out = llm.generate(PROMPTS[:1], _structured(None, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.EOS_TOKEN and len(out.token_ids) < ROOM
    _valid(out.text, PERSON)


def test_max_new_tokens_cut_reports_length(llm):
    out = llm.generate(PROMPTS[:1], SamplingParams(max_new_tokens=5, temperature=0,
                                                   json_schema=json.dumps(PERSON)))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 5
    assert out.text.startswith('{"name": ')
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


@pytest.mark.slow
def test_preemption_keeps_each_grammar_where_its_output_is(llm, demo_model_path):
    """Recomputed sequences keep their matchers: a KV cache too small for the batch preempts, and the outputs
    stay those of a roomy cache."""
    params = [_structured(seed) for seed in range(4)]
    prompts = [PROMPTS[i % 2] for i in range(4)]
    expected = [o.token_ids for o in llm.generate(prompts, params)]
    tight = LLM(str(demo_model_path), num_blocks=36, block_size=4)
    outs = tight.generate(prompts, params)
    assert tight.engine.scheduler.num_preemptions > 0
    assert [o.token_ids for o in outs] == expected
    for out in outs:
        _valid(out.text, PERSON)

