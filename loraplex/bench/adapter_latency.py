"""Adapter load latency through the exchange: cold, warm and hot, per rank, on all seven projections.

    python -m loraplex.bench.adapter_latency [--model demo] [--ranks 8,16,64] [--repeats 7] [--device cpu]
                                             [--threads N]

For each rank, a PEFT LoRA adapter on q/k/v/o/gate/up/down (random non-zero weights, alpha = 2·rank) is
saved to a temporary folder and timed on the engine's own loader and device tier:

    cold   local folder → read, validated, parsed (fresh AdapterLoader, so an empty host tier) → device slot
    warm   host tier → device slot (the slot was evicted; the loader re-checks the folder's stamp, as for
           every request of a local adapter, and finds the parsed adapter)
    hot    already in a slot: LoRAManager.acquire only

Each figure is the median of the repeats. Before every cold repeat the adapter's files are dropped from
the OS page cache where the OS allows it (posix_fadvise DONTNEED), so cold includes reading the bytes.
The target (shared/BENCHMARKS.md, issue 4) is rank-16 all-projection cold ≤ 50 ms from a local folder on CPU.

A slot load is a few hundred small tensor copies; with several torch threads on a CPU that other work
shares, each copy can wait for a descheduled thread, so the slowest repeats swing by two orders of
magnitude. The fastest cold repeat is printed beside the median for that reason; `--threads 1` shows
the cost without that wait.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch

from loraplex.adapters.loader import AdapterLoader, LoadedAdapter
from loraplex.adapters.local_source import LocalSource
from loraplex.adapters.ref import AdapterRef
from loraplex.bench.adapters import ALL_PROJECTIONS, peft_adapters, randomize_lora_weights
from loraplex.config import EngineConfig
from loraplex.engine.engine import Engine
from loraplex.engine.request import SamplingParams
from loraplex.engine.sequence import Sequence
from loraplex.lora.manager import LoRAManager

TARGET_RANK = 16
TARGET_COLD_MS = 50.0


@dataclass(frozen=True)
class RankTimings:
    rank: int
    size_bytes: int
    cold_ms: float
    cold_min_ms: float
    cold_parse_ms: float  # of cold: the loader's request (stamp, read, validate, parse) until its Future is done
    cold_slot_ms: float   # of cold: copying the parsed weights into a device slot
    warm_ms: float
    hot_ms: float


def make_adapters(base_path: Path, ranks: list[int], out_dir: Path) -> dict[int, Path]:
    """One PEFT adapter per rank on every projection, saved under `out_dir/rank<r>` (one base model load)."""
    from peft import LoraConfig  # a bench dependency, not a runtime one

    configs = [(f"rank{rank}", LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=list(ALL_PROJECTIONS),
                                          lora_dropout=0.0, bias="none", task_type="CAUSAL_LM")) for rank in ranks]
    paths = {}
    for rank, (model, name) in zip(ranks, peft_adapters(base_path, configs), strict=True):
        randomize_lora_weights(model, name, torch.Generator().manual_seed(rank))
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.save_pretrained(out_dir, selected_adapters=[name], safe_serialization=True)
        paths[rank] = out_dir / name  # PEFT saves a non-"default" adapter into a subfolder named after it
    return paths


def drop_page_cache(folder: Path) -> None:
    """Ask the OS to forget the cached pages of the folder's files (best effort; no-op where unsupported)."""
    if not hasattr(os, "posix_fadvise"):
        return
    for file in folder.iterdir():
        fd = os.open(file, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _to_slot(manager: LoRAManager, loaded: LoadedAdapter) -> None:
    manager.pin(loaded.identity, loaded.weights)


def _out_of_slot(manager: LoRAManager, loaded: LoadedAdapter) -> None:
    manager.unpin(loaded.identity)
    if not manager.evict(loaded.identity):
        raise RuntimeError(f"{loaded.identity} could not be evicted from its slot")


def measure(engine: Engine, folder: Path, rank: int, repeats: int) -> RankTimings:
    manager = engine.lora
    if manager is None:
        raise ValueError("the engine runs with max_loras=0: there is no device tier to measure")
    device = engine.runner.device
    ref = AdapterRef("local", str(folder))
    cold, parse, slot = [], [], []
    loader: AdapterLoader | None = None
    for _ in range(repeats):
        if loader is not None:
            loader.close()
        loader = AdapterLoader({"local": LocalSource(None)}, manager.parse, workers=1)  # empty host tier
        drop_page_cache(folder)
        start = time.perf_counter()
        loaded = loader.request(ref).result()
        parsed = time.perf_counter()
        _to_slot(manager, loaded)
        _sync(device)
        end = time.perf_counter()
        cold.append(end - start)
        parse.append(parsed - start)
        slot.append(end - parsed)
        _out_of_slot(manager, loaded)
    assert loader is not None  # repeats >= 1
    warm = []
    for _ in range(repeats):  # the last cold loader's host tier holds the adapter
        start = time.perf_counter()
        loaded = loader.request(ref).result()
        _to_slot(manager, loaded)
        _sync(device)
        warm.append(time.perf_counter() - start)
        _out_of_slot(manager, loaded)
    if loader.stats().host_hits < repeats:
        raise RuntimeError(f"warm loads missed the host tier: {loader.stats()}")
    _to_slot(manager, loaded)
    seq = Sequence("bench", [1], SamplingParams(), 0)
    seq.adapter = loaded.identity
    hot = []
    for _ in range(repeats):
        start = time.perf_counter()
        if not manager.acquire(seq):
            raise RuntimeError(f"{loaded.identity} is pinned but acquire found no slot")
        hot.append(time.perf_counter() - start)
        manager.release(seq)
    _out_of_slot(manager, loaded)
    loader.close()
    ms = [1000 * statistics.median(x) for x in (cold, parse, slot, warm, hot)]
    return RankTimings(rank, loaded.weights.size_bytes, ms[0], 1000 * min(cold), *ms[1:])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--ranks", default="8,16,64", help="comma-separated adapter ranks")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N or auto")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's choice)")
    args = ap.parse_args(argv)
    try:
        ranks = sorted({int(r) for r in args.ranks.split(",")})
    except ValueError:
        ap.error(f"--ranks must be comma-separated integers, got {args.ranks!r}")
    if args.repeats < 1 or not ranks or ranks[0] < 1 or (args.threads is not None and args.threads < 1):
        ap.error("--repeats, --threads and every rank must be at least 1")
    if args.threads is not None:
        torch.set_num_threads(args.threads)

    from loraplex.paths import resolve_model

    base_path = resolve_model(args.model)
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory(prefix="loraplex-adapter-latency-") as tmp:
        start = time.perf_counter()
        folders = make_adapters(base_path, ranks, Path(tmp))
        print(f"made {len(ranks)} all-projection adapters in {time.perf_counter() - start:.1f}s under {tmp}")
        config = EngineConfig.from_options(model=str(base_path), device=args.device, max_loras=2,
                                           max_lora_rank=max(ranks), num_blocks=16, sources=("local",),
                                           disk_cache_dir=str(Path(tmp) / "disk"))
        engine = Engine(config)
        print(f"model {base_path}; {engine.runner.device}, {config.model.torch_dtype()}; "
              f"torch threads {torch.get_num_threads()}; median of {args.repeats} repeats")
        results = [measure(engine, folders[rank], rank, args.repeats) for rank in ranks]
    print(f"{'rank':>4} {'MB (fp32)':>9} {'cold ms':>9} {'(parse':>8} {'+ slot)':>8} {'cold min':>9} "
          f"{'warm ms':>9} {'hot ms':>9}")
    for r in results:
        print(f"{r.rank:>4} {r.size_bytes / 1e6:>9.1f} {r.cold_ms:>9.2f} {r.cold_parse_ms:>8.2f} "
              f"{r.cold_slot_ms:>8.2f} {r.cold_min_ms:>9.2f} {r.warm_ms:>9.2f} {r.hot_ms:>9.4f}")
    target = next((r for r in results if r.rank == TARGET_RANK), None)
    if target is not None:
        met = "met" if target.cold_ms <= TARGET_COLD_MS else "NOT met"
        print(f"target: rank-{TARGET_RANK} all-projection cold <= {TARGET_COLD_MS:g} ms from a local folder "
              f"on {engine.runner.device.type}: {target.cold_ms:.1f} ms, {met}")
    print(f"load average (1 min): {load_before:.1f} at start, {os.getloadavg()[0]:.1f} at end, "
          f"on {os.cpu_count()} cores")


if __name__ == "__main__":
    main()
