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

Workload (b), the same requests on the bundled `invoice-json-lookahead` adapter (the invoice-json LoRA
with Medusa heads trained by scripts/train_medusa_heads.py), drafts by `medusa`: the heads alone, and
the heads with prompt lookup first where the request's own tokens match (the default).

Every engine stays loaded; at batch 1 each request runs on every engine in turn, the batches go
round-robin over them (each repeat starting with the next engine); the medians over the repeats are compared with the engine without drafts, and the
outputs are checked to be the same token for token.
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

    adapters = example_adapters()
    extraction, lookahead = str(adapters["invoice-json"]), str(adapters["invoice-json-lookahead"])
    options: dict[str, Any] = dict(device="cpu", max_loras=1, max_lora_rank=8)
    k = args.tokens
    # name → (engine, the adapter its requests use); the lookahead adapter holds the invoice-json LoRA too.
    engines = {
        "plain": (LLM(args.model, **options), extraction),
        "ngram": (LLM(args.model, speculative_tokens=k, **options), extraction),
        "medusa": (LLM(args.model, speculative_tokens=k, speculative_method="medusa",
                       speculative_medusa_lookup=False, **options), lookahead),
        "medusa+lookup": (LLM(args.model, speculative_tokens=k, speculative_method="medusa", **options), lookahead),
    }
    tokenizer = engines["plain"][0].tokenizer
    sentences = invoice_sentences(args.warmup + args.requests + args.batch)

    def prompt(sentence: str) -> list[int]:
        text = tokenizer.apply_chat_template([{"role": "user", "content": sentence}], add_generation_prompt=True,
                                             tokenize=False)
        return tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[no-any-return]

    prompts = [prompt(s) for s in sentences]
    warmup, solo = prompts[:args.warmup], prompts[args.warmup:args.warmup + args.requests]
    batch = prompts[args.warmup + args.requests:]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    for llm, adapter in engines.values():
        llm.generate(warmup, params, adapter_id=[adapter] * len(warmup))
    latency: dict[str, list[float]] = {}
    solo_rate: dict[str, list[float]] = {}
    batch_rate: dict[str, list[float]] = {}
    tokens: dict[str, list[list[int]]] = {}
    names = list(engines)
    for repeat in range(args.repeats):
        # Batch 1 request by request, every engine in turn (the order rotating), so that the machine's drift
        # over a repeat weighs on every engine alike.
        elapsed = dict.fromkeys(names, 0.0)
        n = dict.fromkeys(names, 0)
        got: dict[str, list[list[int]]] = {name: [] for name in names}
        for i, p in enumerate(solo):
            for name in names[i % len(names):] + names[:i % len(names)]:
                llm, adapter = engines[name]
                start = time.perf_counter()
                out = llm.generate([p], params, adapter_id=[adapter])[0]
                elapsed[name] += time.perf_counter() - start
                n[name] += len(out.token_ids)
                got[name].append(out.token_ids)
        for name in names:
            latency.setdefault(name, []).append(1000 * elapsed[name] / len(solo))
            solo_rate.setdefault(name, []).append(n[name] / elapsed[name])
        for name in names[repeat % len(names):] + names[:repeat % len(names)]:  # each repeat starts elsewhere
            llm, adapter = engines[name]
            start = time.perf_counter()
            outs = llm.generate(batch, params, adapter_id=[adapter] * len(batch))
            batch_rate.setdefault(name, []).append(sum(len(o.token_ids) for o in outs) / (time.perf_counter() - start))
            tokens[name] = got[name] + [o.token_ids for o in outs]
    same = all(t == tokens["plain"] for t in tokens.values())
    print(f"model {args.model}, {len(solo)} invoice requests at batch 1 and {len(batch)} at once, greedy, up to 40 "
          f"new tokens, {k} draft tokens, speculation while <= "
          f"{engines['ngram'][0].engine.config.scheduler.speculative_max_batch} requests run; outputs identical: "
          f"{'yes' if same else 'NO'}")
    med = {kind: {n: statistics.median(v) for n, v in d.items()} for kind, d in
           (("latency", latency), ("solo", solo_rate), ("batch", batch_rate))}
    for name, (llm, _) in engines.items():
        e = llm.engine
        drafts = (f"   drafts {e.draft_tokens}, accepted {e.accepted_tokens} "
                  f"({100 * e.accepted_tokens / max(1, e.draft_tokens):.0f} %), "
                  f"{e.accepted_tokens / max(1, e.verify_steps):.2f} per verifying step" if e.drafter else "")
        print(f"{name:>13}: batch 1 {med['latency'][name]:6.1f} ms/request {med['solo'][name]:6.1f} tok/s   "
              f"batch {len(batch)} {med['batch'][name]:6.1f} tok/s{drafts}")

    def ratio(kind: str, name: str) -> float:
        return med[kind][name] / med[kind]["plain"]

    print(f"(a) extraction (invoice-json), n-gram: batch 1 {ratio('solo', 'ngram'):.2f}x tok/s (target >= 2x); "
          f"batch {len(batch)} {ratio('batch', 'ngram'):.2f}x (target >= 0.95x)")
    for name in ("medusa", "medusa+lookup"):
        print(f"(b) lookahead adapter (invoice-json-lookahead), {name}: batch 1 {ratio('solo', name):.2f}x tok/s "
              f"(target >= 1.8x); batch {len(batch)} {ratio('batch', name):.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
