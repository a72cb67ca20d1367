"""Structured output: schema checks, the compile cache, and token masks on the demo model's real tokenizer."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoTokenizer

from loraplex.engine.request import SamplingParams
from loraplex.sampling import Sampler
from loraplex.sampling.structured import (
    MAX_SCHEMA_BYTES,
    GrammarCompiler,
    TokenMask,
    check_json_schema,
    token_mask,
)
from tests.sampling.rows import rows

FLAG = json.dumps({"type": "object", "properties": {"ok": {"type": "boolean"}}, "required": ["ok"],
                   "additionalProperties": False})
FLAG_TEXTS = ['{"ok": true}', '{"ok": false}']  # everything FLAG accepts, in the compact spelling we compile


@pytest.fixture(scope="module")
def tokenizer(demo_model_path):
    return AutoTokenizer.from_pretrained(demo_model_path)


@pytest.fixture(scope="module")
def compiler(tokenizer):
    return GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id])


@pytest.fixture(scope="module")
def token_texts(tokenizer) -> list[str]:
    return [tokenizer.decode([i]) for i in range(len(tokenizer))]


def _allowed(compiler, matcher, vocab: int) -> set[int]:
    mask = token_mask([matcher], vocab, torch.device("cpu"))
    assert mask is not None and mask.allowed.shape == (1, vocab)
    return set(mask.allowed[0].nonzero().flatten().tolist())


@pytest.mark.parametrize("schema, message", [
    ("{", "json_schema is not valid JSON"),
    ("[1, 2]", "json_schema must be a JSON object"),
    ('{"type": "foo"}', "Invalid type: foo"),
    ('{"type": "string", "pattern": "("}', "unclosed group"),
    ('{"$ref": "#/definitions/missing"}', "does not exist"),
    (json.dumps({"type": "object", "description": "x" * MAX_SCHEMA_BYTES}), "at most 65536"),
])
def test_bad_schema_is_a_value_error_naming_it(schema, message):
    with pytest.raises(ValueError, match=message):
        check_json_schema(schema)
    with pytest.raises(ValueError, match="json_schema"):
        SamplingParams(json_schema=schema)


def test_good_schema_is_accepted():
    assert SamplingParams(json_schema=FLAG).json_schema == FLAG
    check_json_schema('{"type": "object"}')


def test_mask_allows_only_tokens_that_continue_valid_json(compiler, tokenizer, token_texts):
    """Every allowed token extends the output towards a valid document; where the document may go more than
    one way, every such token is allowed. (Where the grammar forces the next bytes, llguidance allows only
    their canonical token: '{"' but not '{'.)"""
    vocab = len(tokenizer)
    matcher = compiler.matcher(FLAG)
    out = ""
    for token in tokenizer.encode(FLAG_TEXTS[0], add_special_tokens=False):
        continues = {i for i, t in enumerate(token_texts)
                     if t and "\ufffd" not in t and any(s.startswith(out + t) for s in FLAG_TEXTS)}
        allowed = _allowed(compiler, matcher, vocab)
        assert token in allowed and allowed <= continues, f"after {out!r}"
        if out == '{"ok":':  # true or false
            assert allowed == continues and len(allowed) > 2
        assert tokenizer.eos_token_id not in allowed and not matcher.done
        matcher.advance(token)
        out += token_texts[token]
    assert out == FLAG_TEXTS[0] and matcher.done and not matcher.error
    assert _allowed(compiler, matcher, vocab) == {tokenizer.eos_token_id}  # complete: only EOS may follow


def test_mask_covers_a_padded_vocabulary(tokenizer):
    padded = len(tokenizer) + 64  # models often pad the embedding past the tokenizer
    compiler = GrammarCompiler(tokenizer, padded, [tokenizer.eos_token_id])
    mask = token_mask([compiler.matcher(FLAG)], padded, torch.device("cpu"))
    assert mask is not None and mask.allowed.shape == (1, padded)
    assert not mask.allowed[0, len(tokenizer):].any()


def test_mask_only_touches_constrained_rows(compiler, tokenizer):
    vocab = len(tokenizer)
    assert token_mask([None, None], vocab, torch.device("cpu")) is None
    mask = token_mask([None, compiler.matcher(FLAG), None], vocab, torch.device("cpu"))
    assert isinstance(mask, TokenMask) and mask.rows.tolist() == [1]
    logits = torch.randn(3, vocab)  # [batch, vocab]
    masked = mask.apply(logits)
    assert torch.equal(masked[[0, 2]], logits[[0, 2]])
    assert torch.equal(masked[1].isfinite(), mask.allowed[0])
    assert logits.isfinite().all()  # out of place


def test_sampler_draws_only_allowed_tokens_and_keeps_model_logprobs(compiler, tokenizer):
    vocab = len(tokenizer)
    torch.manual_seed(0)
    logits = torch.randn(4, vocab) * 3  # [batch, vocab]
    params = [SamplingParams(temperature=0, logprobs=2), SamplingParams(temperature=1.0, top_k=50, logprobs=0),
              SamplingParams(temperature=0.7, top_p=0.9), SamplingParams(temperature=0)]
    matchers = [compiler.matcher(FLAG), None, compiler.matcher(FLAG), None]
    mask = token_mask(matchers, vocab, torch.device("cpu"))
    assert mask is not None
    allowed = [set(row.nonzero().flatten().tolist()) for row in mask.allowed]

    def run(m):
        return Sampler()(logits, rows(params, seeds=range(7, 11)), m)

    free, constrained = run(None), run(mask)
    assert constrained.token_ids[0] in allowed[0] and constrained.token_ids[2] in allowed[1]
    assert constrained.token_ids[0] == max(allowed[0], key=lambda i: logits[0, i].item())  # greedy: best allowed
    assert free.token_ids[0] not in allowed[0]  # the mask made a difference
    assert [constrained.token_ids[i] for i in (1, 3)] == [free.token_ids[i] for i in (1, 3)]
    assert constrained.logprobs[1] == free.logprobs[1]
    # The chosen token's logprob is the model's, and the alternatives are the model's top tokens.
    want = logits[0].log_softmax(-1)
    assert constrained.logprobs[0].logprob == pytest.approx(want[constrained.token_ids[0]].item(), abs=1e-5)
    assert constrained.logprobs[0].top == free.logprobs[0].top


def test_greedy_fast_path_applies_the_mask(compiler, tokenizer):
    vocab = len(tokenizer)
    logits = torch.randn(2, vocab)  # [batch, vocab]
    mask = token_mask([compiler.matcher(FLAG), None], vocab, torch.device("cpu"))
    assert mask is not None
    out = Sampler()(logits, rows([SamplingParams(temperature=0)] * 2), mask)
    best = mask.allowed[0].nonzero().flatten()
    assert out.token_ids[0] == best[logits[0, best].argmax()].item()
    assert out.token_ids[1] == logits[1].argmax().item()


def test_compiler_caches_each_schema_once_with_lru_bound(tokenizer):
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=2)
    schemas = [json.dumps({"type": "object", "properties": {f"k{i}": {"type": "integer"}}}) for i in range(3)]
    a, b = compiler.matcher(schemas[0]), compiler.matcher(schemas[0])
    assert len(compiler) == 1
    # Matchers from one cached grammar are independent.
    a.advance(tokenizer.encode('{"', add_special_tokens=False)[0])
    assert _allowed(compiler, a, len(tokenizer)) != _allowed(compiler, b, len(tokenizer))
    compiler.matcher(schemas[1])
    compiler.matcher(schemas[2])
    assert len(compiler) == 2
    assert schemas[0] not in compiler._templates and schemas[2] in compiler._templates


def test_compiler_refuses_bad_cache_size(tokenizer):
    with pytest.raises(ValueError, match="cache_size must be >= 1, got 0"):
        GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=0)
    one = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id], cache_size=1)
    one.matcher(FLAG)
    assert len(one) == 1


def test_compiler_refuses_a_slow_tokenizer_by_name():
    class SlowTokenizer:
        def __len__(self) -> int:
            return 100

    with pytest.raises(ValueError, match="needs a fast \\(tokenizers\\) tokenizer, not SlowTokenizer"):
        GrammarCompiler(SlowTokenizer(), 100, [0])  # type: ignore[arg-type]


def test_a_complete_grammar_allows_every_eos_token_and_nothing_else(tokenizer):
    """The compiler's EOS ids (a model may have several) are what a finished grammar lets through."""
    compiler = GrammarCompiler(tokenizer, len(tokenizer), [tokenizer.eos_token_id, 5])
    matcher = compiler.matcher(FLAG)
    for token in tokenizer.encode(FLAG_TEXTS[0], add_special_tokens=False):
        matcher.advance(token)
    assert matcher.done and matcher.error == ""
    assert _allowed(compiler, matcher, len(tokenizer)) == {tokenizer.eos_token_id, 5}


def test_a_refused_token_is_logged_and_leaves_the_matcher_in_error(compiler, tokenizer, caplog):
    matcher = compiler.matcher(FLAG)
    with caplog.at_level("WARNING", logger="loraplex.sampling.structured"):
        matcher.advance(tokenizer.encode('{"', add_special_tokens=False)[0])  # follows the grammar
        assert not caplog.records
        bad = tokenizer.encode("hello", add_special_tokens=False)[0]
        matcher.advance(bad)
    assert [r.getMessage() for r in caplog.records] == [f"grammar refused token {bad}: {matcher.error}"]
    # The error state ends the grammar: only EOS may follow, so the request ends rather than run unconstrained.
    assert matcher.error and matcher.done
    assert _allowed(compiler, matcher, len(tokenizer)) == {tokenizer.eos_token_id}
