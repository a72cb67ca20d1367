"""Speculative decoding (issue 18): drafts verified in the step change no output, roll back their KV, and
keep the sampled distribution; the n-gram drafter's lookups."""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest
import torch
from peft import LoraConfig
from transformers import LlamaConfig

from loraplex import LLM, SamplingParams
from loraplex.engine.sequence import Sequence
from loraplex.engine.speculative import SEPARATOR, NgramDrafter, OutputHistory
from tests.helpers import TINY, engine_last_logits, save_tiny
from tests.lora.peft_fixtures import make_adapter


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return str(save_tiny(LlamaConfig(**TINY), tmp_path_factory.mktemp("llama")))


@pytest.fixture(scope="module")
def tiny_adapters(tiny, tmp_path_factory):
    root = tmp_path_factory.mktemp("adapters")
    config = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"])
    return [str(make_adapter(tiny, root / f"a{i}", config, seed=i)) for i in range(2)]


class OracleDrafter:
    """Drafts from the outputs a run without speculation gave (by request id), each draft corrupted with
    probability `corrupt`: long accepted runs, rejections at every position, and requests with no drafts."""

    def __init__(self, expected: dict[str, list[int]], corrupt: float, num_tokens: int = 4, seed: int = 0) -> None:
        self.expected, self.corrupt, self.num_tokens = expected, corrupt, num_tokens
        self.rng = random.Random(seed)
        self.proposed = 0

    def propose(self, seq: Sequence, limit: int) -> list[int]:
        want = self.expected.get(seq.request_id, [])
        start = len(seq.output_token_ids)
        drafts = want[start:start + min(limit, self.rng.randrange(0, self.num_tokens + 1))]
        self.proposed += len(drafts)
        return [(t + 1) % TINY["vocab_size"] if self.rng.random() < self.corrupt else t for t in drafts]

    def finished(self, seq: Sequence) -> None:
        pass


def _use(llm: LLM, drafter: object) -> None:
    llm.engine.drafter = llm.engine.scheduler.drafter = drafter  # type: ignore[assignment]


def _requests(seed: int, adapters: list[str]) -> tuple[list[list[int]], list[SamplingParams], list[str | None]]:
    rng = random.Random(seed)
    prompts, params, ids = [], [], []
    for i in range(12):
        prompts.append([rng.randrange(1, 512) for _ in range(rng.randrange(3, 40))])
        sampled = i % 2 == 1
        params.append(SamplingParams(
            max_new_tokens=rng.randrange(1, 40), ignore_eos=True, seed=100 + i,
            temperature=0.8 if sampled else 0.0, top_p=0.9 if i % 4 == 1 else 1.0,
            repetition_penalty=1.3 if i % 3 == 0 else 1.0, frequency_penalty=0.5 if i % 5 == 0 else 0.0,
            logprobs=2 if i % 4 == 0 else None))
        ids.append([None, *adapters][i % (len(adapters) + 1)])
    return prompts, params, ids


@pytest.mark.parametrize("corrupt", [0.0, 0.3, 1.0])
def test_verified_drafts_give_the_outputs_plain_decoding_gives(tiny, tiny_adapters, corrupt):
    """Greedy and seeded sampled requests (penalties, top-p, logprobs), base and two adapters in one batch:
    token for token what decoding without speculation gives, whatever share of the drafts is wrong."""
    prompts, params, ids = _requests(1, tiny_adapters)
    options = dict(num_blocks=256, block_size=4, max_loras=2, max_lora_rank=8)
    plain = LLM(tiny, **options).generate(prompts, params, adapter_id=ids)
    llm = LLM(tiny, speculative_tokens=4, speculative_max_batch=64, **options)
    expected = {f"r{i}": out.token_ids for i, out in enumerate(plain)}
    drafter = OracleDrafter(expected, corrupt)
    _use(llm, drafter)
    engine, got = llm.engine, {}
    for i, (prompt, p, a) in enumerate(zip(prompts, params, ids, strict=True)):
        engine.add_request(f"r{i}", prompt, p, adapter_id=a)
    engine.wait_for_adapter_loads()
    while engine.has_unfinished():
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out
    for i, want in enumerate(plain):
        out = got[f"r{i}"]
        assert out.token_ids == want.token_ids, f"request {i}"
        if want.logprobs is not None:
            assert out.logprobs is not None
            for a, b in zip(out.logprobs, want.logprobs, strict=True):
                assert a.token_id == b.token_id and a.logprob == pytest.approx(b.logprob, abs=1e-4)
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
    assert drafter.proposed > 50 and engine.draft_tokens == drafter.proposed
    if corrupt == 0.0:
        assert engine.accepted_tokens == engine.draft_tokens  # right drafts are all taken
    elif corrupt == 1.0:
        assert engine.accepted_tokens == 0
    else:
        assert 0 < engine.accepted_tokens < engine.draft_tokens
    assert sum(o.accepted_draft_tokens for o in got.values()) == engine.accepted_tokens
    assert engine.pool.num_free == engine.pool.num_blocks  # rejected drafts' blocks came back


