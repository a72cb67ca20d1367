"""The GPU benchmark (issue 14): many adapters on one GPU, side by side with HF transformers and PEFT.

    python -m loraplex.bench.gpu [--requests 256] [--prompt-tokens 128] [--new-tokens 128] [--adapters 32]

A random-weight 1B-class Llama built from a config by this script (hidden 2048, 16 layers, 32 heads, 8
KV heads, intermediate 8192, vocabulary 49,152, bfloat16; no download) and `--adapters` rank-16 LoRA
adapters on all seven projections, written as PEFT folders. Workload: `--requests` requests of random
prompt tokens, greedy, ignoring EOS. Prints generated tokens per second of

    loraplex base                  every request on the base model
    loraplex one adapter           every request on adapter 0
    loraplex distinct              request i on adapter i % N
    loraplex base, eager           the base model again with --enforce-eager (no CUDA graphs)
    loraplex base, fp8             the base model with --quantize fp8 (GPUs of compute capability 8.9+)
    loraplex base, int4            the base model with --quantize int4 (4-bit weights, the Triton kernel), last
    hf generate base               HF transformers `generate`, one batch
    hf+peft distinct               PEFT's mixed batch (`adapter_names=`), on --peft-requests requests
                                   of --peft-new-tokens tokens (it is ~20x slower; the rate is comparable)

then the ratios against shared/BENCHMARKS.md's targets, batch-1 milliseconds per decoded token (base and
with an adapter, and base eager), the CUDA graphs captured and their capture time, and an fp32 parity check: a mixed batch of 8 requests over 4 adapters on a 2-layer
model of the same shapes, loraplex's greedy tokens against PEFT's (each request alone through HF).

Without CUDA it says so and exits 0. `--device cpu --tiny` runs every part on a tiny model instead (the
test suite uses it to check the script itself; its numbers mean nothing).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from loraplex.bench.adapters import load_peft_adapters
from loraplex.config import DTYPES
from loraplex.kv.block_pool import KVCache
from loraplex.paths import loraplex_home

MODEL_1B: dict[str, Any] = dict(vocab_size=49152, hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                num_attention_heads=32, num_key_value_heads=8, max_position_embeddings=4096,
                                rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)
MODEL_TINY: dict[str, Any] = dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                                  rms_norm_eps=1e-5, tie_word_embeddings=False, initializer_range=0.02)
PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
RANK, ALPHA = 16, 32
TARGETS = {"distinct / base": 0.90, "one adapter / base": 0.95, "distinct / hf+peft": 50.0}
FORMAT_VERSION = 1


def build_model(config: dict[str, Any], dtype: torch.dtype, root: Path, device: str) -> Path:
    """A random-weight Llama for `config`, saved once under `root` (the folder name hashes what decides it)."""
    from transformers import AutoModelForCausalLM, LlamaConfig

    key = hashlib.sha256(json.dumps([config, str(dtype), FORMAT_VERSION]).encode()).hexdigest()[:12]
    folder = root / f"model-{key}"
    if not (folder / "config.json").is_file():
        torch.manual_seed(0)
        with torch.device(device):  # random init on the GPU: seconds, not minutes, for 1.2B weights
            model = AutoModelForCausalLM.from_config(LlamaConfig(**config), dtype=dtype)
        model.save_pretrained(folder, safe_serialization=True)
        del model
    return folder


def build_adapters(model_dir: Path, config: dict[str, Any], n: int, dtype: torch.dtype) -> list[Path]:
    """`n` PEFT LoRA folders (rank 16 on all seven projections, random A and B) for the model."""
    from safetensors.torch import save_file

    hidden, inter, heads = config["hidden_size"], config["intermediate_size"], config["num_attention_heads"]
    kv = config["num_key_value_heads"] * hidden // heads
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    paths = []
    for i in range(n):
        folder = model_dir.parent / f"{model_dir.name}-adapters-{str(dtype).removeprefix('torch.')}" / str(i)
        paths.append(folder)
        if (folder / "adapter_model.safetensors").is_file():
            continue
        gen = torch.Generator().manual_seed(1000 + i)
        tensors = {}
        for layer in range(config["num_hidden_layers"]):
            for proj, (fan_in, fan_out) in shapes.items():
                part = "self_attn" if proj in PROJECTIONS[:4] else "mlp"
                prefix = f"base_model.model.model.layers.{layer}.{part}.{proj}"
                # std(B·A·scale) about a third of the base weights' (initializer_range): visible, sane.
                std = (config["initializer_range"] / 3 / (ALPHA / RANK) / RANK**0.5) ** 0.5
                tensors[f"{prefix}.lora_A.weight"] = (torch.randn(RANK, fan_in, generator=gen) * std).to(dtype)
                tensors[f"{prefix}.lora_B.weight"] = (torch.randn(fan_out, RANK, generator=gen) * std).to(dtype)
        folder.mkdir(parents=True, exist_ok=True)
        save_file(tensors, str(folder / "adapter_model.safetensors"))
        (folder / "adapter_config.json").write_text(json.dumps({
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "r": RANK, "lora_alpha": ALPHA, "lora_dropout": 0.0,
            "target_modules": list(PROJECTIONS), "bias": "none", "fan_in_fan_out": False,
            "base_model_name_or_path": str(model_dir)}))
    return paths


def timed(fn: Callable[[], int], repeats: int) -> float:
    """Median tokens per second of `fn` (which returns the tokens it generated) over `repeats` runs."""
    rates = []
    for _ in range(repeats):
        sync()
        start = time.perf_counter()
        tokens = fn()
        sync()
        rates.append(tokens / (time.perf_counter() - start))
    return statistics.median(rates)


def free_memory() -> None:
    """Let the last system's model go before the next one loads (they do not fit twice on a small GPU)."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def prompts_for(n: int, length: int, vocab: int, seed: int = 0) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (n, length), generator=gen).tolist()


