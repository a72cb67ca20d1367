"""CUDA graphs for decode steps: a step's few hundred kernel launches replayed as one.

A decode step of a 1B-class model launches ~40 kernels per layer; launched one by one from Python that
is ~20 ms of host time where the GPU needs ~2 ms. At startup the decoder body (embedding, layers, final
norm) is captured once per batch size of a ladder (`graph_batch_sizes`), twice per size where adapters
are served: once with no LoRA batch (so base-model steps pay nothing for LoRA) and once with the LoRA
ops reading each token's slot from a static tensor (the triton backend's gather kernels). A decode step
of n requests then copies its inputs into static device buffers, padded to the smallest captured size
≥ n, and replays that graph. The LM head, the sampler and everything after run eager on the n real rows.

The static buffers (`DecodeGraphs`): token ids, positions, KV slots, context lengths and LoRA slots,
one column of `max_size` each, and block tables `[max_size, max_blocks]`; one host mirror (pinned on
CUDA) and one host→device copy per step (the columns and the step's tables at their own width, which a
device-side copy then puts into the static tables). Padding rows write no KV (slot -1, which the triton KV write
skips), attend to one key of block 0 (context length 1) and use no adapter; their outputs are dropped.
Adapter slot buffers never move (loraplex/lora/layers.py), so loading an adapter into a slot needs no
recapture.

What runs eager: prefill and mixed steps, decode batches above the largest captured size, steps whose
rows use a DoRA adapter (its per-segment rescale is host-driven), and LoRA steps on a LoRA backend
other than triton. Graphs need the triton attention (the torch path gathers a width that changes every
step) and are off with `enforce_eager`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
import torch

from loraplex.kv.block_pool import KVCache
from loraplex.lora.batch import EMPTY_SLOT, LoRABatch
from loraplex.model.attention import AttentionMetadata
from loraplex.model.context import ForwardContext, forward_context
from loraplex.model.decode_rows import DecodeInputs
from loraplex.model.decoder import CausalLM

log = logging.getLogger(__name__)

COLUMNS = 5
"""Static per-row columns: token id, position, KV slot, context length, LoRA slot."""
PADDING = (0, 0, -1, 1, EMPTY_SLOT)
"""A padding row's value in each column: token 0 at position 0, no KV write, one key, no adapter."""


def graph_batch_sizes(max_batch: int) -> list[int]:
    """The captured decode batch sizes up to `max_batch`: 1, 2, 4, 8, then every 8 up to 64, every 16 up to
    256, every 32 beyond, and `max_batch` itself: ~40 sizes up to 512. A batch pads to the next size, by fewer
    rows than the step there; a decode step reads every weight once whatever its rows, so padding costs little."""
    if max_batch < 1:
        raise ValueError(f"max_batch must be >= 1, got {max_batch}")
    sizes, n = [], 1
    while n <= max_batch:
        sizes.append(n)
        n = n * 2 if n < 8 else n + (8 if n < 64 else 16 if n < 256 else 32)
    if sizes[-1] != max_batch:
        sizes.append(max_batch)
    return sizes


class Graph(Protocol):
    def replay(self) -> None: ...


Capture = Callable[[Callable[[], torch.Tensor]], tuple[Graph, torch.Tensor]]
"""Records a body once; returns the graph and the body's output tensor, which each replay rewrites."""


class CudaCapture:
    """Captures with `torch.cuda.CUDAGraph`, every graph in one memory pool (only one runs at a time)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.pool = torch.cuda.graph_pool_handle()
        # Warm-up and capture on one side stream: libraries' per-stream state (cuBLAS workspaces) is then
        # made by the warm-up, not inside the capture.
        self.stream = torch.cuda.Stream(device)

    def __call__(self, body: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream):
            body()  # warm-up: compiles the Triton kernels for these shapes before the capture, which cannot
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool, stream=self.stream):
            out = body()
        torch.cuda.synchronize(self.device)
        return graph, out


class EagerCapture:
    """The stand-in on a machine without CUDA (tests): a replay runs the body again into the same output
    tensor, so everything but the capture itself (static buffers, padding, bucket choice) runs as on CUDA."""

    def __call__(self, body: Callable[[], torch.Tensor]) -> tuple[Graph, torch.Tensor]:
        out = body()
        return _Rerun(body, out), out


@dataclass
class _Rerun:
    body: Callable[[], torch.Tensor]
    out: torch.Tensor

    def replay(self) -> None:
        self.out.copy_(self.body())


@dataclass
class GraphStep:
    """One decode step's graph, its inputs already in the static buffers."""

    graph: Graph
    hidden: torch.Tensor  # [size, hidden] the graph's output
    rows: int  # the step's real rows (the first ones)

    def run(self) -> torch.Tensor:
        """Replay; the real rows' final hidden states `[rows, hidden]` (valid until the next replay)."""
        self.graph.replay()
        return self.hidden[:self.rows]