def test_rejected_drafts_leave_no_stale_kv_in_the_prefix_cache(tiny):
    """Drafts half wrong, with block size 4: rejected positions hold wrong keys and values until rewritten.
    A second request whose prompt extends the first one's output reuses its cached blocks: it must get
    what a fresh engine gives."""
    rng = random.Random(5)
    prompt = [rng.randrange(1, 512) for _ in range(10)]
    params = SamplingParams(max_new_tokens=30, temperature=0.0, ignore_eos=True)
    fresh = LLM(tiny, num_blocks=128, block_size=4, enable_prefix_caching=False)
    first = fresh.generate([prompt], params)[0].token_ids
    follow = prompt + first + [7, 8]
    expected = fresh.generate([follow], params)[0].token_ids

    llm = LLM(tiny, num_blocks=128, block_size=4, speculative_tokens=4, speculative_max_batch=64)
    drafter = OracleDrafter({"a": first}, corrupt=0.5, seed=3)
    _use(llm, drafter)
    engine = llm.engine
    engine.add_request("a", prompt, params)
    while engine.has_unfinished():
        engine.step()
    assert engine.accepted_tokens > 0 and engine.accepted_tokens < engine.draft_tokens
    hits = engine.scheduler.prefix_cache_hits
    assert llm.generate([follow], params)[0].token_ids == expected
    assert engine.scheduler.prefix_cache_hits - hits >= 32  # the first request's blocks were reused
    assert engine.pool.num_free == engine.pool.num_blocks


def test_sampled_tokens_keep_the_model_distribution(tmp_path):
    """On an 8-token vocabulary, 4,000 sampled requests of 3 tokens, the second verified against a random
    draft: the triples (x1, x2, x3) follow the model's p(x1) p(x2 | x1) p(x3 | x1 x2) (chi-square), and
    drafts are accepted at the rate rejection sampling gives a one-hot draft d, p(d)."""
    config = LlamaConfig(**{**TINY, "vocab_size": 8, "initializer_range": 0.5})
    path = str(save_tiny(config, tmp_path / "small"))
    prompt = [1, 2, 3]
    llm = LLM(path, num_blocks=8192, block_size=4, speculative_tokens=1, speculative_max_batch=4096,
              max_num_seqs=1024, enable_prefix_caching=False)

    def dist(tokens: list[int]) -> list[float]:
        return torch.softmax(engine_last_logits(llm, prompt + tokens).double(), -1).tolist()

    p1 = dist([])
    p2 = {a: dist([a]) for a in range(8)}
    p3 = {(a, b): dist([a, b]) for a in range(8) for b in range(8)}
    rng = random.Random(11)
    accept_chance: list[float] = []

    class Guess:
        def propose(self, seq: Sequence, limit: int) -> list[int]:
            d = rng.randrange(8)
            accept_chance.append(p2[seq.output_token_ids[0]][d])  # the draft is token 2
            return [d][:limit]

        def finished(self, seq: Sequence) -> None:
            pass

    _use(llm, Guess())
    n = 4000
    outs = llm.generate([prompt] * n, [SamplingParams(max_new_tokens=3, temperature=1.0, seed=s, ignore_eos=True)
                                       for s in range(n)])
    seen = Counter(tuple(o.token_ids) for o in outs)
    expected = {(a, b, c): n * p1[a] * p2[a][b] * p3[a, b][c] for a in range(8) for b in range(8) for c in range(8)}
    cells = [k for k, e in expected.items() if e >= 5]
    rest_seen = n - sum(seen[k] for k in cells)
    rest_expected = n - sum(expected[k] for k in cells)
    chi2 = sum((seen[k] - expected[k]) ** 2 / expected[k] for k in cells)
    chi2 += (rest_seen - rest_expected) ** 2 / rest_expected if rest_expected >= 5 else 0.0
    dof = len(cells)  # the cells and the pooled rest, less one
    assert dof > 20
    assert chi2 < dof + 4 * math.sqrt(2 * dof), (chi2, dof)  # about 4 standard deviations of chi-square(dof)
    engine = llm.engine
    assert engine.verify_steps == n == len(accept_chance)
    rate = sum(accept_chance) / n
    assert engine.accepted_tokens / n == pytest.approx(rate, abs=4 * math.sqrt(rate * (1 - rate) / n))


