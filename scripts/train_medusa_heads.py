"""Train Medusa heads for the bundled `invoice-json` adapter and ship them as the `invoice-json-lookahead`
adapter (the LoRA and the heads in one folder), on CPU in about 14 minutes.

    python scripts/train_medusa_heads.py [--heads 4] [--steps 2000] [--sentences 1500]
                                         [--out loraplex/examples/adapters]

Self-distillation, Medusa-1 style (Cai et al., 2024): the base model and the LoRA stay frozen; the heads
learn to predict what the adapter itself writes. The script

1. generates invoice sentences of many phrasings with made-up names (`varied_invoices`: the vocabulary's
   capitalised words, alone, paired or compounded; loraplex.bench.speculative's templates and names are
   held out) and the adapter's own greedy answers to them through loraplex's offline API;
2. runs the demo model with the LoRA (HF transformers + PEFT) over prompt + answer once, keeping the
   final (normed) hidden state h_t of every position from the prompt's last token on;
3. trains head i (version 2 of LoRAX's format: one residual block h + SiLU(W_i h + b_i), zero-initialised,
   read through the model's own LM head) to predict token t + 2 + i from h_t, with a cross-entropy over a
   sampled part of the vocabulary: every token the answers use plus 2,048 others drawn afresh each step
   (the full 49,152-token softmax would take an hour on a CPU; the others keep unseen tokens down);
4. writes `config.json` and `medusa_lm_head.safetensors` (float16) beside a copy of the LoRA's files.

The held-out check is tests/examples/test_lookahead_adapter.py (acceptance through loraplex's engine, with
the full vocabulary).
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import time
from pathlib import Path
from typing import Any

import torch
from peft import PeftModel
from safetensors.torch import save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from loraplex import LLM, SamplingParams  # noqa: E402
from loraplex.bench.speculative import FIRST, PEOPLE, SUFFIX  # noqa: E402
from loraplex.paths import resolve_model  # noqa: E402
from scripts.train_example_adapters import BASE_MODEL_ID, MONTHS, OUT_DIR, invoice_amount  # noqa: E402

SEED = 1
NAME = "invoice-json-lookahead"
NEGATIVES = 2048

# ---------------------------------------------------------------- varied training sentences


HELD_OUT_WORDS = frozenset(w for name in (*FIRST, *SUFFIX, *PEOPLE) for w in name.split())
"""loraplex.bench.speculative's names: the heads never see them, so that the benchmark measures heads on
names they have not learnt."""

LEADS = ("", "", "", "Hi, ", "FYI: ", "Note: ", "Accounts payable: ", "Hello team, ", "Urgent: ", "Quick one: ")
TAILS = ("", "", "", " Thanks.", " Please confirm.", " See attached.", " Net 30.", " Ref {number}.",
         " Call us with questions.", " Regards, accounting.")
PHRASES = (
    "{name} sent an invoice of {amount}, payable by the end of {month}.",
    "We received a bill from {name}: {amount} for services rendered in {month}.",
    "Invoice #{number}: {name}, total {amount}.",
    "Amount due to {name} is {amount}.",
    "{name} billed us {amount} on {month} {day}.",
    "Payment request: {amount} owed to {name}, invoice {number}.",
    "{name} charged {amount} for the {month} order.",
    "Bill #{number} from {name} comes to {amount}.",
    "Outstanding balance with {name}: {amount}.",
    "Transfer {amount} to {name} by {month} {day}, please.",
    "{name} asks for {amount} for work done in {month}.",
    "Our supplier {name} invoiced {amount} last {month}.",
    "Statement from {name}: {amount} due on {month} {day}.",
    "The {month} invoice of {name} totals {amount}.",
    "{amount} is owed to {name} (invoice {number}).",
    "Pay {name} {amount} for invoice {number}.",
    "{name} is owed {amount} as of {month} {day}.",
    "Received invoice {number} from {name} for {amount}.",
    "Settle {amount} with {name} before the end of {month}.",
    "Vendor: {name}. Total due: {amount}. Due date: {month} {day}.",
    "{name} expects payment of {amount} by {month}.",
    "Remit {amount} to {name}; invoice dated {month} {day}.",
)
ENDINGS = ("field", "wood", "brook", "stone", "ridge", "ford", "well", "worth", "dale", "haven", "gate", "water",
           "land", "port", "view", "side", "hill", "crest", "light", "bridge", "mill", "moor", "vale", "wick")
SUFFIXES = ("Corp", "Inc.", "Ltd", "LLC", "Co.", "Group", "Industries", "Labs", "& Sons", "GmbH", "Partners",
            "Consulting", "Plumbing", "Studios", "Supply", "Foods", "Motors", "Design", "Systems", "Garden",
            "Builders", "Electric", "Clinic", "Media", "Traders", "Textiles", "Ventures", "Works", "Catering")


def _capitalised(tokenizer: Any) -> list[str]:
    """The capitalised whole words of the tokenizer's vocabulary (one token each, as "ĠWord"), 7,000 or so."""
    words = (piece[1:] for piece in tokenizer.get_vocab() if piece.startswith("Ġ"))
    return sorted(w for w in words if len(w) >= 4 and w.isascii() and w.isalpha() and w[0].isupper()
                  and w[1:].islower() and w not in HELD_OUT_WORDS)


