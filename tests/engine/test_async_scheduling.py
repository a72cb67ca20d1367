"""Async scheduling (`--async-scheduling`): a step is queued before the last step's tokens are read; its
inputs take those tokens on the device, and the host reads them (and makes their outputs) while it runs.

Every request must get exactly the outputs it gets without it, one step later, whatever joins, finishes
(EOS or a stop token found only after the request was queued again, length, a stop string), streams or
not, gets preempted, parked, aborted or fails, wants logprobs, penalties, the watermark or a JSON schema, or
makes its steps wait (prompt logprobs). Workloads and helpers are `test_async_output`'s (the tiny model of `loraplex.bench.overhead`).
"""

from __future__ import annotations

import os
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
import torch

from loraplex import LLM, SamplingParams
from loraplex.config import SchedulerConfig
from loraplex.engine.engine import EngineStepError
from loraplex.engine.request import FinishReason, RequestOutput
from loraplex.engine.sequence import UNREAD
from loraplex.model.runner import Launched
from tests.engine.test_async_output import _assert_same, _run, _run_alone, _workload
from tests.engine.test_request_failures import _assert_idle

pytestmark = pytest.mark.usefixtures("one_torch_thread")



class _Spy:
    """Counts the steps `ModelRunner.launch` queued, and checks that no UNREAD placeholder reaches a model and
    no request holds more than one."""

    def __init__(self, overhead_llm: LLM) -> None:
        self.runner = overhead_llm.engine.runner
        self.launched = 0
        self.fed = 0
        self.requests: set[str] = set()
        """The requests of every queued step."""

    def __enter__(self) -> _Spy:
        launch, forward = self.runner.launch, self.runner.forward

        def counting(sched: Any, fed: Launched | None, *args: Any) -> Launched:
            self.launched += 1
            self.fed += fed is not None and any(c.seq.unread for c in sched.chunks)
            self.requests.update(c.seq.request_id for c in sched.chunks)
            assert all(c.seq.unread <= 1 for c in sched.chunks), "a request holds two unread tokens"
            return launch(sched, fed, *args)

        def checked(inputs: Any) -> Any:
            assert not bool((inputs.input_ids == UNREAD).any()), "a placeholder reached the model"
            return forward(inputs)

        self.runner.launch = counting  # type: ignore[method-assign]
        self.runner.forward = checked  # type: ignore[method-assign]
        return self

    def __exit__(self, *exc: object) -> None:
        del self.runner.launch, self.runner.forward


@pytest.mark.parametrize("async_output", [False, True])
def test_outputs_equal_those_without_async_scheduling(overhead_llm: LLM, overhead_assets: tuple[Path, list[Path]],
                                                      async_output: bool) -> None:
    engine = overhead_llm.engine
    _, adapters = overhead_assets
    preempted = parked = stopped = eos = 0
    with _Spy(overhead_llm) as spy:
        for seed in range(8):
            reads = 0.5 if seed % 2 else 0.1  # mostly overlapping steps, or mixed with waiting ones
            plain = _run(engine, _workload(seed, adapters, None, reads=reads), async_output=False)
            texts = {rid: outs[-1][1] for rid, outs in plain.items()}
            tokens = {rid: outs[-1][0] for rid, outs in plain.items()}
            requests = _workload(seed, adapters, texts, tokens, reads=reads)
            expected = _run(engine, requests, async_output=False)
            before = engine.scheduler.num_preemptions, engine.scheduler.num_parks
            got = _run(engine, requests, async_output=async_output, async_scheduling=True)
            preempted += engine.scheduler.num_preemptions - before[0]
            parked += engine.scheduler.num_parks - before[1]
            for r in requests:
                rid = r["request_id"]
                where = f"seed {seed} {rid}"
                if r["abort_at"] is not None:
                    # An abort lands earlier in the request's life (its last token was not read yet, and a
                    # request that ended frees its seat a step later), maybe before its first output.
                    _assert_same(got.get(rid, []), expected[rid][:len(got.get(rid, []))], where)
                else:
                    _assert_same(got[rid], expected[rid], where)
                    stopped += expected[rid][-1][3] is FinishReason.STOP_SEQUENCE
                    eos += expected[rid][-1][3] is FinishReason.EOS_TOKEN
    engine.async_scheduling = False
    # The workloads reach the paths that matter: queued steps fed by the last one's tokens, and requests
    # preempted, parked, and ended by a stop string or a stop token.
    assert spy.fed >= 80 and preempted and parked and stopped >= 8 and eos >= 4, (
        spy.launched, spy.fed, preempted, parked, stopped, eos)


