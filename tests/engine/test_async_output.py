"""Async output (`--async-output`): a step's outputs are made while the next step's forward runs.

Every request must get exactly the outputs it gets without the overlap, one step later: the same token
ids, text, finish reasons and logprobs, output for output, whatever joins, finishes (EOS, length, a stop
string found only after the request was scheduled again), streams or not, gets preempted, parked,
aborted or fails. The workloads run on the tiny model of `loraplex.bench.overhead`, which has a byte-level
BPE tokenizer of its own, so stop strings and text are real.
"""

from __future__ import annotations

import random
import threading
from collections import defaultdict
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from loraplex import LLM, SamplingParams
from loraplex.bench.overhead import VOCAB
from loraplex.engine.engine import Engine
from loraplex.engine.request import FinishReason, RequestOutput
from tests.engine.test_request_failures import BrokenDetokenizer, _assert_idle

pytestmark = pytest.mark.usefixtures("one_torch_thread")



Snapshot = tuple[Any, ...]


def _snapshot(o: RequestOutput) -> Snapshot:
    return (o.token_ids, o.text, o.finished, o.finish_reason, o.logprobs,
            None if o.error is None else (type(o.error).__name__, str(o.error)))


def _assert_same(got: list[Snapshot], expected: list[Snapshot], request_id: str) -> None:
    """Equal outputs; logprobs within float rounding (a batch of other rows sums in another order)."""
    assert len(got) == len(expected), request_id
    for g, e in zip(got, expected, strict=True):
        assert g[:4] == e[:4] and g[5] == e[5], request_id
        assert (g[4] is None) == (e[4] is None), request_id
        for a, b in zip(g[4] or [], e[4] or [], strict=True):
            assert a.token_id == b.token_id and [t for t, _ in a.top] == [t for t, _ in b.top], request_id
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4), request_id
            assert [v for _, v in a.top] == pytest.approx([v for _, v in b.top], abs=1e-4), request_id


Request = dict[str, Any]


def _workload(seed: int, adapters: list[Path], texts: dict[str, str] | None,
              tokens: dict[str, list[int]] | None = None, reads: float = 0.5) -> list[Request]:
    """Requests with their arrival step; with `texts` (a run's outputs without stop strings), half of
    them stop at a piece of their own text, so the stop strings are certain to be met; with `tokens` (the
    same run's token ids), a fifth of them also stop at one of their own tokens (`stop_token_ids`). A
    `reads` share of the requests want logprobs, penalties, the watermark, a JSON schema or prompt logprobs
    (whose steps wait for the last step's tokens under async scheduling)."""
    rng, stop_rng = random.Random(seed), random.Random(~seed)  # the stops do not change the other draws
    requests = []
    for i in range(12):
        request_id = f"r{i}"
        sampled = rng.random() < 0.5
        reading = rng.random() < reads
        params = SamplingParams(
            max_new_tokens=rng.randrange(3, 20), ignore_eos=rng.random() < 0.7, seed=rng.randrange(1 << 30),
            temperature=0.8 if sampled else 0.0, top_k=20 if sampled else 0,
            logprobs=2 if reading and rng.random() < 0.7 else None,
            repetition_penalty=1.3 if reading and rng.random() < 0.5 else 1.0,
            frequency_penalty=0.4 if reading and rng.random() < 0.3 else 0.0,
            watermark=reading and sampled and rng.random() < 0.2,
            prompt_logprobs=reading and rng.random() < 0.15,
            json_schema='{"type": "object"}' if reading and rng.random() < 0.2 else None)
        text = (texts or {}).get(request_id, "")
        if text and stop_rng.random() < 0.6:
            start = stop_rng.randrange(len(text))
            params = replace(params, stop=[text[start:start + stop_rng.randrange(1, 4)]])
        own = (tokens or {}).get(request_id, [])
        if own and stop_rng.random() < 0.2:
            params = replace(params, stop_token_ids=[stop_rng.choice(own)])
        requests.append(dict(
            request_id=request_id, at=rng.randrange(0, 6), every_token=rng.random() < 0.6,
            prompt=[rng.randrange(1, VOCAB) for _ in range(rng.randrange(2, 14))], params=params,
            adapter=rng.choice([None, *map(str, adapters)]),
            abort_at=rng.randrange(4, 30) if rng.random() < 0.15 else None))
    return requests


def _run(engine: Engine, requests: list[Request], async_output: bool,
         async_scheduling: bool = False) -> dict[str, list[Snapshot]]:
    """Every output of every request, in order, as the steps return them."""
    engine.async_output = async_output
    engine.async_scheduling = async_scheduling
    seen: dict[str, list[Snapshot]] = defaultdict(list)
    step = 0
    while step < 12 or engine.has_unfinished():
        for r in requests:
            if r["at"] == step:
                engine.add_request(r["request_id"], r["prompt"], r["params"], adapter_id=r["adapter"],
                                   every_token=r["every_token"])
            if r["abort_at"] == step:
                engine.abort(r["request_id"])
        engine.wait_for_adapter_loads(timeout=60)  # loads finish at the same step in both runs
        for o in engine.step():
            seen[o.request_id].append(_snapshot(o))
        step += 1
        assert step < 500, "no progress"
    _assert_idle(engine)
    return seen