def varied_invoices(rng: random.Random, n: int, tokenizer: Any) -> list[str]:
    """Invoice sentences of many phrasings, names made up from the vocabulary's words (single words, two
    words, compounds like "Copperfield", people's names) and amounts in several notations: the heads have
    to learn how an answer follows the request rather than a list of names."""
    upper = _capitalised(tokenizer)

    def made_up() -> str:
        if rng.random() < 0.25:
            return f"{rng.choice(upper)} {rng.choice(upper)}"  # a person
        first = rng.choice(upper) if rng.random() < 0.6 else rng.choice(upper) + rng.choice(ENDINGS)
        if rng.random() < 0.3:
            first += f" {rng.choice(upper)}"
        return f"{first} {rng.choice(SUFFIXES)}" if rng.random() < 0.8 else first

    def name() -> str:
        while HELD_OUT_WORDS & set((chosen := made_up()).split()):
            pass
        return chosen

    out = []
    for _ in range(n):
        written, _ = invoice_amount(rng)
        if rng.random() < 0.2:
            written = f"{written.removeprefix('$').removesuffix(' USD')} dollars"
        sentence = (rng.choice(LEADS) + rng.choice(PHRASES) + rng.choice(TAILS)).format(
            name=name(), amount=written, month=rng.choice(MONTHS), day=rng.randrange(1, 29),
            number=rng.randrange(100, 99999))
        out.append(sentence)
    return out


def answers(sentences: list[str], adapter: Path) -> list[list[int]]:
    """The adapter's greedy answers (token ids, EOS included), as loraplex serves them."""
    llm = LLM("demo", max_loras=1, max_lora_rank=8)
    outs = llm.chat([[{"role": "user", "content": s}] for s in sentences], SamplingParams(max_new_tokens=48,
                                                                                          temperature=0.0),
                    adapter_id=str(adapter))
    return [o.token_ids for o in outs]


def prompt_ids(tokenizer: Any, sentence: str) -> list[int]:
    """The chat-templated user turn `sentence` with the generation prompt, as the engine reads it."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": sentence}], add_generation_prompt=True,
                                         tokenize=False)
    return tokenizer(text, add_special_tokens=False).input_ids  # type: ignore[no-any-return]


def hidden_states(base_path: Path, adapter: Path, prompts: list[list[int]], outputs: list[list[int]],
                  heads: int) -> tuple[torch.Tensor, torch.Tensor]:
    """h_t for every position t from each prompt's last token to its answer's second-to-last token, and the
    targets [positions, heads]: token t + 2 + i for head i (-100 past the answer's end)."""
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32),
                                      str(adapter)).eval()
    inner = model.get_base_model().model  # the LlamaModel: its output is after the final norm
    xs, ys = [], []
    with torch.no_grad():
        for prompt, output in zip(prompts, outputs, strict=True):
            ids = prompt + output
            h = inner(input_ids=torch.tensor([ids])).last_hidden_state[0]  # [len, hidden]
            first = len(prompt) - 1  # this position picked the answer's first token
            for t in range(first, len(ids) - 2):
                xs.append(h[t])
                ys.append([ids[t + 2 + i] if t + 2 + i < len(ids) else -100 for i in range(heads)])
    return torch.stack(xs), torch.tensor(ys)