# ------------------------------------------------------------------------------------------ the drafter

def _seq(prompt: list[int], output: list[int] = (), adapter: object = None) -> Sequence:  # type: ignore[assignment]
    seq = Sequence("s", list(prompt), SamplingParams(), 0)
    seq.output_token_ids = list(output)
    seq.adapter = adapter  # type: ignore[assignment]
    return seq


def test_ngram_drafts_follow_the_latest_longest_match():
    drafter = NgramDrafter(3, ngram_max=3, ngram_min=1)
    # "5 6 7" occurs twice before the end; the latest occurrence is followed by 9 1.
    assert drafter.propose(_seq([5, 6, 7, 8, 2, 5, 6, 7, 9, 1, 4, 6, 7]), 5) == [9, 1, 4]
    # A 3-gram match is preferred over a later 1-gram one: "1 2 3" → 4; the last "3" alone → 0.
    assert drafter.propose(_seq([1, 2, 3, 4, 3, 0, 1, 2, 3]), 5) == [4, 3, 0]
    assert drafter.propose(_seq([1, 2, 3, 4, 3, 0, 1, 2, 3]), 2) == [4, 3]
    assert drafter.propose(_seq([1, 2, 3, 4]), 5) == []  # nothing repeats
    seq = _seq([1, 2, 3])
    seq.grammar = object()  # type: ignore[assignment]
    assert drafter.propose(seq, 5) == []  # structured output does not speculate


def test_ngram_index_grows_with_the_output():
    drafter = NgramDrafter(4, ngram_max=2, ngram_min=2)
    seq = _seq([10, 11, 12, 13])
    assert drafter.propose(seq, 4) == []
    for token, want in [(20, []), (10, []), (11, [12, 13, 20, 10]), (12, [13, 20, 10, 11])]:
        seq.output_token_ids.append(token)
        assert drafter.propose(seq, 4) == want
    assert seq.ngrams is not None and seq.ngrams.indexed == seq.num_tokens


def test_adapter_history_drafts_what_earlier_requests_wrote():
    drafter = NgramDrafter(4, ngram_max=2, ngram_min=1, history_tokens=64)
    done = _seq([1, 2, 90, 91], [30, 31, 32, 33, 2], adapter="A")
    drafter.finished(done)
    # A new request of adapter A ending with the same prompt tail starts as the last answer did.
    assert drafter.propose(_seq([7, 90, 91], adapter="A"), 4) == [30, 31, 32, 33]
    assert drafter.propose(_seq([7, 90, 91, 30, 31], adapter="A"), 8) == [32, 33, 2]  # not past the separator
    assert drafter.propose(_seq([7, 90, 91], adapter="B"), 4) == []  # another adapter's outputs are not used
    assert drafter.propose(_seq([7, 90, 91]), 4) == []