def test_outputs_equal_those_without_async_output(overhead_llm: LLM, overhead_assets: tuple[Path, list[Path]]) -> None:
    engine = overhead_llm.engine
    _, adapters = overhead_assets
    preempted = parked = stopped = 0
    for seed in range(8):
        plain = _run(engine, _workload(seed, adapters, None), async_output=False)
        texts = {rid: outs[-1][1] for rid, outs in plain.items()}
        requests = _workload(seed, adapters, texts)
        expected = _run(engine, requests, async_output=False)
        before = engine.scheduler.num_preemptions, engine.scheduler.num_parks
        got = _run(engine, requests, async_output=True)
        preempted += engine.scheduler.num_preemptions - before[0]
        parked += engine.scheduler.num_parks - before[1]
        for r in requests:
            rid = f"seed {seed} {r['request_id']}"
            if r["abort_at"] is not None:
                # An abort lands a step earlier in the request's life with async output (its last token's
                # output was still to be made): the outputs it got, maybe none, are the plain run's first.
                seen = got.get(r["request_id"], [])
                _assert_same(seen, expected[r["request_id"]][:len(seen)], rid)
            else:
                _assert_same(got[r["request_id"]], expected[r["request_id"]], rid)
                stopped += expected[r["request_id"]][-1][3] is FinishReason.STOP_SEQUENCE
    # The workloads reach the paths that matter.
    assert preempted and parked and stopped >= 8, (preempted, parked, stopped)


def _run_alone(engine: Engine, prompt: list[int], params: SamplingParams) -> tuple[list[RequestOutput], int]:
    """One request's outputs, run alone to its end, and the rows its steps sampled."""
    engine.add_request("alone", prompt, params)
    outputs: list[RequestOutput] = []
    sampling_steps = 0
    while engine.has_unfinished():
        outputs += engine.step()
        sampling_steps += engine.last_step_rows
    return outputs, sampling_steps


def test_a_stop_string_found_a_step_late_drops_the_extra_token(overhead_llm: LLM) -> None:
    engine = overhead_llm.engine
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    text = overhead_llm.generate([[5, 6, 7]], params)[0].text
    stop = text[len(text) // 2:len(text) // 2 + 2]
    engine.async_output = True
    try:
        outputs, sampling_steps = _run_alone(engine, [5, 6, 7], replace(params, stop=[stop]))
        final = outputs[-1]
        assert final.finished and final.finish_reason is FinishReason.STOP_SEQUENCE and stop not in final.text
        assert text.startswith(final.text + stop)
        # It was scheduled once more before its stop string was seen, and that token was dropped.
        assert sampling_steps == len(final.token_ids) + 1
        engine.async_output = False
        assert overhead_llm.generate([[5, 6, 7]], replace(params, stop=[stop]))[0].token_ids == final.token_ids
        _assert_idle(engine)
    finally:
        engine.async_output = False


def test_outputs_are_made_beside_the_forward_on_a_helper_thread(overhead_llm: LLM) -> None:
    engine = overhead_llm.engine
    threads: set[str] = set()
    emit = engine._emit

    def recording(pending: list[Any]) -> list[RequestOutput]:
        if pending:
            threads.add(threading.current_thread().name)
        return emit(pending)

    engine._emit = recording  # type: ignore[method-assign]
    engine.async_output = True
    engine.async_scheduling = False  # which makes the outputs as it reads the tokens, beside the next step
    try:
        params = SamplingParams(max_new_tokens=5, temperature=0.0, ignore_eos=True)
        outs = overhead_llm.generate([[1, 2, 3], [4, 5]], params)
    finally:
        engine.async_output = False
        del engine._emit
    assert all(len(o.token_ids) == 5 for o in outs)
    # Every step with a forward made the last step's outputs on the helper; the last outputs came from
    # a step with nothing to run, on the caller's thread.
    assert any(name.startswith("loraplex-outputs") for name in threads)
    assert threading.current_thread().name in threads


def test_a_broken_detokenizer_fails_its_request_alone_while_others_run(overhead_llm: LLM) -> None:
    engine = overhead_llm.engine
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = overhead_llm.generate([[9, 8, 7]], params)[0].token_ids
    engine.async_output = True
    try:
        engine.add_request("good", [9, 8, 7], params)
        engine.add_request("bad", [1, 2, 3], params)
        finals: dict[str, RequestOutput] = {}
        broke = False
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    finals[o.request_id] = o
            if not broke and "bad" in engine._seqs and engine._seqs["bad"].output_token_ids:
                engine._seqs["bad"].detokenizer = BrokenDetokenizer()  # type: ignore[assignment]
                broke = True
    finally:
        engine.async_output = False
    assert finals["bad"].error is not None and finals["good"].error is None
    assert finals["good"].token_ids == expected
    _assert_idle(engine)

