"""The adapter exchange end to end through the engine: many adapters cycling through few device slots and
a small host tier, broken adapters beside good ones, and a slow source that must not stall decoding.

Every generated output is compared with a solo run of the same request (greedy), so an adapter loaded
into the wrong slot, a slot overwritten while in use, or a stale host-tier entry would show as a
different token sequence, not only as a broken invariant.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import shutil
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import save as save_safetensors

from loraplex import LLM, SamplingParams
from loraplex.adapters import sources
from loraplex.adapters.ref import AdapterIdInvalid, AdapterRef
from loraplex.adapters.sources import Resolved, register_source
from loraplex.config import AdapterSourceConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.engine import Engine
from loraplex.engine.request import RequestOutput
from loraplex.lora.adapter import CONFIG_FILE, SAFETENSORS_FILE, AdapterError, AdapterInvalid, AdapterNotFound
from tests.adapters.adapter_files import adapter_files, parse, write_adapter
from tests.helpers import TINY

pytestmark = pytest.mark.usefixtures("one_torch_thread")

NUM_ADAPTERS = 200
SLOTS = 8
HOST_ADAPTERS = 32
PARAMS = SamplingParams(max_new_tokens=6, temperature=0.0, ignore_eos=True)
# A few shared prompts: the same prompt under many adapters must give adapter-specific outputs, and the
# prefix cache (keyed by adapter) must never hand one adapter's KV to another.
PROMPTS = [[3, 17, 101, 44, 9], [250, 7, 7, 311, 60, 2, 19], [88, 400, 5], [12, 13, 14, 15, 16, 17]]




def _drain(engine: Engine, pending: list[tuple[str, list[int], str | None]] | None = None,
           per_step: int = 4) -> dict[str, RequestOutput]:
    """Step until idle, adding `per_step` of `pending` (id, prompt, adapter) before each step; the final
    output of every request (finished, or carrying its error)."""
    pending = list(pending or [])
    final: dict[str, RequestOutput] = {}
    while pending or engine.has_unfinished():
        for request_id, prompt, adapter in pending[:per_step]:
            engine.add_request(request_id, prompt, PARAMS, adapter_id=adapter)
        del pending[:per_step]
        for out in engine.step():
            if out.finished or out.error is not None:
                assert out.request_id not in final, f"{out.request_id} finished twice"
                final[out.request_id] = out
    return final


def _assert_idle(engine: Engine) -> None:
    """Nothing left held: slot refs, held weights, KV blocks; the slot table names each adapter once."""
    lora = engine.lora
    assert lora is not None
    assert lora.slot_refs() == [0] * lora.config.max_loras
    assert not lora._holders and not lora._weights
    resident = lora.resident()
    assert len(resident) == len(set(resident)) <= lora.config.max_loras
    assert sorted(lora._idle) == list(range(lora.config.max_loras))  # every slot is reusable
    assert engine.pool.num_free == engine.pool.num_blocks
    assert not engine._loading and not engine._seqs


def _watch_loads(engine: Engine) -> list[tuple[int, int, int, int]]:
    """Record (slot, its ref count, running sequences on it, adapters running) at every device-slot load."""
    lora = engine.lora
    assert lora is not None
    seen: list[tuple[int, int, int, int]] = []
    load = lora._load

    def checked_load(slot: int, key: object) -> None:
        on_slot = sum(1 for s in engine.scheduler.running if s.lora_slot == slot)
        adapters = len({s.adapter for s in engine.scheduler.running if s.adapter is not None})
        seen.append((slot, lora.slot_refs()[slot], on_slot, adapters))
        load(slot, key)  # type: ignore[arg-type]

    lora._load = checked_load  # type: ignore[method-assign]
    return seen


def test_200_adapters_cycle_through_8_slots_and_a_32_adapter_host_tier(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "adapters"
    names = [f"a{i:03d}" for i in range(NUM_ADAPTERS)]
    for i, name in enumerate(names):
        write_adapter(root / name, seed=1000 + i, rank=4 + i % 5)  # ranks 4..8, random non-zero A and B
    largest = max(parse(root / name).size_bytes for name in names[:5])
    llm = LLM(str(base), num_blocks=256, block_size=4, max_loras=SLOTS, max_lora_rank=8,
              host_cache_bytes=HOST_ADAPTERS * largest, adapter_roots=(str(root),), sources=("local",),
              disk_cache_dir=str(tmp_path / "disk"))
    engine = llm.engine
    loads = _watch_loads(engine)
    # Two requests per adapter (different prompts), in shuffled order, a few added before each step.
    rng = random.Random(0)
    work = [(f"r{i}-{k}", PROMPTS[(i + 2 * k) % len(PROMPTS)], name) for i, name in enumerate(names) for k in range(2)]
    rng.shuffle(work)
    final = _drain(engine, work, per_step=4)

    assert sorted(final) == sorted(r for r, _, _ in work)
    assert all(o.error is None and len(o.token_ids) == PARAMS.max_new_tokens for o in final.values())
    assert engine.lora is not None and engine.adapters is not None
    assert engine.lora.loads > SLOTS  # the device tier reloaded slots
    assert engine.adapters.stats().host_evictions > 0  # and the host tier evicted parsed adapters
    assert engine.adapters.stats().host_entries <= HOST_ADAPTERS * 2  # ranks 4..8: at most 2x as many
    assert len(loads) == engine.lora.loads
    in_use = [(slot, refs, running) for slot, refs, running, _ in loads if refs or running]
    assert not in_use, f"slots loaded while in use: {in_use[:5]}"
    assert max(adapters for *_, adapters in loads) >= SLOTS // 2  # loads happened beside running adapters
    _assert_idle(engine)

    # Solo: one request at a time on a fresh engine with a single slot.
    solo = LLM(str(base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8)
    for request_id, prompt, name in work:
        expected = solo.generate([prompt], PARAMS, adapter_id=str(root / name))[0].token_ids
        assert final[request_id].token_ids == expected, (request_id, name)
    # The adapters matter: the same prompt gives many different outputs across adapters.
    per_prompt = {tuple(p): {tuple(final[r].token_ids) for r, q, _ in work if q == p} for p in PROMPTS}
    assert all(len(outputs) > NUM_ADAPTERS // 4 for outputs in per_prompt.values())


def _write(folder: Path, files: dict[str, bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, data in files.items():
        (folder / name).write_bytes(data)
    return folder


def _with_config(**changes: object) -> Callable[[Path], object]:
    def change(folder: Path) -> None:
        config = json.loads((folder / CONFIG_FILE).read_text())
        config.update(changes)
        (folder / CONFIG_FILE).write_text(json.dumps(config))
    return change


def _truncate(folder: Path) -> None:
    data = (folder / SAFETENSORS_FILE).read_bytes()
    (folder / SAFETENSORS_FILE).write_bytes(data[: len(data) // 2])


def _wrong_shapes(folder: Path) -> None:
    """A q/v adapter for a model half as wide: lora_A has 32 input features where the base has 64."""
    generator = torch.Generator().manual_seed(5)
    tensors = {}
    for layer in range(TINY["num_hidden_layers"]):
        for target in ("q_proj", "v_proj"):
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{target}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(4, 32, generator=generator)
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(32, 4, generator=generator)
    (folder / SAFETENSORS_FILE).write_bytes(save_safetensors(tensors))


# name → (breakage applied to a valid rank-4 adapter folder, or None for no folder; error; message part)
BROKEN: dict[str, tuple[Callable[[Path], object] | None, type[AdapterError], str]] = {
    "missing-folder": (None, AdapterNotFound, "not a folder under the adapter roots"),
    "empty-folder": (lambda f: [p.unlink() for p in f.iterdir()], AdapterInvalid, "no adapter_config.json"),
    "corrupt-safetensors": (lambda f: (f / SAFETENSORS_FILE).write_bytes(b"\x07" * 300), AdapterInvalid,
                            "not a readable safetensors file"),
    "truncated-safetensors": (_truncate, AdapterInvalid, "not a readable safetensors file"),
    "wrong-shapes": (_wrong_shapes, AdapterInvalid, "has shape"),
    "rank-too-high": (lambda f: _write(f, adapter_files(seed=6, rank=16)), AdapterInvalid,
                      "above the server's max_rank 8"),
    "modules-to-save": (_with_config(modules_to_save=["lm_head"]), AdapterInvalid, "modules_to_save"),
    "bias-all": (_with_config(bias="all"), AdapterInvalid, "bias='all' is not supported"),
    "missing-config": (lambda f: (f / CONFIG_FILE).unlink(), AdapterInvalid, "no adapter_config.json"),
    "invalid-config": (lambda f: (f / CONFIG_FILE).write_text('{"peft_type": "LORA", "r": '), AdapterInvalid,
                       "not valid JSON"),
}


def test_bad_adapters_fail_only_their_own_requests(base: Path, tmp_path: Path) -> None:
    root = tmp_path / "root"
    for i, name in enumerate(("good0", "good1")):
        write_adapter(root / name, seed=10 + i, rank=4 + 4 * i)
    for name, (breakage, _, _) in BROKEN.items():
        if breakage is not None:
            breakage(write_adapter(root / name, seed=20, rank=4))
    # A valid adapter outside the root, reachable only by '..' or by a symlink inside the root.
    write_adapter(tmp_path / "outside", seed=30)
    (root / "escape-link").symlink_to(tmp_path / "outside", target_is_directory=True)
    bad = {**{name: (error, message) for name, (_, error, message) in BROKEN.items()},
           "escape-link": (AdapterNotFound, "outside the adapter roots")}

    llm = LLM(str(base), num_blocks=128, block_size=4, max_loras=2, max_lora_rank=8, adapter_roots=(str(root),),
              sources=("local",), disk_cache_dir=str(tmp_path / "disk"))
    engine = llm.engine
    good: list[tuple[str, list[int], str | None]] = [
        (f"good-{i}", PROMPTS[i % len(PROMPTS)], [None, "good0", "good1"][i % 3]) for i in range(9)]
    # Each broken adapter twice: both requests get the error, also the one answered by the failure memory.
    broken = [(f"bad-{k}-{name}", PROMPTS[k], name) for name in bad for k in range(2)]
    work = good + broken
    random.Random(1).shuffle(work)
    final = _drain(engine, work, per_step=len(work))  # all queued before the first step

    assert sorted(final) == sorted(r for r, _, _ in work)
    for request_id, _, name in broken:
        error = final[request_id].error
        expected, message = bad[name]  # type: ignore[index]
        assert isinstance(error, expected), (name, error)
        assert message in str(error) and name in str(error), (name, str(error))
        assert final[request_id].finished and not final[request_id].token_ids
    with pytest.raises(AdapterIdInvalid, match="'..'"):  # an id no source can serve is refused, never queued
        engine.add_request("dotdot", PROMPTS[0], PARAMS, adapter_id="../outside")
    _assert_idle(engine)
    for request_id, prompt, adapter in good:
        out = final[request_id]
        assert out.error is None and len(out.token_ids) == PARAMS.max_new_tokens
        assert out.token_ids == llm.generate([prompt], PARAMS, adapter_id=adapter)[0].token_ids, request_id
    outputs = {adapter: final[r].token_ids for r, prompt, adapter in good if prompt == PROMPTS[0]}
    assert len(set(map(tuple, outputs.values()))) == len(outputs)  # base, good0 and good1 all differ


class GatedSource:
    """Serves real adapter folders, but each fetch blocks until `gate` is set (a slow network)."""

    def __init__(self, folders: dict[str, Path]) -> None:
        self.folders = folders
        self.started = threading.Event()
        self.gate = threading.Event()
        self.released_by_gate: bool | None = None

    def resolve(self, ref: AdapterRef, token: str | None) -> Resolved:
        if ref.id not in self.folders:
            raise AdapterNotFound(f"adapter {ref}: no such adapter")
        return Resolved(version="v1", ttl_s=math.inf)

    def fetch(self, ref: AdapterRef, resolved: Resolved, token: str | None, dest: Path) -> None:
        self.started.set()
        # Bounded, so an engine that stalls on the load fails the test rather than hanging it.
        self.released_by_gate = self.gate.wait(timeout=30.0)
        shutil.copytree(self.folders[ref.id], dest, dirs_exist_ok=True)


GATE_STEPS = 20  # decode steps the engine must run while the fetch is blocked


def test_a_slow_source_does_not_delay_decoding(base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = write_adapter(tmp_path / "slow-adapter", seed=40, rank=8)
    source = GatedSource({"org/slow": folder})

    def factory(config: AdapterSourceConfig) -> GatedSource:
        return source

    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))  # the registration ends with the test
    register_source("gatedtest", factory)
    llm = LLM(str(base), num_blocks=256, block_size=4, max_loras=2, max_lora_rank=8,
              sources=("local", "gatedtest"), disk_cache_dir=str(tmp_path / "disk"))
    engine = llm.engine
    async_engine = AsyncEngine(engine)
    pending_steps: list[int] = []  # base tokens produced in each step taken while the slow load was pending

    def on_step(outputs: list[RequestOutput], seconds: float) -> None:  # on the loop thread
        if "slow" in engine._loading:
            pending_steps.append(sum(1 for o in outputs if o.request_id.startswith("base")))
            if len(pending_steps) >= GATE_STEPS:
                source.gate.set()

    async_engine.on_step = on_step
    long_params = SamplingParams(max_new_tokens=200, temperature=0.0, ignore_eos=True)
    base_prompts = PROMPTS[:3]

    async def collect(request_id: str, prompt: list[int], params: SamplingParams, adapter: str | None,
                      seen: list[RequestOutput]) -> None:
        async for out in async_engine.generate(request_id, prompt, params, adapter_id=adapter,
                                               adapter_source="gatedtest" if adapter else None):
            seen.append(out)

    async def run() -> tuple[list[list[RequestOutput]], list[RequestOutput]]:
        streams: list[list[RequestOutput]] = [[] for _ in base_prompts]
        tasks = [asyncio.create_task(collect(f"base-{i}", p, long_params, None, streams[i]))
                 for i, p in enumerate(base_prompts)]
        while not all(streams):  # every base request is decoding before the slow one arrives
            await asyncio.sleep(0.01)
        slow: list[RequestOutput] = []
        tasks.append(asyncio.create_task(collect("slow", PROMPTS[3], PARAMS, "org/slow", slow)))
        await asyncio.gather(*tasks)
        return streams, slow

    async_engine.start()
    try:
        streams, slow = asyncio.run(run())
    finally:
        async_engine.stop()

    assert source.started.is_set() and source.released_by_gate, "the engine stopped stepping during the fetch"
    assert len(pending_steps) >= GATE_STEPS
    assert sum(pending_steps) >= GATE_STEPS  # and those steps produced tokens for the running requests
    assert slow[-1].finished and slow[-1].error is None
    for prompt, stream in zip(base_prompts, streams, strict=True):
        assert stream[-1].token_ids == llm.generate([prompt], long_params)[0].token_ids
    solo = LLM(str(base), num_blocks=64, block_size=4, max_loras=1, max_lora_rank=8)
    assert slow[-1].token_ids == solo.generate([PROMPTS[3]], PARAMS, adapter_id=str(folder))[0].token_ids
    _assert_idle(engine)