def test_output_history_stays_within_its_capacity():
    history = OutputHistory(1, 2, capacity=40)
    for i in range(50):
        history.add([1], [100 + i, 200 + i, 300 + i])
        assert len(history.tokens) <= 40
        assert history.tokens[-1] == SEPARATOR and (history.tokens[0] == 1)
    assert history.drafts((100 + 49,), 4) == [249, 349]
    assert history.drafts((100,), 4) == []  # long gone
    assert all(v < len(history.tokens) for table in history.index.maps.values() for v in table.values())


def test_config_refuses_bad_speculation_settings():
    from loraplex.config import SchedulerConfig

    with pytest.raises(ValueError, match="speculative_method must be one of ngram"):
        SchedulerConfig(speculative_method="medusa2")
    with pytest.raises(ValueError, match="speculative_tokens must be >= 0"):
        SchedulerConfig(speculative_tokens=-1)
    with pytest.raises(ValueError, match="speculative_ngram_min <= speculative_ngram_max"):
        SchedulerConfig(speculative_ngram_min=3, speculative_ngram_max=2)


# ------------------------------------------------------------------------- the demo model, n-gram drafts

def _chat(llm: LLM, message: str) -> list[int]:
    tokenizer = llm.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[no-any-return]


def _stream(llm: LLM, prompt: list[int], params: SamplingParams, adapter: str) -> list:
    engine, outs = llm.engine, []
    engine.add_request("s", prompt, params, adapter_id=adapter)
    engine.wait_for_adapter_loads()
    while engine.has_unfinished():
        outs += engine.step()
    return outs


@pytest.mark.parametrize("async_output", ["off", "on"])
@pytest.mark.parametrize("stop", [(), ('", "amount',)], ids=["eos", "stop-string"])
def test_extraction_adapter_streams_what_it_streams_without_drafts(demo_model_path, stop, async_output):
    """The invoice-json adapter, n-gram drafts from the prompt and the adapter's earlier answers: the same
    stream of outputs, one per token (texts growing as without speculation), the same final text and
    finish reason, also when a stop string ends it inside a run of accepted drafts, and when outputs are
    made while the next step runs (`async_output`)."""
    from loraplex.examples import example_adapters
    from tests.examples.test_example_adapters import INVOICE_HELD_OUT

    adapter = str(example_adapters()["invoice-json"])
    options = dict(max_loras=1, max_lora_rank=8, async_output=async_output)
    plain = LLM(str(demo_model_path), **options)
    spec = LLM(str(demo_model_path), speculative_tokens=5, **options)
    params = SamplingParams(max_new_tokens=40, temperature=0.0, stop=stop)
    for sentence, _, _ in INVOICE_HELD_OUT * 2:  # the second round drafts from the first round's answers too
        prompt = _chat(plain, sentence)
        want, got = _stream(plain, prompt, params, adapter), _stream(spec, prompt, params, adapter)
        assert [(o.token_ids, o.text, o.finished, o.finish_reason) for o in got] == [
            (o.token_ids, o.text, o.finished, o.finish_reason) for o in want]
    engine = spec.engine
    assert engine.accepted_tokens > engine.verify_steps  # more than one token saved per verifying step
    assert engine.pool.num_free == engine.pool.num_blocks


# ------------------------------------------------------------------------------------------ Medusa heads

def _write_heads(folder, heads: int, layers: int, vocab: int | None, seed: int = 0, std: float = 1.0,
                 config: dict | None = None) -> None:
    import json

    from safetensors.torch import save_file

    from loraplex.lora.medusa import medusa_tensors

    folder.mkdir(parents=True, exist_ok=True)
    save_file(medusa_tensors(heads, layers, TINY["hidden_size"], vocab, torch.Generator().manual_seed(seed), std),
              str(folder / "medusa_lm_head.safetensors"))
    (folder / "config.json").write_text(json.dumps(config or {"medusa_num_heads": heads, "medusa_num_layers": layers}))