@dataclass
class CaptureReport:
    sizes: list[int]  # batch sizes captured (descending)
    lora: bool  # whether a LoRA graph was captured beside each base one
    graphs: int
    seconds: float
    skipped: list[int] = field(default_factory=list)  # sizes left when the time ran out

    def summary(self) -> str:
        if not self.sizes:
            return "no CUDA graphs captured"
        low, high = min(self.sizes), max(self.sizes)
        sizes = f"batch sizes {low}–{high}" if low != high else f"batch size {low}"
        kinds = "with and without LoRA" if self.lora else "base model only"
        text = f"{self.graphs} CUDA graphs ({len(self.sizes)} {sizes}, {kinds}) captured in {self.seconds:.1f} s"
        if self.skipped:
            text += f"; {len(self.skipped)} smaller sizes skipped when the time ran out (they pad to {min(self.sizes)})"
        return text


class DecodeGraphs:
    """The decode graphs of one model and KV cache, their static inputs, and the choice per step."""

    def __init__(self, model: CausalLM, kv_cache: KVCache, device: torch.device, sizes: list[int], max_blocks: int,
                 lora: bool, dora_slots: set[int] | None = None, capture: Capture | None = None) -> None:
        """`sizes` ascending; `max_blocks` the widest block table a row can have; `lora` captures LoRA graphs
        too (the model's LoRA wrappers must use the triton op); `dora_slots` is the LoRA manager's live set of
        slots holding DoRA adapters (rows in them run eager)."""
        if not sizes or sorted(set(sizes)) != sizes:
            raise ValueError(f"sizes must be ascending and distinct, got {sizes}")
        self.model = model
        self.kv_cache = kv_cache
        self.device = device
        self.sizes = sizes
        self.max_blocks = max_blocks
        self.lora = lora
        self.dora_slots = dora_slots if dora_slots is not None else set()
        self._capture = capture or CudaCapture(device)
        self.max_size = m = sizes[-1]
        length = COLUMNS * m + m * max_blocks  # the columns, then room for a step's tables
        pinned = device.type == "cuda"
        with torch.inference_mode():
            self._host = torch.zeros(length, dtype=torch.long, pin_memory=pinned)
            self._static = torch.zeros(length, dtype=torch.long, device=device)
        self._host_np = self._host.numpy()
        for column, pad in enumerate(PADDING):
            self._host_np[column * m:(column + 1) * m] = pad
        self._copied: torch.cuda.Event | None = None  # the last host→device copy, before the mirror is rewritten
        columns = self._static[:COLUMNS * m].view(COLUMNS, m)
        self.input_ids, self.positions, self.slots, self.context_lens, self.lora_slots = columns
        # The tables the graphs read; a step uploads only its own width, after the columns (`prepare`).
        with torch.inference_mode():
            self.tables = torch.zeros(m, max_blocks, dtype=torch.long, device=device)
        self.rows = torch.arange(m, device=device)
        self._graphs: dict[tuple[int, bool], tuple[Graph, torch.Tensor]] = {}

    def capture(self, time_limit_s: float, progress: Callable[[int, int, int], None] | None = None) -> CaptureReport:
        """Capture every size, largest first (the pool is sized by the first), base then LoRA; stop
        starting new captures after `time_limit_s`. `progress(done, total, size)` after each graph."""
        self._upload(COLUMNS * self.max_size)  # every row padding (the tables are zeros)
        kinds = (False, True) if self.lora else (False,)
        total = len(self.sizes) * len(kinds)
        start = time.perf_counter()
        captured: list[int] = []
        skipped: list[int] = []
        for size in reversed(self.sizes):
            if captured and time.perf_counter() - start > time_limit_s:
                skipped.append(size)
                continue
            for lora in kinds:
                self._graphs[(size, lora)] = self._capture(self._body(size, lora))
                if progress is not None:
                    progress(len(self._graphs), total, size)
            captured.append(size)
        self.sizes = sorted(captured)
        return CaptureReport(captured, self.lora, len(self._graphs), time.perf_counter() - start, skipped)

    def _body(self, size: int, lora: bool) -> Callable[[], torch.Tensor]:
        attn = AttentionMetadata(slot_mapping=self.slots[:size], num_decode=size,
                                 decode_block_tables=self.tables[:size], decode_context_lens=self.context_lens[:size],
                                 prefills=[])
        ctx = ForwardContext(attn=attn, kv_cache=self.kv_cache,
                             lora=LoRABatch.unsegmented(self.lora_slots[:size]) if lora else None)
        ids, positions = self.input_ids[:size], self.positions[:size]

        @torch.inference_mode()
        def body() -> torch.Tensor:
            with forward_context(ctx):
                return self.model(ids, positions)

        return body

    def size_for(self, rows: int) -> int | None:
        """The smallest captured size that holds `rows` rows; None when none does (the step runs eager)."""
        for size in self.sizes:
            if size >= rows:
                return size
        return None

    def prepare(self, inputs: DecodeInputs) -> GraphStep | None:
        """The step's graph with `inputs` copied into its static buffers; None when it runs eager (too many
        rows, a block table wider than captured, or a row on a DoRA adapter)."""
        n = len(inputs.input_ids)
        size = self.size_for(n)
        if size is None or inputs.tables.shape[1] > self.max_blocks:
            return None
        lora_slots = np.asarray(inputs.lora_slots, dtype=np.int64)
        uses_lora = bool((lora_slots != EMPTY_SLOT).any())
        if uses_lora and (not self.lora or (self.dora_slots and not self.dora_slots.isdisjoint(inputs.lora_slots))):
            return None
        graph = self._graphs[(size, uses_lora)]
        if self._copied is not None:
            self._copied.synchronize()  # the last step's copy has read the mirror (long since, in practice)
        m, host = self.max_size, self._host_np
        for column, values in enumerate((inputs.input_ids, inputs.positions, inputs.slots, inputs.positions + 1,
                                         lora_slots)):
            host[column * m:column * m + n] = values
            host[column * m + n:column * m + size] = PADDING[column]
        # The step's tables at their own width (not max_blocks: a long-context model's would be megabytes):
        # uploaded after the columns, then copied into the static tables on the device. A row's cells past
        # its table are never read (its context ends inside it); a padding row reads cell 0.
        width = inputs.tables.shape[1]
        tables = host[COLUMNS * m:COLUMNS * m + size * width].reshape(size, width)
        tables[:n] = inputs.tables
        tables[n:] = 0
        self._upload(COLUMNS * m + size * width)
        with torch.inference_mode():
            self.tables[:size, :width].copy_(self._static[COLUMNS * m:COLUMNS * m + size * width].view(size, width))
        return GraphStep(graph[0], graph[1], n)

    def _upload(self, length: int) -> None:
        with torch.inference_mode():
            self._static[:length].copy_(self._host[:length], non_blocking=True)
        if self.device.type == "cuda":
            self._copied = torch.cuda.Event()
            self._copied.record()