def loraplex_rates(model_dir: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int, device: str,
                   dtype: str, repeats: int, enforce_eager: bool = False,
                   cases: tuple[str, ...] = ("base", "one adapter", "distinct"), quantize: str = "none",
                   async_scheduling: str = "auto") -> tuple[dict[str, float], dict[str, float], dict[str, Any]]:
    """Throughput of `cases` (of base, one adapter, distinct), batch-1 ms per decoded token (base, and with an
    adapter when the cases use adapters), and the engine's CUDA graphs as `/info` reports them."""
    from loraplex import LLM, SamplingParams

    # KV for every request's whole length at once (no preemption), with a quarter to spare.
    cfg = json.loads((model_dir / "config.json").read_text())
    per_token = KVCache.bytes_per_block(cfg["num_hidden_layers"], 1, cfg["num_key_value_heads"],
                                        cfg["hidden_size"] // cfg["num_attention_heads"], DTYPES[dtype])
    kv_bytes = int(1.25 * per_token * len(prompts) * (len(prompts[0]) + new_tokens + 16))
    # Base-only runs (eager, fp8) serve no adapter: no slots, and no LoRA graphs to capture.
    with_adapters = cases != ("base",)
    llm = LLM(str(model_dir), device=device, dtype=dtype, max_loras=len(adapters) if with_adapters else 0,
              max_lora_rank=RANK,
              max_num_seqs=len(prompts), max_num_batched_tokens=max(8192, len(prompts)),
              kv_cache_bytes=max(1 << 28, kv_bytes), enforce_eager=enforce_eager, quantize=quantize,
              async_scheduling=async_scheduling)
    engine = llm.engine
    print(f"loraplex backends: {engine.linear_backend} linears, {engine.attention_backend} attention, "
          f"{engine.lora.backend if engine.lora else '-'} LoRA; CUDA graphs: {engine.cuda_graphs}", flush=True)
    params = SamplingParams(max_new_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    every: dict[str, list[str | None]] = {"base": [None] * len(prompts), "one adapter": [str(adapters[0])] * len(prompts),
                                          "distinct": [str(adapters[i % len(adapters)]) for i in range(len(prompts))]}
    runs = {name: every[name] for name in cases}
    llm.generate(prompts, SamplingParams(max_new_tokens=2, ignore_eos=True), adapter_id=list(runs.values())[-1])  # warm
    rates = {}
    for name, ids in runs.items():
        def go(ids: list[str | None] = ids) -> int:
            return sum(len(o.token_ids) for o in llm.generate(prompts, params, adapter_id=ids))
        rates[name] = timed(go, repeats)
    latency = {}
    singles = (("base", None), ("adapter", str(adapters[0])))
    for name, adapter in singles if with_adapters else singles[:1]:
        def one(tokens: int, adapter: str | None = adapter) -> float:
            sync()
            start = time.perf_counter()
            llm.generate([prompts[0]], SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True),
                         adapter_id=adapter)
            sync()
            return time.perf_counter() - start
        one(new_tokens + 1)  # warm
        decode = statistics.median(one(new_tokens + 1) - one(1) for _ in range(repeats))
        latency[name] = decode / new_tokens * 1e3
    extra: dict[str, Any] = {"cuda_graphs": engine.cuda_graphs}
    if with_adapters:
        extra["load_ms"] = adapter_load_ms(engine.lora, adapters[-1], repeats=max(5, repeats))
    return rates, latency, extra


def adapter_load_ms(manager: Any, adapter: Path, repeats: int) -> tuple[float, float]:
    """Median milliseconds to load a parsed adapter (as the host tier keeps it: packed, pinned on CUDA) into
    an idle device slot: until the host goes on, and until the copies are done on the device."""
    from loraplex.adapters.ref import AdapterIdentity

    weights = manager.parse(adapter)
    host, done = [], []
    for i in range(repeats):
        key = AdapterIdentity("bench", str(adapter), f"load-{i}")  # a new identity: a real load every time
        sync()
        start = time.perf_counter()
        manager.warm(key, weights)
        manager.ready()
        host.append(time.perf_counter() - start)
        sync()
        done.append(time.perf_counter() - start)
        manager.evict(key)
    return statistics.median(host) * 1e3, statistics.median(done) * 1e3


def hf_rates(model_dir: Path, adapters: list[Path], prompts: list[list[int]], new_tokens: int,
             peft_prompts: list[list[int]], peft_tokens: int, device: str, dtype: torch.dtype,
             repeats: int) -> dict[str, float]:
    """HF `generate` on the base model, and PEFT's mixed batch over the adapters."""
    from transformers import AutoModelForCausalLM

    model: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = model.to(device).eval()

    def generate(m: Any, batch: list[list[int]], tokens: int, **kw: Any) -> int:
        ids = torch.tensor(batch, device=device)
        with torch.inference_mode():
            out = m.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=tokens,
                             min_new_tokens=tokens, do_sample=False, pad_token_id=0, **kw)
        return int((out.shape[1] - ids.shape[1]) * out.shape[0])

    generate(model, prompts[:4], 2)
    rates = {"hf generate base": timed(lambda: generate(model, prompts, new_tokens), repeats)}
    peft = load_peft_adapters(model, adapters)
    names = [f"a{i % len(adapters)}" for i in range(len(peft_prompts))]
    generate(peft, peft_prompts[:2], 2, adapter_names=names[:2])
    rates["hf+peft distinct"] = timed(lambda: generate(peft, peft_prompts, peft_tokens, adapter_names=names), 1)
    return rates