@pytest.fixture(scope="module")
def medusa_adapters(tiny, tiny_adapters, tmp_path_factory):
    """A LoRA with version-2 heads beside it, version-1 heads alone, and a base head set."""
    import shutil

    root = tmp_path_factory.mktemp("medusa")
    lora_heads = root / "lora-heads"
    shutil.copytree(tiny_adapters[0], lora_heads)
    _write_heads(lora_heads, heads=3, layers=1, vocab=None, seed=1)
    _write_heads(root / "heads-v1", heads=2, layers=2, vocab=TINY["vocab_size"], seed=2)
    _write_heads(root / "base-heads", heads=4, layers=1, vocab=None, seed=3, std=0.5)
    return {name: str(root / name) for name in ("lora-heads", "heads-v1", "base-heads")}


@pytest.mark.parametrize("base_heads", [False, True], ids=["adapter-heads", "with-base-heads"])
def test_medusa_drafts_give_the_outputs_plain_decoding_gives(tiny, tiny_adapters, medusa_adapters, base_heads):
    prompts, params, _ = _requests(2, [])
    ids = [[None, medusa_adapters["lora-heads"], medusa_adapters["heads-v1"], tiny_adapters[1]][i % 4]
           for i in range(len(prompts))]
    options = dict(num_blocks=256, block_size=4, max_loras=3, max_lora_rank=8)
    plain = LLM(tiny, **options).generate(prompts, params, adapter_id=ids)
    llm = LLM(tiny, speculative_tokens=3, speculative_method="medusa", speculative_max_batch=64,
              speculative_medusa_heads=medusa_adapters["base-heads"] if base_heads else None,
              speculative_medusa_lookup=False, **options)
    got = llm.generate(prompts, params, adapter_id=ids)
    for i, (a, b) in enumerate(zip(plain, got, strict=True)):
        assert a.token_ids == b.token_ids, f"request {i}"
    engine = llm.engine
    assert engine.draft_tokens > 30 and engine.pool.num_free == engine.pool.num_blocks
    by_request = {i: o.draft_tokens for i, o in enumerate(got)}
    for i, adapter in enumerate(ids):
        if adapter in (None, tiny_adapters[1]) and not base_heads:
            assert by_request[i] == 0  # no heads of its own and no base set: no speculation
    assert any(by_request[i] for i, a in enumerate(ids) if a == medusa_adapters["heads-v1"])


def test_medusa_drafts_are_each_heads_argmax(tiny, medusa_adapters):
    """The drafter's tokens against the heads' formula written out here (Medusa, Cai et al. 2024; LoRAX's
    adapters/medusa.py): version 1, head i = out_i(ResBlock^L(h)); version 2, the LM head of h + SiLU(W_i h + b_i);
    ResBlock(x) = x + SiLU(W x + b)."""
    from safetensors.torch import load_file

    from loraplex.engine.speculative import MedusaDrafter
    from loraplex.lora.medusa import load_medusa

    llm = LLM(tiny, num_blocks=64, block_size=4)
    model = llm.engine.runner.model
    hidden = torch.randn(5, TINY["hidden_size"], generator=torch.Generator().manual_seed(0))
    silu = torch.nn.functional.silu
    for name, version in (("heads-v1", 1), ("lora-heads", 2)):
        path = medusa_adapters[name]
        t = load_file(f"{path}/medusa_lm_head.safetensors")
        heads = load_medusa(path, model.config)
        want = []
        for i in range(heads.num_heads):
            x = hidden
            for j in range(len(heads.blocks[i])):
                x = x + silu(x @ t[f"{i}.{j}.linear.weight"].T + t[f"{i}.{j}.linear.bias"])
            logits = x @ t[f"{i}.{len(heads.blocks[i])}.weight"].T if version == 1 else model.draft_logits(x)
            want.append(logits.argmax(-1))
        drafter = MedusaDrafter(8, model.draft_logits, lambda _, h=heads: h, None, torch.device("cpu"), torch.float32)
        seqs = [_seq([1, 2], adapter="x") for _ in range(3)]
        drafter.draft({seqs[0]: 4, seqs[1]: 0, seqs[2]: 2}, hidden)
        for seq, row in zip(seqs, (4, 0, 2), strict=True):
            assert seq.medusa_drafts == [int(w[row]) for w in want]
            assert drafter.propose(seq, 1) == seq.medusa_drafts[:1]


