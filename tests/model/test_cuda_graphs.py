"""Decode CUDA graphs as far as a CPU can check them (loraplex/model/cuda_graphs.py): the size ladder, the
static buffers a step fills (its rows, then padding), which steps run eager, and why graphs are off; and,
through Triton's interpreter, the whole engine with the graph path (static buffers, padding rows, the
LoRA gather kernels, an adapter swapped into a slot after capture) giving the eager path's tokens. Only
the capture itself needs CUDA: tests/gpu/test_cuda.py replays real graphs."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

# As in test_triton_decoder: the interpreter must be on before triton is first imported.
os.environ.setdefault("TRITON_INTERPRET", "0" if torch.cuda.is_available() else "1")

from loraplex.kv.block_pool import KVCache  # noqa: E402
from loraplex.lora.batch import EMPTY_SLOT  # noqa: E402
from loraplex.model.cuda_graphs import (  # noqa: E402
    PADDING,
    DecodeGraphs,
    EagerCapture,
    Graph,
    build_decode_graphs,
    graph_batch_sizes,
)
from loraplex.model.decode_rows import DecodeInputs  # noqa: E402
from tests.triton_interpreter import SKIP_REASON, kernels_runnable, run_in_fresh_process  # noqa: E402


def test_the_ladder_starts_at_one_ends_at_the_largest_batch_and_pads_little() -> None:
    assert graph_batch_sizes(1) == [1]
    assert graph_batch_sizes(6) == [1, 2, 4, 6]
    assert graph_batch_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    for top in (3, 100, 256, 257, 512, 1000):
        sizes = graph_batch_sizes(top)
        assert sizes[0] == 1 and sizes[-1] == top and sizes == sorted(set(sizes))
        # Every batch of 1..top rows has a size: under twice its rows up to 8, then fewer than 8 padding rows
        # up to 64, 16 up to 256, 32 beyond.
        for rows in range(1, top + 1):
            size = next(s for s in sizes if s >= rows)
            assert size < 2 * rows if rows <= 8 else size - rows < (8 if rows <= 64 else 16 if rows <= 256 else 32)
    assert len(graph_batch_sizes(512)) <= 40
    with pytest.raises(ValueError, match="max_batch must be >= 1"):
        graph_batch_sizes(0)


class _Recorded:
    def __init__(self) -> None:
        self.replays = 0

    def replay(self) -> None:
        self.replays += 1


def _record(bodies: list[tuple[Callable[[], torch.Tensor], torch.Tensor]]) -> Callable[..., tuple[Graph, torch.Tensor]]:
    """A capture that runs nothing: it keeps each body and hands out a [size, 1] output."""
    def capture(body: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        out = torch.zeros(1)
        bodies.append((body, out))
        return _Recorded(), out
    return capture


def _graphs(sizes: list[int], max_blocks: int = 6, lora: bool = True, dora: set[int] | None = None) -> DecodeGraphs:
    kv = KVCache(1, 8, 4, 1, 4, torch.float32, torch.device("cpu"))
    graphs = DecodeGraphs(torch.nn.Identity(), kv, torch.device("cpu"), sizes, max_blocks, lora,  # type: ignore[arg-type]
                          dora, capture=_record([]))
    graphs.capture(60.0)
    return graphs


def _rows(n: int, width: int, lora: list[int] | None = None) -> DecodeInputs:
    positions = np.arange(n, dtype=np.int64) * 3 + 5
    tables = np.arange(n * width, dtype=np.int64).reshape(n, width) + 1
    return DecodeInputs(input_ids=np.arange(n, dtype=np.int64) + 100, positions=positions,
                        slots=positions + 1000, tables=tables, lora_slots=lora or [EMPTY_SLOT] * n)


def test_a_step_fills_its_rows_then_pads_to_the_captured_size() -> None:
    graphs = _graphs([1, 2, 4, 8])
    assert len(graphs._graphs) == 8  # four sizes, each with and without LoRA
    step = graphs.prepare(_rows(3, 2, [0, EMPTY_SLOT, 1]))
    assert step is not None and step.rows == 3 and step.hidden is graphs._graphs[(4, True)][1]
    assert graphs.input_ids[:4].tolist() == [100, 101, 102, PADDING[0]]
    assert graphs.positions[:4].tolist() == [5, 8, 11, PADDING[1]]
    assert graphs.slots[:4].tolist() == [1005, 1008, 1011, -1]  # the padding row writes no KV
    assert graphs.context_lens[:4].tolist() == [6, 9, 12, 1]  # and attends to one key
    assert graphs.lora_slots[:4].tolist() == [0, EMPTY_SLOT, 1, EMPTY_SLOT]
    assert graphs.tables[:3, :2].tolist() == [[1, 2], [3, 4], [5, 6]]
    assert graphs.tables[3, 0] == 0
    # A smaller step later: rows it no longer has are padding again, up to its own size.
    step = graphs.prepare(_rows(2, 3))
    assert step is not None and step.hidden is graphs._graphs[(2, False)][1]  # no adapter: the base graph
    assert graphs.input_ids[:2].tolist() == [100, 101] and graphs.slots[:2].tolist() == [1005, 1008]
    assert graphs.tables[:2, :3].tolist() == [[1, 2, 3], [4, 5, 6]]
    step = graphs.prepare(_rows(1, 1, [1]))
    assert step is not None and step.hidden is graphs._graphs[(1, True)][1]


def test_steps_a_graph_cannot_hold_run_eager() -> None:
    graphs = _graphs([1, 2, 4], max_blocks=3, dora={2})
    assert graphs.prepare(_rows(5, 2)) is None  # more rows than the largest size
    assert graphs.prepare(_rows(2, 4)) is None  # a block table wider than captured
    assert graphs.prepare(_rows(2, 2, [0, 2])) is None  # a row on a DoRA adapter
    assert graphs.prepare(_rows(2, 2, [0, 1])) is not None
    base_only = _graphs([1, 2], lora=False)
    assert base_only.prepare(_rows(2, 2, [0, EMPTY_SLOT])) is None  # no LoRA graphs (another LoRA backend)
    assert base_only.prepare(_rows(2, 2)) is not None


def test_the_capture_stops_at_its_time_limit_keeping_the_largest_sizes() -> None:
    kv = KVCache(1, 8, 4, 1, 4, torch.float32, torch.device("cpu"))
    graphs = DecodeGraphs(torch.nn.Identity(), kv, torch.device("cpu"), [1, 2, 4, 8], 2, False,  # type: ignore[arg-type]
                          capture=_record([]))
    report = graphs.capture(0.0)  # the first (largest) size always; then the time has run out
    assert report.sizes == [8] and report.skipped == [4, 2, 1] and report.graphs == 1
    assert "3 smaller sizes skipped" in report.summary()
    step = graphs.prepare(_rows(1, 1))
    assert step is not None and step.hidden is graphs._graphs[(8, False)][1]  # padded to the size it has


def test_graphs_are_off_off_cuda_with_enforce_eager_and_with_the_torch_attention() -> None:
    kv = KVCache(1, 8, 4, 1, 4, torch.float32, torch.device("cpu"))
    rope = type("Rope", (), {})()
    model = type("Model", (), {"rope": rope})()

    def reason(device: str, **kw: object) -> str:
        options: dict = dict(enforce_eager=False, attention_backend="triton", lora_backend="triton", dora_slots=None,
                             max_batch=8, max_model_len=64, time_limit_s=10.0)
        graphs, info = build_decode_graphs(model, kv, torch.device(device), **{**options, **kw})  # type: ignore[arg-type]
        assert graphs is None and info["enabled"] is False
        return str(info["reason"])

    assert "CUDA graphs need CUDA" in reason("cpu")
    # Decided before anything touches a GPU, so these run anywhere.
    assert reason("cuda", enforce_eager=True) == "enforce_eager is set"
    assert "torch attention cannot be captured" in reason("cuda", attention_backend="torch")
    rope.long_from = 4096  # type: ignore[attr-defined]
    assert "longrope" in reason("cuda")


needs_kernels = pytest.mark.skipif(not kernels_runnable(), reason=SKIP_REASON)


@needs_kernels
def test_engine_tokens_with_graph_replays_equal_the_eager_path(tmp_path: Path) -> None:
    pytest.importorskip("triton")
    from peft import LoraConfig
    from transformers import LlamaConfig

    from loraplex import LLM, SamplingParams
    from loraplex.model import cuda_graphs
    from tests.helpers import save_tiny
    from tests.lora.peft_fixtures import make_adapter
    from tests.model.test_triton_decoder import SMALL

    device = "cuda" if torch.cuda.is_available() else "cpu"
    base = save_tiny(LlamaConfig(**SMALL), tmp_path / "base")
    adapters = [str(make_adapter(base, tmp_path / f"a{i}", LoraConfig(r=4, lora_alpha=8, target_modules=[
        "q_proj", "v_proj", "gate_proj", "down_proj"]), seed=i)) for i in range(3)]
    prompts = [[(5 * i + j) % 250 + 1 for j in range(n)] for i, n in enumerate([3, 9, 5, 14, 7])]
    # Two device slots for three adapters: the later requests' adapter is loaded into a slot after the capture.
    waves = [([None, adapters[0], adapters[1], None, adapters[0]], prompts),
             ([adapters[2], None, adapters[2]], prompts[:3])]
    # Requests end at different steps, so decode batches shrink through 5 (eager: above the largest size), 4 … 1.
    params = [SamplingParams(max_new_tokens=n, temperature=0.0, ignore_eos=True, logprobs=1) for n in (9, 3, 6, 5, 7)]
    replays = []

    def run(graphs: bool) -> list:
        llm = LLM(str(base), device=device, block_size=4, num_blocks=96, max_loras=2, max_lora_rank=8,
                  attention_backend="triton", lora_backend="triton", enforce_eager=True)
        engine = llm.engine
        if graphs:  # what the engine captures on CUDA, with a capture that re-runs the body on replay
            g = cuda_graphs.DecodeGraphs(engine.runner.model, engine.kv_cache, torch.device(device),
                                         cuda_graphs.graph_batch_sizes(4), -(-engine.max_model_len // 4), True,
                                         engine.lora.dora_slots if engine.lora else None, capture=EagerCapture())
            g.capture(60.0)
            engine.runner.graphs = g
            original = g.prepare

            def prepare(inputs: DecodeInputs) -> object:
                step = original(inputs)
                replays.append(step is not None and step.rows)
                return step
            g.prepare = prepare  # type: ignore[method-assign]
        return [llm.generate(p, params[:len(p)], adapter_id=ids) for ids, p in waves]

    eager, graphed = run(False), run(True)
    assert {r for r in replays if r} >= {1, 2, 3, 4} and False in replays
    for want_wave, got_wave in zip(eager, graphed, strict=True):
        for want, got in zip(want_wave, got_wave, strict=True):
            assert got.token_ids == want.token_ids
            assert [lp.logprob for lp in got.logprobs or []] == pytest.approx(
                [lp.logprob for lp in want.logprobs or []], abs=1e-4)


def test_in_fresh_process() -> None:
    if kernels_runnable():
        pytest.skip("the kernels run in this process")
    run_in_fresh_process(__file__, "equal_the_eager_path")