def fp32_parity(config: dict[str, Any], root: Path, device: str) -> tuple[int, int, int]:
    """(requests whose greedy tokens equal PEFT's, requests, adapter requests whose tokens differ from the
    base model's) for a mixed batch on a 2-layer fp32 model."""
    from transformers import AutoModelForCausalLM

    from loraplex import LLM, SamplingParams

    small = {**config, "num_hidden_layers": 2, "initializer_range": 0.1}  # peaked logits: no near-ties
    model_dir = build_model(small, torch.float32, root, device)
    adapters = build_adapters(model_dir, small, 4, torch.float32)
    prompts = prompts_for(8, 24, small["vocab_size"], seed=1)
    ids = [None if i % 5 == 4 else str(adapters[i % 4]) for i in range(8)]
    tokens = 16
    llm = LLM(str(model_dir), device=device, dtype="float32", max_loras=4, max_lora_rank=RANK, kv_cache_bytes=1 << 28)
    greedy = SamplingParams(max_new_tokens=tokens, temperature=0.0, ignore_eos=True)
    ours = [o.token_ids for o in llm.generate(prompts, greedy, adapter_id=ids)]
    plain = [o.token_ids for o in llm.generate(prompts, greedy)]
    changed = sum(a is not None and x != y for a, x, y in zip(ids, ours, plain, strict=True))
    base: Any = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    base = base.to(device).eval()
    peft = load_peft_adapters(base, adapters)
    equal = 0
    for prompt, adapter, got in zip(prompts, ids, ours, strict=True):
        ids_t = torch.tensor([prompt], device=device)
        with torch.inference_mode():
            if adapter is None:
                with peft.disable_adapter():
                    out = peft.generate(input_ids=ids_t, max_new_tokens=tokens, min_new_tokens=tokens,
                                        do_sample=False, pad_token_id=0)
            else:
                peft.set_adapter(f"a{adapters.index(Path(adapter))}")
                out = peft.generate(input_ids=ids_t, max_new_tokens=tokens, min_new_tokens=tokens, do_sample=False,
                                    pad_token_id=0)
        equal += out[0, len(prompt):].tolist() == got
    return equal, len(prompts), changed


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--requests", type=int, default=256)
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--adapters", type=int, default=32)
    ap.add_argument("--peft-requests", type=int, default=64)
    ap.add_argument("--peft-new-tokens", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--tiny", action="store_true", help="a tiny model instead of the 1B one (to test the script)")
    args = ap.parse_args(argv)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        print("bench.gpu: no CUDA device here; it measures GPUs only (--device cpu --tiny checks the script)")
        return 0
    config = MODEL_TINY if args.tiny else MODEL_1B
    dtype, dtype_name = (torch.bfloat16, "bfloat16") if args.device.startswith("cuda") else (torch.float32, "float32")
    root = loraplex_home() / "bench-gpu"
    name = torch.cuda.get_device_name() if args.device.startswith("cuda") else "cpu"
    print(f"bench.gpu on {name}: Llama hidden {config['hidden_size']}, {config['num_hidden_layers']} layers, "
          f"vocab {config['vocab_size']}, {dtype_name}; {args.requests} requests x {args.prompt_tokens} prompt "
          f"+ {args.new_tokens} new tokens, greedy; {args.adapters} adapters of rank {RANK} on all projections",
          flush=True)
    start = time.perf_counter()
    model_dir = build_model(config, dtype, root, args.device)
    adapters = build_adapters(model_dir, config, args.adapters, dtype)
    print(f"model and adapters ready in {time.perf_counter() - start:.0f} s", flush=True)
    prompts = prompts_for(args.requests, args.prompt_tokens, config["vocab_size"])
    ours, latency, extra = loraplex_rates(model_dir, adapters, prompts, args.new_tokens, args.device, dtype_name,
                                           args.repeats)
    free_memory()
    # The base model once more without CUDA graphs, to show what they buy.
    eager, eager_latency, _ = loraplex_rates(model_dir, adapters, prompts, args.new_tokens, args.device, dtype_name,
                                             args.repeats, enforce_eager=True, cases=("base",))
    fp8: dict[str, float] = {}
    if args.device.startswith("cuda") and torch.cuda.get_device_capability() >= (8, 9):
        fp8, _, _ = loraplex_rates(model_dir, adapters, prompts, args.new_tokens, args.device, dtype_name,
                                   args.repeats, cases=("base",), quantize="fp8")
        free_memory()
    theirs = hf_rates(model_dir, adapters, prompts, args.new_tokens, prompts[:args.peft_requests],
                      args.peft_new_tokens, args.device, dtype, args.repeats)
    rows = ({f"loraplex {k}": v for k, v in ours.items()} | {"loraplex base, eager": eager["base"]}
            | ({"loraplex base, fp8": fp8["base"]} if fp8 else {}) | theirs)
    for label, rate in rows.items():
        print(f"{label:<26} {rate:>10.1f} tokens/s", flush=True)
    ratios = {"distinct / base": ours["distinct"] / ours["base"], "one adapter / base": ours["one adapter"] / ours["base"],
              "distinct / hf+peft": ours["distinct"] / theirs["hf+peft distinct"],
              "base / hf generate base": ours["base"] / theirs["hf generate base"],
              "base: graphs / eager": ours["base"] / eager["base"]}
    if fp8:
        ratios["base: fp8 / bf16"] = fp8["base"] / ours["base"]
    for label, ratio in ratios.items():
        target = f"   (target >= {TARGETS[label]:g})" if label in TARGETS else ""
        print(f"ratio {label:<24} {ratio:>7.2f}x{target}")
    for label, ms in (latency | {"base, eager": eager_latency["base"]}).items():
        print(f"batch-1 ms per token, {label:<11} {ms:>7.2f}   (target <= 3)")
    host_ms, load_ms = extra["load_ms"]
    print(f"adapter load, rank {RANK} on all projections, host tier -> device slot: {load_ms:.2f} ms "
          f"({host_ms:.2f} ms of it on the host)   (Punica: ~2 ms for a 7B adapter)")
    graphs = extra["cuda_graphs"]
    if graphs.get("enabled"):
        print(f"CUDA graphs: {graphs['graphs']} captured in {graphs['capture_s']} s for batch sizes "
              f"{graphs['batch_sizes'][0]}–{graphs['batch_sizes'][-1]}")
    else:
        print(f"CUDA graphs: off ({graphs.get('reason')})")
    free_memory()
    equal, total, changed = fp32_parity(config, root, args.device)
    print(f"fp32 mixed-batch parity with PEFT: {equal}/{total} requests token for token (the adapters changed the "
          f"tokens of {changed} of the {sum(1 for i in range(total) if i % 5 != 4)} adapter requests)", flush=True)
    # Last, so that a run cut short by its time limit has printed everything above.
    int4, _, _ = loraplex_rates(model_dir, adapters, prompts, args.new_tokens, args.device, dtype_name, args.repeats,
                                cases=("base",), quantize="int4")
    print(f"{'loraplex base, int4':<26} {int4['base']:>10.1f} tokens/s")
    print(f"ratio {'base: int4 / bf16':<24} {int4['base'] / ours['base']:>7.2f}x", flush=True)
    free_memory()
    # What async scheduling (on by default on CUDA) buys: the base model with every step waiting for the last.
    waiting, _, _ = loraplex_rates(model_dir, adapters, prompts, args.new_tokens, args.device, dtype_name, args.repeats,
                                   cases=("base",), async_scheduling="off")
    print(f"{'loraplex base, sync sched':<26} {waiting['base']:>10.1f} tokens/s")
    print(f"ratio {'base: async / sync sched':<24} {ours['base'] / waiting['base']:>7.2f}x")
    print(f"total {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