@pytest.mark.parametrize("linear_backend", ["onednn", "aten"])
def test_draft_logits_are_the_base_head_in_bfloat16_where_the_cpu_has_it(tiny, linear_backend, monkeypatch):
    """Version-2 heads read the LM head through `draft_logits`: a bfloat16 copy where oneDNN multiplies
    bfloat16 natively (logits within bfloat16's rounding of the float32 head's), else the float32 head."""
    from loraplex.model import gemm

    model = LLM(tiny, num_blocks=64, block_size=4, linear_backend=linear_backend).engine.runner.model
    hidden = torch.randn(6, TINY["hidden_size"], generator=torch.Generator().manual_seed(1))
    want = model.base_logits(hidden)
    got = model.draft_logits(hidden)
    assert got.dtype == torch.float32 and got.shape == want.shape
    if gemm.bf16_native(torch.device("cpu")):
        assert isinstance(model._draft_head, torch.Tensor) and model._draft_head.dtype == torch.bfloat16
        assert not torch.equal(got, want)  # the bfloat16 copy ran
        torch.testing.assert_close(got, want, rtol=0.02, atol=0.02 * float(want.abs().max()))
    del model.__dict__["_draft_head"]  # made anew on the next use
    monkeypatch.setattr(gemm, "bf16_native", lambda device: False)
    assert torch.equal(model.draft_logits(hidden), want)
    assert model._draft_head is None


@pytest.mark.parametrize("case, message", [
    ("count", "missing 2.0.linear.bias, 2.0.linear.weight"),
    ("extra", "unexpected 3.0.linear.bias"),
    ("shape", "0.0.linear.weight has shape [64, 32], expected [64, 64]"),
    ("no-config", "no config.json"),
    ("heads-field", "medusa_num_heads must be an integer from 1 to 16, got 'three'"),
    ("layers-v2", "medusa_num_layers 1, not 2"),
    ("nan", "0.0.linear.bias has non-finite values"),
    ("not-safetensors", "cannot be read as safetensors"),
    ("oversized", "more than 3 heads of 1 layers take"),
    ("no-heads-file", "medusa_lm_head.safetensors cannot be read: No such file or directory$"),
])
def test_bad_medusa_files_are_refused_with_what_is_wrong(tiny, tmp_path, case, message):
    import json

    from safetensors.torch import load_file, save_file

    from loraplex.lora.adapter import AdapterInvalid
    from loraplex.lora.medusa import load_medusa

    folder = tmp_path / case
    _write_heads(folder, heads=3, layers=1, vocab=None)
    heads_file, config_file = folder / "medusa_lm_head.safetensors", folder / "config.json"
    tensors = load_file(str(heads_file))
    if case == "count":
        tensors = {k: v for k, v in tensors.items() if not k.startswith("2.")}
    elif case == "extra":
        tensors["3.0.linear.bias"] = tensors["0.0.linear.bias"].clone()
    elif case == "shape":
        tensors["0.0.linear.weight"] = tensors["0.0.linear.weight"][:, :32].contiguous()
    elif case == "nan":
        tensors["0.0.linear.bias"][3] = float("nan")
    save_file(tensors, str(heads_file))
    if case == "no-config":
        config_file.unlink()
    elif case == "heads-field":
        config_file.write_text(json.dumps({"medusa_num_heads": "three", "medusa_num_layers": 1}))
    elif case == "layers-v2":
        config_file.write_text(json.dumps({"medusa_num_heads": 3, "medusa_num_layers": 2}))
    elif case == "not-safetensors":
        heads_file.write_bytes(b"\x00" * 64)
    elif case == "oversized":  # refused from its size, before anything is read
        heads_file.write_bytes(b"\x00" * (4 << 20))
    elif case == "no-heads-file":  # e.g. a base head set (--speculative-medusa-heads) without its weights
        heads_file.unlink()
    config = LLM(tiny, num_blocks=16, block_size=4).engine.runner.model.config
    with pytest.raises(AdapterInvalid, match=message.replace("[", r"\[").replace("]", r"\]")):
        load_medusa(folder, config)


