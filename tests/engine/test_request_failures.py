"""Isolation: whatever fails for one request (its adapter's load, its inputs, its logits, its sampling, its
detokenizer) fails that request alone, and every other request gets exactly the tokens it gets alone.

The step never raises for such a failure, so the async loop never counts it as a step failure: before
this was so, an adapter id that made the load raise a ValueError or OSError failed every request in
flight, and a few such requests in a row stopped the engine loop for good.
"""

from __future__ import annotations

import asyncio
import errno
import math
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load as load_safetensors
from safetensors.torch import save as save_safetensors

from loraplex import LLM, SamplingParams
from loraplex.adapters import sources
from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.sources import Resolved, register_source
from loraplex.config import AdapterSourceConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine, EngineStepError
from loraplex.engine.request import RequestOutput
from loraplex.lora.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterError, AdapterInvalid
from loraplex.lora.merge import MergeSpec
from tests.adapters.adapter_files import adapter_files, write_adapter

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GREEDY = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True)
PROMPTS = [[3, 17, 101, 44, 9], [250, 7, 7, 311, 60, 2, 19], [88, 400, 5], [12, 13, 14, 15, 16, 17]]
MAX_STEPS = 400  # far more than any test here needs; a request that never finishes fails the test, not hangs it

# What a hostile adapter id made the load raise before ids were validated at the API: none is an AdapterError.
LOAD_ERRORS: dict[str, Exception] = {
    "nul": ValueError("embedded null byte"),
    "long": OSError(errno.ENAMETOOLONG, "File name too long", "/srv/secret-root/" + "x" * 300),
    "key": KeyError("x"),
    "bug": RuntimeError("a bug in a source"),
}




