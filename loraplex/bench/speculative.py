"""Speculative decoding, side by side in one run (issue 18): the same requests with and without drafts.

    python -m loraplex.bench.speculative [--model demo] [--tokens 5] [--requests 16] [--batch 32]
                                         [--warmup 8] [--repeats 3]

Workload (a), extraction: the bundled `invoice-json` adapter turning invoice sentences (generated here,
seeded, with names and amounts of their own) into JSON, greedy, up to 40 new tokens, drafts by `ngram`
(prompt lookup, then the adapter's earlier answers). Each engine first serves `--warmup` requests, as a
server that has served the adapter before has (the drafts' adapter history). Then:

- batch 1: `--requests` requests one after another; mean latency per request (prompt included) and
  generated tokens per second;
- batch `--batch`: that many requests at once; generated tokens per second.

Both engines stay loaded, the repeats go round-robin over them, the medians are compared, and the outputs
are checked to be the same token for token. Workload (b), a lookahead (Medusa) adapter, needs an adapter
that carries Medusa heads; loraplex has none yet, so the benchmark says so.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from typing import Any

TEMPLATES = [
    "Invoice from {name} for {amount} due in {month}.",
    "Please pay {amount} to {name} before {month} {day}.",
    "{name} billed us {amount} for the {month} delivery.",
    "Amount owed to {name}: {amount}, reference {ref}.",
    "Reminder: {name} is waiting for {amount} since {month}.",
]
FIRST = ["Harbour", "Juniper", "Copperfield", "Northwind", "Blue Heron", "Saltmarsh", "Ironbark", "Larkspur",
         "Maple Ridge", "Silverline", "Tamarind", "Westbrook"]
SUFFIX = ["Bakery", "Logistics", "Studio", "Hardware", "Dental", "Printing", "Farms", "Analytics"]
PEOPLE = ["Anika Sorensen", "Tomasz Wilk", "Leilani Kahale", "Oscar Mbeki", "Ines Carvalho", "Rafael Ortiz"]
MONTHS = ["January", "March", "April", "July", "September", "November"]


def invoice_sentences(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        name = rng.choice(PEOPLE) if rng.random() < 0.3 else f"{rng.choice(FIRST)} {rng.choice(SUFFIX)}"
        value = rng.choice([rng.randrange(5, 999), rng.randrange(1000, 99999)]) + rng.choice([0, 0.5, 0.99, 0.25])
        amount = rng.choice([f"${value:,.2f}", f"${value:.2f}", f"{value:.2f} USD"])
        out.append(rng.choice(TEMPLATES).format(name=name, amount=amount, month=rng.choice(MONTHS),
                                                day=rng.randrange(1, 29), ref=rng.randrange(1000, 9999)))
    return out


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="demo")
    ap.add_argument("--tokens", type=int, default=5, help="--speculative-tokens of the engine with drafts")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--warmup", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args(argv)
    from loraplex import LLM, SamplingParams
    from loraplex.examples import example_adapters

    adapter = str(example_adapters()["invoice-json"])
    options: dict[str, Any] = dict(device="cpu", max_loras=1, max_lora_rank=8)
    engines = {"plain": LLM(args.model, **options),
               "ngram": LLM(args.model, speculative_tokens=args.tokens, **options)}
    tokenizer = engines["plain"].tokenizer
    sentences = invoice_sentences(args.warmup + args.requests + args.batch)

    def prompt(sentence: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentence}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[no-any-return]

    prompts = [prompt(s) for s in sentences]
    warmup, solo = prompts[:args.warmup], prompts[args.warmup:args.warmup + args.requests]
    batch = prompts[args.warmup + args.requests:]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    for llm in engines.values():
        llm.generate(warmup, params, adapter_id=[adapter] * len(warmup))
    latency: dict[str, list[float]] = {}
    solo_rate: dict[str, list[float]] = {}
    batch_rate: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    for _ in range(args.repeats):
        for name, llm in engines.items():
            start, n, got = time.perf_counter(), 0, []
            for p in solo:
                out = llm.generate([p], params, adapter_id=[adapter])[0]
                n += len(out.token_ids)
                got.append(out.token_ids)
            elapsed = time.perf_counter() - start
            latency.setdefault(name, []).append(1000 * elapsed / len(solo))
            solo_rate.setdefault(name, []).append(n / elapsed)
            start = time.perf_counter()
            outs = llm.generate(batch, params, adapter_id=[adapter] * len(batch))
            batch_rate.setdefault(name, []).append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
            tokens[name] = got + [o.token_ids for o in outs]
    same = tokens["plain"] == tokens["ngram"]
    spec = engines["ngram"].engine
    print(f"model {args.model}, adapter invoice-json, {len(solo)} requests at batch 1 and {len(batch)} at once, "
          f"greedy, up to 40 new tokens; drafts: ngram, {args.tokens} tokens, speculation while <= "
          f"{spec.config.scheduler.speculative_max_batch} requests run")
    print(f"drafts: {spec.draft_tokens} proposed, {spec.accepted_tokens} accepted "
          f"({100 * spec.accepted_tokens / max(1, spec.draft_tokens):.0f} %), mean accepted per verifying step "
          f"{spec.accepted_tokens / max(1, spec.verify_steps):.2f}; outputs identical: {'yes' if same else 'NO'}")
    med = {k: {n: statistics.median(v) for n, v in d.items()} for k, d in
           (("latency", latency), ("solo", solo_rate), ("batch", batch_rate))}
    for name in engines:
        print(f"{name:>6}: batch 1 {med['latency'][name]:7.1f} ms/request {med['solo'][name]:7.1f} tok/s"
              f"   batch {len(batch)} {med['batch'][name]:7.1f} tok/s")
    print(f"(a) extraction, n-gram: batch 1 tok/s {med['solo']['ngram'] / med['solo']['plain']:.2f}x "
          f"(target >= 2x), latency {med['latency']['ngram'] / med['latency']['plain']:.2f}x; "
          f"batch {len(batch)} tok/s {med['batch']['ngram'] / med['batch']['plain']:.2f}x (target >= 0.95x)")
    print("(b) lookahead (Medusa) adapter: not available (no adapter with Medusa heads is served yet)")


if __name__ == "__main__":
    main()
