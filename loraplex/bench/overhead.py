"""The engine's host cost per decode step: where a step's time goes when the tensor math is small.

    python -m loraplex.bench.overhead [--seqs 64 256] [--steps 32] [--adapters 8] [--async-output off on]

On a GPU the forward's kernels are queued asynchronously, so the host work of a step (scheduling,
building the inputs, sampling, post-processing and detokenizing) is the step once the kernels are fast.
This benchmark measures that host work on any machine: a tiny random Llama (one layer, 64 wide, a
512-token vocabulary with its own byte-level BPE tokenizer built with the `tokenizers` library) keeps
the tensor ops a small part of the step. For 64 and 256 running sequences, each case

    base greedy        every request on the base model, greedy
    lora greedy        request i uses adapter i % 8 (8 distinct rank-8 adapters on all projections)
    base sampled       temperature, top-k, top-p, repetition / frequency / presence penalties, seeds
    lora sampled       both

fills the batch (every request's prompt computed and its first token out), then times `--steps`
decode steps through `Engine.step` with a `StepTimer`, and prints per step (median over the steps, ms):
the wall time, the forward (tensor ops: the model and its LM head), the host time (wall − forward) and
the host time by phase (schedule, inputs, sample, post-process/detokenize). The last line is

    host ms per decode step at 256 sequences: X

the largest host median of the 256-sequence cases (shared/BENCHMARKS.md sets ≤ 2 ms as the target).
The model, its tokenizer and the adapters are built once into a cache folder (about a second).

`--async-output off on` runs every case in each mode of `--async-output` (the `async` column), one after
the other on the same engine; the last line is then the engine's default mode's. With async output the
outputs are made while the forward runs (on a CPU on a helper thread), so they count in the forward's
time, not the host's: compare the wall times.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import random
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from loraplex.engine.request import SamplingParams
from loraplex.engine.step_timer import NO_TIMER, PHASES, StepTimer
from loraplex.paths import loraplex_home

VOCAB = 512
MODEL: dict[str, Any] = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=1, num_attention_heads=4,
             num_key_value_heads=2, max_position_embeddings=4096, tie_word_embeddings=False)
ADAPTER_RANK = 8
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
PROMPT_TOKENS = 16
CORPUS = (
    "The quick brown fox jumps over the lazy dog while the cat sleeps in the warm afternoon sun. "
    "Adapters let one base model serve many tasks: a customer's support bot, a legal summarizer, a coder. "
    "Numbers like 3.14159, 2718 and 42 appear in text, as do symbols such as {, }, [, ], <, > and #. "
    "Café, naïve, façade, Zürich, São Paulo, Kraków, 東京, Αθήνα and emoji like 🙂 and 🚀 need several bytes. "
)
SAMPLED: dict[str, Any] = dict(temperature=0.8, top_k=50, top_p=0.9, repetition_penalty=1.1, frequency_penalty=0.2,
               presence_penalty=0.1)
FORMAT_VERSION = 1


def build_assets(root: Path, num_adapters: int) -> tuple[Path, list[Path]]:
    """The tiny model folder (config, random weights, tokenizer) and `num_adapters` PEFT LoRA folders,
    built once under `root` (the folder name hashes what decides their bytes)."""
    key = hashlib.sha256(json.dumps([MODEL, ADAPTER_RANK, TARGETS, CORPUS, FORMAT_VERSION]).encode()).hexdigest()[:12]
    folder = root / f"overhead-{key}"
    model_dir = folder / "model"
    adapters = [folder / f"adapter-{i}" for i in range(num_adapters)]
    if not (model_dir / "config.json").is_file():
        _build_model(model_dir)
    for i, path in enumerate(adapters):
        if not (path / "adapter_model.safetensors").is_file():
            _build_adapter(path, seed=i)
    return model_dir, adapters


def _build_model(path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoModelForCausalLM, LlamaConfig, PreTrainedTokenizerFast

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator([CORPUS] * 4, trainer)
    assert tokenizer.get_vocab_size() <= VOCAB, tokenizer.get_vocab_size()
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(LlamaConfig(**MODEL, architectures=["LlamaForCausalLM"]),
                                             dtype=torch.float32)
    model.generation_config.eos_token_id = None
    tmp = path.with_name(path.name + f".tmp{time.time_ns()}")
    model.save_pretrained(tmp)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<|endoftext|>").save_pretrained(tmp)
    tmp.rename(path)


def _build_adapter(path: Path, seed: int) -> None:
    from safetensors.torch import save_file

    hidden, inter = MODEL["hidden_size"], MODEL["intermediate_size"]
    kv = MODEL["num_key_value_heads"] * hidden // MODEL["num_attention_heads"]
    shapes = {"q_proj": (hidden, hidden), "k_proj": (hidden, kv), "v_proj": (hidden, kv), "o_proj": (hidden, hidden),
              "gate_proj": (hidden, inter), "up_proj": (hidden, inter), "down_proj": (inter, hidden)}
    generator = torch.Generator().manual_seed(seed)
    tensors = {}
    for layer in range(MODEL["num_hidden_layers"]):
        for name, (fan_in, fan_out) in shapes.items():
            block = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            prefix = f"base_model.model.model.layers.{layer}.{block}.{name}"
            tensors[f"{prefix}.lora_A.weight"] = torch.randn(ADAPTER_RANK, fan_in, generator=generator) * 0.1
            tensors[f"{prefix}.lora_B.weight"] = torch.randn(fan_out, ADAPTER_RANK, generator=generator) * 0.1
    tmp = path.with_name(path.name + f".tmp{time.time_ns()}")
    tmp.mkdir(parents=True)
    save_file(tensors, tmp / "adapter_model.safetensors")
    config = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": ADAPTER_RANK, "lora_alpha": 2 * ADAPTER_RANK,
              "target_modules": list(TARGETS)}
    (tmp / "adapter_config.json").write_text(json.dumps(config))
    tmp.rename(path)


@dataclass
class CaseResult:
    name: str
    seqs: int
    wall: float
    forward: float
    host: float
    phases: dict[str, float]
    steps: int


def run_case(llm: Any, name: str, seqs: int, steps: int, adapters: list[Path], sampled: bool) -> CaseResult:
    """Fill the batch with `seqs` requests, then time `steps` decode steps (medians, seconds)."""
    engine = llm.engine
    rng = random.Random(seqs)
    ids = []
    for i in range(seqs):
        params = SamplingParams(max_new_tokens=steps + 8, ignore_eos=True, seed=i,
                                **(SAMPLED if sampled else {"temperature": 0.0}))
        prompt = [rng.randrange(1, VOCAB) for _ in range(PROMPT_TOKENS)]
        request_id = f"{name}-{seqs}-{i}"
        engine.add_request(request_id, prompt, params, adapter_id=str(adapters[i % len(adapters)]) if adapters else None)
        ids.append(request_id)
    engine.wait_for_adapter_loads()
    running = engine.scheduler.running
    # Fill: every request computed its prompt and sampled a first token, so the next steps are pure decodes.
    while engine.scheduler.num_waiting or len(running) < seqs or not all(s.output_token_ids for s in running):
        engine.step()
    timer = StepTimer(sync=torch.cuda.synchronize if engine.runner.device.type == "cuda" else None)
    engine.timer = timer
    try:
        for _ in range(steps):
            engine.step()
    finally:
        engine.timer = NO_TIMER
        for request_id in ids:
            engine.abort(request_id)
    records = [r for r in timer.records if r.decode_only and r.num_seqs == seqs]
    if len(records) < steps:
        raise RuntimeError(f"{name}: only {len(records)} of {steps} steps were pure decodes of {seqs} sequences")
    return CaseResult(name, seqs, statistics.median(r.wall for r in records),
                      statistics.median(r.phases["forward"] for r in records),
                      statistics.median(r.host for r in records),
                      {p: statistics.median(r.phases[p] for r in records) for p in PHASES if p != "forward"},
                      len(records))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--seqs", type=int, nargs="+", default=[64, 256])
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--adapters", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--async-output", nargs="+", choices=["off", "on"], default=None,
                    help="async output modes to run each case in (default: the engine's own for this device)")
    ap.add_argument("--async-scheduling", nargs="+", choices=["off", "on"], default=None,
                    help="async scheduling modes to run each case in, with each async output mode (default: the "
                         "engine's own for this device)")
    args = ap.parse_args(argv)

    from loraplex import LLM

    model_dir, adapters = build_assets(loraplex_home() / "bench", args.adapters)
    most = max(args.seqs)
    llm = LLM(str(model_dir), device=args.device, max_num_seqs=most, max_num_batched_tokens=max(2048, most * 4),
              max_loras=args.adapters, max_lora_rank=ADAPTER_RANK, num_blocks=most * 8 + 64,
              enable_prefix_caching=True)
    print(f"host cost per decode step: 1-layer 64-wide Llama, vocab {VOCAB}, {args.adapters} adapters of rank "
          f"{ADAPTER_RANK}, device {llm.engine.runner.device}, torch threads {torch.get_num_threads()}; "
          f"median of {args.steps} decode steps, ms")
    engine = llm.engine
    default_mode = ("on" if engine.async_output else "off", "on" if engine.async_scheduling else "off")
    modes = [(o, s) for o in args.async_output or [default_mode[0]] for s in args.async_scheduling or [default_mode[1]]]
    print("async: async output / async scheduling")
    header = ["case", "seqs", "async", "wall", "forward", "host", *[p for p in PHASES if p != "forward"]]
    print("  ".join(f"{h:>14}" if i == 0 else f"{h:>11}" for i, h in enumerate(header)))
    worst: dict[tuple[int, tuple[str, str]], float] = {}
    for seqs in args.seqs:
        for name, use_adapters, sampled in (("base greedy", False, False), ("lora greedy", True, False),
                                            ("base sampled", False, True), ("lora sampled", True, True)):
            for mode in modes:
                engine.async_output, engine.async_scheduling = mode[0] == "on", mode[1] == "on"
                r = run_case(llm, name.replace(" ", "-"), seqs, args.steps, adapters if use_adapters else [], sampled)
                row = [r.wall, r.forward, r.host, *r.phases.values()]
                print(f"{name:>14}  {seqs:>11}  {'/'.join(mode):>11}  " + "  ".join(f"{v * 1e3:>11.2f}" for v in row),
                      flush=True)
                worst[seqs, mode] = max(worst.get((seqs, mode), 0.0), r.host)
    last = (256, default_mode) if default_mode in modes else (256, modes[-1])
    for (seqs, mode), host in worst.items():
        if (seqs, mode) != last:
            shown = f" (async output {mode[0]}, async scheduling {mode[1]})" if len(modes) > 1 else ""
            print(f"host ms per decode step at {seqs} sequences{shown}: {host * 1e3:.2f}")
    if last in worst:
        print(f"host ms per decode step at 256 sequences: {worst[last] * 1e3:.2f}")


if __name__ == "__main__":
    main()