def test_a_request_may_decline_to_speculate(tiny):
    llm = LLM(tiny, num_blocks=128, block_size=4, speculative_tokens=4, speculative_max_batch=64)
    prompt = [5, 6, 7, 8] * 6  # repeats: n-gram drafts for every step
    on, off = llm.generate([prompt, prompt], [SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True),
                                              SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True,
                                                             speculate=False)])
    assert on.token_ids == off.token_ids
    assert on.draft_tokens > 0 and off.draft_tokens == 0 and off.verify_steps == 0


def test_drafts_under_kv_pressure_preemption_and_slot_parking(tiny, tiny_adapters):
    """A KV pool that holds about two long requests, two adapters over one device slot, prefix caching on:
    drafts take blocks (never preempting for them), requests are preempted and parked mid-draft, and
    every output is still what plain decoding gives (two requests aborted on the way), with every block back."""
    prompts, params, ids = _requests(4, tiny_adapters)
    options = dict(num_blocks=40, block_size=4, max_loras=1, max_lora_rank=8, adapter_cycle_steps=4)
    plain = LLM(tiny, **options).generate(prompts, params, adapter_id=ids)
    llm = LLM(tiny, speculative_tokens=4, speculative_max_batch=64, **options)
    drafter = OracleDrafter({f"r{i}": out.token_ids for i, out in enumerate(plain)}, corrupt=0.25, seed=9)
    _use(llm, drafter)
    engine, got = llm.engine, {}
    for i, (prompt, p, a) in enumerate(zip(prompts, params, ids, strict=True)):
        engine.add_request(f"r{i}", prompt, p, adapter_id=a)
    engine.wait_for_adapter_loads()
    steps = 0
    while engine.has_unfinished():
        steps += 1
        if steps == 6:  # two requests aborted mid-run (one may be waiting, one drafting)
            engine.abort("r3")
            engine.abort("r8")
        for out in engine.step():
            if out.finished:
                got[out.request_id] = out.token_ids
    kept = [i for i in range(len(prompts)) if i not in (3, 8)]
    assert [got[f"r{i}"] for i in kept] == [plain[i].token_ids for i in kept]
    assert engine.scheduler.num_preemptions > 0 and engine.scheduler.num_parks > 0
    assert 0 < engine.accepted_tokens < engine.draft_tokens
    assert engine.pool.num_free == engine.pool.num_blocks


def test_a_failing_medusa_drafter_costs_drafts_not_requests(tiny, medusa_adapters, monkeypatch, caplog):
    prompts, params, _ = _requests(6, [])
    ids = [medusa_adapters["heads-v1"]] * len(prompts)
    options = dict(num_blocks=256, block_size=4, max_loras=1, max_lora_rank=8)
    plain = LLM(tiny, **options).generate(prompts, params, adapter_id=ids)
    llm = LLM(tiny, speculative_tokens=2, speculative_method="medusa", speculative_medusa_lookup=False,
              speculative_max_batch=64, **options)

    def broken(*_: object) -> None:
        raise RuntimeError("out of memory")

    monkeypatch.setattr(llm.engine._medusa, "draft", broken)
    with caplog.at_level("WARNING", logger="loraplex.engine.engine"):
        got = llm.generate(prompts, params, adapter_id=ids)
    assert [o.token_ids for o in got] == [o.token_ids for o in plain] and all(o.error is None for o in got)
    assert llm.engine.draft_tokens == 0
    # Failing at every step, it is logged once (with the traceback), not once per step.
    assert llm.engine._draft_failures > 1
    warned = [r for r in caplog.records if "Medusa drafting failed" in r.getMessage()]
    assert len(warned) == 1 and warned[0].exc_info is not None