def test_a_stop_token_read_a_step_late_drops_the_extra_token(overhead_llm: LLM) -> None:
    engine = overhead_llm.engine
    params = SamplingParams(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    tokens = overhead_llm.generate([[5, 6, 7]], params)[0].token_ids
    stop = tokens[len(tokens) // 2]
    expected = overhead_llm.generate([[5, 6, 7]], replace(params, stop_token_ids=[stop]))[0]
    assert expected.finish_reason is FinishReason.EOS_TOKEN
    engine.async_scheduling = True
    try:
        with _Spy(overhead_llm) as spy:
            outputs, sampling_steps = _run_alone(engine, [5, 6, 7], replace(params, stop_token_ids=[stop]))
        final = outputs[-1]
        assert (final.token_ids, final.text, final.finish_reason) == (
            expected.token_ids, expected.text, FinishReason.EOS_TOKEN)
        assert UNREAD not in final.token_ids
        # Every step was queued before the last one's token was read, so the request ran once more after
        # its stop token, and that token was dropped.
        assert spy.launched == sampling_steps == len(final.token_ids) + 1
        _assert_idle(engine)
    finally:
        engine.async_scheduling = False


def test_steps_that_read_outputs_wait_for_the_last_tokens(overhead_llm: LLM) -> None:
    """A request that scores its prompt (prompt logprobs) joining overlapping ones: the steps while it runs are
    not queued ahead, and every request still gets its own tokens."""
    engine = overhead_llm.engine
    plain = SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True)
    penalized = replace(plain, temperature=0.8, prompt_logprobs=True, seed=3)
    want = overhead_llm.generate([[1, 2, 3], [4, 5, 6]], [plain, penalized])
    expected = [o.token_ids for o in want]
    engine.async_scheduling = True
    try:
        with _Spy(overhead_llm) as spy:
            engine.add_request("plain", [1, 2, 3], plain)
            outputs: dict[str, RequestOutput] = {}
            for step in range(40):
                if step == 3:
                    engine.add_request("penalized", [4, 5, 6], penalized)
                for o in engine.step():
                    outputs[o.request_id] = o
                if not engine.has_unfinished():
                    break
    finally:
        engine.async_scheduling = False
    assert [outputs["plain"].token_ids, outputs["penalized"].token_ids] == expected
    assert outputs["penalized"].prompt_logprobs == pytest.approx(want[1].prompt_logprobs, abs=1e-5)
    # Steps overlapped before it came and after it ended, and none with it in them.
    assert spy.launched > 0 and spy.requests == {"plain"}
    _assert_idle(engine)


def test_non_finite_logits_fail_their_request_alone(overhead_llm: LLM) -> None:
    """A row whose logits are NaN is found when its token is read, after the next step has taken that token
    as its input: the request ends alone with the error, no placeholder in its tokens, and the others get
    their tokens."""
    engine = overhead_llm.engine
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
    expected = overhead_llm.generate([[9, 8, 7]], params)[0].token_ids
    compute_logits = engine.runner.model.compute_logits
    calls = 0

    def poisoned(hidden: torch.Tensor) -> torch.Tensor:
        nonlocal calls
        calls += 1
        logits = compute_logits(hidden)
        if calls == 4 and logits.shape[0] == 2:
            logits[1] = float("nan")  # the second request's fourth token
        return logits

    engine.runner.model.compute_logits = poisoned  # type: ignore[method-assign]
    engine.async_scheduling = True
    try:
        engine.add_request("good", [9, 8, 7], params)
        engine.add_request("bad", [1, 2, 3], params)
        finals: dict[str, RequestOutput] = {}
        while engine.has_unfinished():
            for o in engine.step():
                if o.finished:
                    finals[o.request_id] = o
    finally:
        engine.async_scheduling = False
        del engine.runner.model.compute_logits
    assert calls > 4
    assert finals["good"].error is None and finals["good"].token_ids == expected
    bad = finals["bad"]
    # As without async scheduling: a base-model request's FloatingPointError, reported as the engine's.
    assert isinstance(bad.error, EngineStepError) and "FloatingPointError" in str(bad.error)
    assert len(bad.token_ids) == 3 and UNREAD not in bad.token_ids
    _assert_idle(engine)


@pytest.mark.skipif(os.environ.get("LORAPLEX_TEST_ASYNC_SCHEDULING") is not None,
                    reason="LORAPLEX_TEST_ASYNC_SCHEDULING replaces the rule under test")
def test_auto_is_on_for_cuda_only_and_never_with_speculative_decoding() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    assert not SchedulerConfig().resolved_async_scheduling(cpu)
    assert SchedulerConfig().resolved_async_scheduling(cuda)
    assert not SchedulerConfig(speculative_tokens=2).resolved_async_scheduling(cuda)
    assert SchedulerConfig(async_scheduling="on").resolved_async_scheduling(cpu)
    with pytest.raises(ValueError, match="speculative"):
        SchedulerConfig(async_scheduling="on", speculative_tokens=2)
    with pytest.raises(ValueError, match="async_scheduling must be one of"):
        SchedulerConfig(async_scheduling="yes")


def test_a_device_sampling_failure_falls_back_to_the_host_sampler(overhead_llm: LLM,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """`Sampler.tokens` raising (a bug, or a row's state) costs the overlap of that step, not the requests: the
    step is sampled on the host as without async scheduling, and every request gets its tokens and logprobs."""
    engine = overhead_llm.engine
    params = [SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1),
              SamplingParams(max_new_tokens=8, temperature=0.9, top_k=20, seed=4, ignore_eos=True)]
    prompts = [[9, 8, 7], [1, 2, 3, 4]]
    expected = overhead_llm.generate(prompts, params)
    calls = 0
    tokens = engine.runner.sampler.tokens

    def flaky(*args: Any) -> Any:
        nonlocal calls
        calls += 1
        if calls % 2:
            raise RuntimeError("injected failure")
        return tokens(*args)

    monkeypatch.setattr(engine.runner.sampler, "tokens", flaky)
    engine.async_scheduling = True
    try:
        got = overhead_llm.generate(prompts, params)
    finally:
        engine.async_scheduling = False
    assert calls >= 6
    for g, e in zip(got, expected, strict=True):
        assert g.token_ids == e.token_ids and g.error is None
        assert [lp.token_id for lp in g.logprobs or []] == [lp.token_id for lp in e.logprobs or []]
        assert [lp.logprob for lp in g.logprobs or []] == pytest.approx([lp.logprob for lp in e.logprobs or []],
                                                                        abs=1e-4)
    _assert_idle(engine)