def train(x: torch.Tensor, y: torch.Tensor, lm_head: torch.Tensor, heads: int, steps: int,
          batch: int, rng: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    hidden, vocab = x.shape[1], lm_head.shape[0]
    w = torch.zeros(heads, hidden, hidden, requires_grad=True)
    b = torch.zeros(heads, hidden, requires_grad=True)
    optimizer = torch.optim.AdamW([w, b], lr=2e-3, weight_decay=0.0)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / steps)
    used = torch.unique(y[y >= 0])
    start = time.perf_counter()
    for step in range(steps):
        rows = torch.randint(0, x.shape[0], (batch,), generator=rng)
        others = torch.randint(0, vocab, (NEGATIVES,), generator=rng)
        candidates = torch.unique(torch.cat([used, others]))  # sorted
        table = lm_head[candidates]  # [c, hidden]
        position = torch.searchsorted(candidates, y[rows].clamp(min=0))  # [batch, heads] targets' columns
        position[y[rows] < 0] = -100
        h = x[rows]  # [batch, hidden]
        shifted = h.unsqueeze(0) + torch.nn.functional.silu(torch.einsum("bh,koh->kbo", h, w) + b[:, None])
        logits = shifted @ table.T  # [heads, batch, c]
        loss = sum(torch.nn.functional.cross_entropy(logits[i], position[:, i], ignore_index=-100) * 0.8 ** i
                   for i in range(heads))
        optimizer.zero_grad()
        loss.backward()  # type: ignore[union-attr]
        optimizer.step()
        schedule.step()
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step + 1}/{steps} loss {loss.item():.3f} ({time.perf_counter() - start:.0f} s)", flush=True)
    return w.detach(), b.detach()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--heads", type=int, default=4)
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--batch", type=int, default=512)
    parser.add_argument("--sentences", type=int, default=1500)
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(SEED)
    lora = args.out / "invoice-json"
    base_path = resolve_model("demo")
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    sentences = varied_invoices(random.Random(f"{SEED}-medusa"), args.sentences, tokenizer)
    start = time.perf_counter()
    outputs = answers(sentences, lora)
    prompts = [prompt_ids(tokenizer, s) for s in sentences]
    print(f"{len(sentences)} answers ({time.perf_counter() - start:.0f} s), e.g. {sentences[0]!r} -> "
          f"{tokenizer.decode(outputs[0])!r}", flush=True)
    x, y = hidden_states(base_path, lora, prompts, outputs, args.heads)
    print(f"{x.shape[0]} positions ({time.perf_counter() - start:.0f} s)", flush=True)
    lm_head = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32).get_output_embeddings().weight
    w, b = train(x, y, lm_head.detach(), args.heads, args.steps, args.batch, torch.Generator().manual_seed(SEED))

    folder = args.out / NAME
    folder.mkdir(parents=True, exist_ok=True)
    for name in ("adapter_config.json", "adapter_model.safetensors"):
        shutil.copyfile(lora / name, folder / name)
    tensors = {}
    for i in range(args.heads):
        tensors[f"{i}.0.linear.weight"] = w[i].to(torch.float16).contiguous()
        tensors[f"{i}.0.linear.bias"] = b[i].to(torch.float16).contiguous()
    save_file(tensors, str(folder / "medusa_lm_head.safetensors"), metadata={"format": "pt"})
    config = {"base_model_name_or_path": BASE_MODEL_ID, "medusa_num_heads": args.heads, "medusa_num_layers": 1,
              "version": 2, "hidden_size": x.shape[1], "vocab_size": lm_head.shape[0]}
    (folder / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    size = sum(p.stat().st_size for p in folder.iterdir())
    print(f"saved {folder} ({size / 1e6:.1f} MB) in {time.perf_counter() - start:.0f} s", flush=True)


if __name__ == "__main__":
    main()