def build_decode_graphs(model: CausalLM, kv_cache: KVCache, device: torch.device, *, enforce_eager: bool,
                        attention_backend: str, lora_backend: str | None, dora_slots: set[int] | None,
                        max_batch: int, max_model_len: int,
                        time_limit_s: float) -> tuple[DecodeGraphs | None, dict[str, Any]]:
    """The engine's decode graphs, captured (None where they cannot or should not be), and what `/info`
    reports about them. A capture that fails (out of memory, a kernel that cannot be captured) leaves the
    server running eager, with the reason logged and reported."""
    if device.type != "cuda":
        return None, {"enabled": False, "reason": f"decode runs eager on {device.type}: CUDA graphs need CUDA"}
    if enforce_eager:
        return None, {"enabled": False, "reason": "enforce_eager is set"}
    if attention_backend != "triton":
        return None, {"enabled": False, "reason": f"the {attention_backend} attention cannot be captured (use triton)"}
    if getattr(model.rope, "long_from", None) is not None:
        return None, {"enabled": False, "reason": "longrope models choose their rotary table per step on the host"}
    sizes = graph_batch_sizes(max_batch)
    lora = lora_backend == "triton"
    if lora_backend is not None and not lora:
        log.warning("decode steps with adapters run eager: only the triton LoRA backend runs in CUDA graphs, "
                    "and this engine uses %s", lora_backend)
    graphs = DecodeGraphs(model, kv_cache, device, sizes, -(-max_model_len // kv_cache.block_size), lora, dora_slots)
    total = len(sizes) * (2 if lora else 1)
    log.info("capturing %d CUDA graphs for decode batches of 1–%d (at most %.0f s; --enforce-eager skips this)",
             total, max_batch, time_limit_s)
    shown = [0]

    def progress(done: int, total: int, size: int) -> None:
        if done * 10 // total > shown[0] or done == total:
            shown[0] = done * 10 // total
            log.info("capturing CUDA graphs: %d/%d (batch %d)", done, total, size)

    try:
        report = graphs.capture(time_limit_s, progress)
    except Exception as e:  # the server still serves, eager; the reason is logged and in /info
        log.exception("capturing CUDA graphs failed; decode steps run eager")
        del graphs
        torch.cuda.empty_cache()
        return None, {"enabled": False, "reason": f"capture failed: {e}"}
    log.info("%s", report.summary())
    return graphs, {"enabled": True, "batch_sizes": sorted(report.sizes), "lora": report.lora,
                    "graphs": report.graphs, "capture_s": round(report.seconds, 2),
                    "skipped_batch_sizes": sorted(report.skipped)}