class RaisingSource:
    """Serves the folders it knows; any other id makes `resolve` raise LOAD_ERRORS[id] (not an AdapterError)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        if ref.id in self.folders:
            return Resolved(version="v1", path=self.folders[ref.id], ttl_s=math.inf)
        raise LOAD_ERRORS[ref.id]

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        raise AssertionError("the folders are local")


@pytest.fixture
def raising_source(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, Path]:
    folders = {"good": write_adapter(tmp_path / "good", seed=3, rank=4),
               "other": write_adapter(tmp_path / "other", seed=4, rank=8)}

    def factory(config: AdapterSourceConfig) -> RaisingSource:
        return RaisingSource(folders)

    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))  # the registration ends with the test
    register_source("raising", factory)
    return folders


def _run(engine: Engine) -> dict[str, RequestOutput]:
    """Step until idle (at most MAX_STEPS steps); the final output of every request. step() must not raise."""
    final: dict[str, RequestOutput] = {}
    for _ in range(MAX_STEPS):
        if not engine.has_unfinished():
            return final
        for out in engine.step():
            if out.finished or out.error is not None:
                assert out.request_id not in final, f"{out.request_id} finished twice"
                final[out.request_id] = out
    raise AssertionError(f"requests still unfinished after {MAX_STEPS} steps: {sorted(engine._seqs)}")


def _assert_idle(engine: Engine) -> None:
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine._loading and not engine._seqs
    if engine.lora is not None:
        assert engine.lora.slot_refs() == [0] * engine.lora.config.max_loras
        assert not engine.lora._holders


def test_an_adapter_load_that_raises_anything_fails_only_its_request(base: Path, tmp_path: Path,
                                                                      raising_source: dict[str, Path]) -> None:
    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=8, sources=("local", "raising"),
              disk_cache_dir=str(tmp_path / "disk"))
    engine = llm.engine
    good = [(f"good-{i}", PROMPTS[i % len(PROMPTS)], [None, "good", "other"][i % 3]) for i in range(6)]
    for request_id, prompt, adapter in good:
        engine.add_request(request_id, prompt, GREEDY, adapter_id=adapter, adapter_source="raising")
    for name in LOAD_ERRORS:  # every hostile one twice, queued among the good ones before the first step
        for k in range(2):
            engine.add_request(f"bad-{name}-{k}", PROMPTS[k], GREEDY, adapter_id=name, adapter_source="raising")
    # A merge with one part whose load raises: its Future must still finish (a lost callback error hung it).
    engine.add_request("bad-merge", PROMPTS[0], GREEDY, adapter_source="raising",
                       merge=MergeSpec(("good", "nul"), (0.5, 0.5)))

    final = _run(engine)

    for name in [*LOAD_ERRORS, "merge"]:
        for request_id in [r for r in final if r.startswith(f"bad-{name}")]:
            out = final[request_id]
            assert isinstance(out.error, AdapterError), (request_id, out.error)  # HTTP 424, not 500
            assert out.finished and not out.token_ids
            assert "secret-root" not in str(out.error)  # no server path in what the client sees
    assert isinstance(final["bad-long-0"].error.__cause__, OSError)  # the cause stays for the log
    assert sum(r.startswith("bad-") for r in final) == 2 * len(LOAD_ERRORS) + 1
    for request_id, prompt, adapter in good:
        assert final[request_id].error is None
        folder = None if adapter is None else str(raising_source[adapter])  # the same files, by path
        solo = llm.generate([prompt], GREEDY, adapter_id=folder)[0]
        assert final[request_id].token_ids == solo.token_ids, request_id
    _assert_idle(engine)


def _raise_injected(*args: Any, **kwargs: Any) -> Any:
    raise RuntimeError("injected failure")


def _break_inputs(engine: Engine, request_id: str) -> None:
    seq = engine._seqs[request_id]
    seq.tokens = seq.token_at = _raise_injected  # type: ignore[method-assign]


class BrokenDetokenizer:
    """A detokenizer that fails on the next token (the tiny test model has no tokenizer of its own)."""

    text = ""
    stop_matched = None
    add_tokens = flush = staticmethod(_raise_injected)


def _break_detokenizer(engine: Engine, request_id: str) -> None:
    engine._seqs[request_id].detokenizer = BrokenDetokenizer()  # type: ignore[assignment]


def _break_sampling(engine: Engine, request_id: str) -> None:
    """The sampler fails on any batch holding this request (as a hostile parameter or grammar would)."""
    victim = engine._seqs[request_id].params
    sampler = engine.runner.sampler

    def sample(logits: torch.Tensor, rows: list[Any], *rest: Any) -> Any:
        if any(r.params is victim for r in rows):
            raise RuntimeError("injected failure")
        return sampler(logits, rows, *rest)

    engine.runner.sampler = sample  # type: ignore[assignment]


BREAKAGES: dict[str, Callable[[Engine, str], None]] = {
    "inputs": _break_inputs, "detokenizer": _break_detokenizer, "sampling": _break_sampling}


@pytest.mark.parametrize("where", list(BREAKAGES))
def test_a_request_whose_own_state_breaks_fails_alone(base: Path, where: str) -> None:
    llm = LLM(str(base), num_blocks=128, block_size=4)
    engine = llm.engine
    # Greedy and seeded sampled requests with logprobs: a retried row must not disturb anyone's random stream.
    good = {f"good-{i}": (PROMPTS[i], SamplingParams(max_new_tokens=10, temperature=0.8, top_p=0.9, seed=100 + i,
                                                     ignore_eos=True, logprobs=2) if i % 2 else GREEDY)
            for i in range(len(PROMPTS))}
    for request_id, (prompt, params) in good.items():
        engine.add_request(request_id, prompt, params)
    engine.add_request("victim", [5, 6, 7, 8], SamplingParams(max_new_tokens=10, temperature=0.0, ignore_eos=True))
    engine.step()  # every request has its first token
    engine.step()
    BREAKAGES[where](engine, "victim")

    final = _run(engine)

    error = final["victim"].error
    assert isinstance(error, EngineStepError) and "injected" not in str(error), error  # details stay in the log
    assert final["victim"].finished
    for request_id, (prompt, params) in good.items():
        out = final[request_id]
        assert out.error is None
        solo = llm.generate([prompt], params)[0]
        assert out.token_ids == solo.token_ids, request_id
        if params.logprobs is not None:  # batched matmuls differ from solo ones in the last bits only
            assert out.logprobs is not None and solo.logprobs is not None
            assert [lp.logprob for lp in out.logprobs] == pytest.approx([lp.logprob for lp in solo.logprobs], abs=1e-4)
    _assert_idle(engine)


def _overflowing_adapter(folder: Path) -> Path:
    """A q/v adapter that passes every load check (finite weights, scale·B finite in float32) but whose
    delta overflows float32 on any real activation: |x·Aᵀ·Bᵀ| ~ 1e20 · 1e20 · 64 features."""
    files = adapter_files(seed=9, rank=4)
    tensors = {name: t * 1e20 for name, t in load_safetensors(files[SAFETENSORS_FILE]).items()}
    folder.mkdir(parents=True)
    (folder / CONFIG_FILE).write_bytes(files[CONFIG_FILE])
    (folder / SAFETENSORS_FILE).write_bytes(save_safetensors(tensors))
    return folder


def test_non_finite_logits_fail_only_their_request(base: Path, tmp_path: Path) -> None:
    hot = _overflowing_adapter(tmp_path / "hot")
    fine = write_adapter(tmp_path / "fine", seed=5, rank=4)
    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=8)
    engine = llm.engine
    params = SamplingParams(max_new_tokens=8, temperature=0.0, ignore_eos=True, logprobs=1)
    good = {"base": (PROMPTS[0], None), "fine": (PROMPTS[1], str(fine)), "base2": (PROMPTS[2], None)}
    for request_id, (prompt, adapter) in good.items():
        engine.add_request(request_id, prompt, params, adapter_id=adapter)
    engine.add_request("hot", PROMPTS[3], params, adapter_id=str(hot))

    final = _run(engine)

    assert isinstance(final["hot"].error, AdapterInvalid), final["hot"]  # HTTP 424, and no NaN logprob
    assert "non-finite logits" in str(final["hot"].error)
    for request_id, (prompt, adapter) in good.items():
        out = final[request_id]
        assert out.error is None and out.logprobs is not None
        assert all(math.isfinite(lp.logprob) for lp in out.logprobs)
        assert out.token_ids == llm.generate([prompt], params, adapter_id=adapter)[0].token_ids, request_id
    _assert_idle(engine)


def test_a_burst_of_failing_loads_never_counts_as_a_step_failure(base: Path, tmp_path: Path,
                                                                 raising_source: dict[str, Path]) -> None:
    """12 hostile requests at once beside a running stream: once enough to stop the loop for good."""
    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=8, sources=("local", "raising"),
              disk_cache_dir=str(tmp_path / "disk"))
    async_engine = AsyncEngine(llm.engine)
    long = SamplingParams(max_new_tokens=60, temperature=0.0, ignore_eos=True)
    names = list(LOAD_ERRORS)

    async def good(outputs: list[RequestOutput]) -> None:
        async for out in async_engine.generate("good", PROMPTS[1], long, adapter_id="good", adapter_source="raising"):
            outputs.append(out)

    async def hostile(i: int) -> BaseException | None:
        try:
            async for _ in async_engine.generate(f"bad-{i}", PROMPTS[0], GREEDY, adapter_id=names[i % len(names)],
                                                 adapter_source="raising"):
                pass
        except Exception as e:
            return e
        return None

    async def run() -> tuple[list[RequestOutput], list[BaseException | None]]:
        outputs: list[RequestOutput] = []
        task = asyncio.create_task(good(outputs))
        while not outputs:
            await asyncio.sleep(0.01)
        errors = await asyncio.gather(*(hostile(i) for i in range(12)))
        await task
        return outputs, list(errors)

    async_engine.start()
    try:
        outputs, errors = asyncio.run(run())
        assert async_engine.alive and async_engine.num_step_failures == 0
    finally:
        async_engine.stop()
    assert all(isinstance(e, AdapterError) for e in errors), errors
    assert outputs[-1].finished and outputs[-1].error is None
    solo = llm.generate([PROMPTS[1]], long, adapter_id=str(raising_source["good"]))[0]
    assert outputs[-1].token_ids == solo.token_ids


def test_a_failing_step_observer_does_not_stop_the_loop(base: Path) -> None:
    llm = LLM(str(base), num_blocks=64, block_size=4)
    async_engine = AsyncEngine(llm.engine)
    async_engine.on_step = _raise_injected

    async def run() -> RequestOutput:
        outs = [out async for out in async_engine.generate("r", PROMPTS[0], GREEDY)]
        return outs[-1]

    async_engine.start()
    try:
        last = asyncio.run(run())
        assert async_engine.alive
    finally:
        async_engine.stop()
    assert last.finished and last.token_ids == llm.generate([PROMPTS[0]], GREEDY)[0].token_ids
