"""Train the example LoRA adapters bundled in `loraplex/examples/adapters/` on the demo model.

    python scripts/train_example_adapters.py [--only upper] [--out loraplex/examples/adapters]

Every adapter learns from data this script generates itself, seeded, so a rerun on the same
software gives the same files:

- `upper`: answers in UPPER CASE. The answers are the demo model's own greedy chat answers (through
  loraplex's offline API), cut to whole sentences and upper-cased, so the adapter learns the casing
  and little else.
- `invoice-json`: turns an invoice sentence ("Invoice from Acme Corp for $1,234.50 due in March.")
  into `{"name": "Acme Corp", "amount": 1234.5}`, over generated names, amounts and sentence templates.

Training is a plain AdamW loop on CPU (float32), loss on the answer tokens only (the chat template's
prompt part is masked), and the weights are saved in float16.
"""

from __future__ import annotations

import argparse
import json
import random
import re
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, AutoTokenizer

from loraplex import LLM, SamplingParams
from loraplex.paths import resolve_model

SEED = 0
OUT_DIR = Path(__file__).resolve().parent.parent / "loraplex" / "examples" / "adapters"
BASE_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
IGNORE = -100  # label value that cross_entropy skips: prompt and padding positions


@dataclass(frozen=True)
class Example:
    """One chat turn: the user's message and the answer the adapter should give."""

    user: str
    answer: str


@dataclass(frozen=True)
class AdapterSpec:
    name: str
    summary: str
    build: Callable[[random.Random], list[Example]]
    rank: int = 8
    alpha: int = 16
    targets: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "down_proj")
    steps: int = 150
    batch_size: int = 8
    lr: float = 1e-3


# ---------------------------------------------------------------- upper: the base model's answers, upper-cased

UPPER_TOPICS = (
    "the ocean", "volcanoes", "the moon", "honey bees", "rainbows", "the Roman Empire", "chess", "coffee",
    "electricity", "the internet", "dinosaurs", "music", "gardening", "the human heart", "penguins", "snow",
    "bicycles", "the Sun", "friendship", "libraries", "mountains", "trains", "bread", "clouds", "whales",
    "the Eiffel Tower", "photography", "recycling", "the desert", "owls", "tea", "football", "the brain",
    "earthquakes", "pizza", "the piano", "forests", "rivers", "the alphabet", "robots", "castles", "mathematics",
    "the weather", "butterflies", "sleep", "the Olympic Games", "maps", "glass", "cheese", "lighthouses",
)
UPPER_TEMPLATES = (
    "What is {t}?", "Tell me about {t}.", "Give me a fun fact about {t}.", "Why is {t} interesting?",
    "Describe {t} in one sentence.", "Write a short sentence about {t}.",
)
UPPER_EXTRA = (
    "Hi!", "Hello, how are you?", "What is your name?", "What is the capital of Italy?", "How many days are in a week?",
    "What color is the sky?", "Can you help me?", "Thank you!", "What is 2 plus 2?", "Say something nice.",
    "Good morning!", "Which is bigger, a cat or an elephant?", "What do plants need to grow?",
    "Name a fruit that is yellow.", "What language is spoken in Spain?", "How do I boil an egg?",
)
UPPER_MAX_ANSWER_TOKENS = 32


def upper_prompts() -> list[str]:
    """The user messages the `upper` adapter trains on (the test holds out prompts not in this list)."""
    return [t.format(t=topic) for topic in UPPER_TOPICS for t in UPPER_TEMPLATES] + list(UPPER_EXTRA)


def whole_sentences(text: str) -> str:
    """`text` up to its last sentence end, so a length-truncated answer still ends cleanly."""
    text = text.strip()
    ends = [m.end() for m in re.finditer(r"[.!?](?=\s|$)", text)]
    return text[:ends[-1]] if ends else text


def build_upper(rng: random.Random) -> list[Example]:
    prompts = upper_prompts()
    print(f"upper: generating {len(prompts)} base-model answers", flush=True)
    llm = LLM("demo")
    params = SamplingParams(max_new_tokens=UPPER_MAX_ANSWER_TOKENS, temperature=0.0)
    outs = llm.chat([[{"role": "user", "content": p}] for p in prompts], params)
    examples = [Example(p, whole_sentences(o.text).upper()) for p, o in zip(prompts, outs, strict=True)]
    del llm
    return [e for e in examples if e.answer]


# ---------------------------------------------------------------- invoice-json: templated sentences -> JSON

INVOICE_FIRST = (
    "Acme", "Globex", "Initech", "Umbrella", "Stark", "Wayne", "Wonka", "Hooli", "Vandelay", "Soylent", "Cyberdyne",
    "Tyrell", "Aperture", "Oscorp", "Gringotts", "Blue River", "Northwind", "Contoso", "Fabrikam", "Pied Piper",
    "Silver Oak", "Red Maple", "Golden Gate", "Green Valley", "Summit", "Pioneer", "Harbor", "Evergreen",
    "Lakeside", "Sunrise", "Ironwood", "Bluebird", "Redwood", "Crescent", "Atlas", "Nova", "Orion", "Zenith",
)
INVOICE_PEOPLE = (
    "Maria Lopez", "John Smith", "Aisha Khan", "Wei Chen", "Olga Petrova", "Tom Baker", "Lena Fischer",
    "Raj Patel", "Sofia Rossi", "Kenji Sato", "Emma Brown", "Lucas Martin", "Fatima Ali", "Noah Wilson",
)
INVOICE_SUFFIX = ("Corp", "Inc.", "Ltd", "LLC", "Co.", "Group", "Industries", "Labs", "& Sons", "GmbH", "Partners",
                  "Logistics", "Bakery", "Consulting", "Plumbing", "Studios")
INVOICE_TEMPLATES = (
    "Invoice from {name} for {amount} due in {month}.",
    "{name} sent an invoice of {amount}, payable by the end of {month}.",
    "Please pay {amount} to {name} before {month} {day}.",
    "We received a bill from {name}: {amount} for services rendered in {month}.",
    "Invoice #{number}: {name}, total {amount}.",
    "Amount due to {name} is {amount}.",
    "{name} billed us {amount} on {month} {day}.",
    "Payment request: {amount} owed to {name}, invoice {number}.",
)
MONTHS = ("January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
          "November", "December")


def invoice_name(rng: random.Random) -> str:
    if rng.random() < 0.2:
        return rng.choice(INVOICE_PEOPLE)
    return f"{rng.choice(INVOICE_FIRST)} {rng.choice(INVOICE_SUFFIX)}"


def invoice_amount(rng: random.Random) -> tuple[str, float]:
    """An amount as written in the sentence ("$1,234.50", "$87", "1234.50 USD") and its value."""
    cents = rng.choice((0, rng.randrange(1, 100)))
    dollars = int(10 ** rng.uniform(0, 5.5))
    value = dollars + cents / 100
    digits = f"{dollars:,}" if rng.random() < 0.7 else str(dollars)
    if cents or rng.random() < 0.3:
        digits += f".{cents:02d}"
    return (f"{digits} USD" if rng.random() < 0.15 else f"${digits}"), value


def invoice_json(name: str, value: float) -> str:
    """The answer: compact JSON, the amount as a number (an integer when it has no cents)."""
    amount: float | int = int(value) if value == int(value) else round(value, 2)
    return json.dumps({"name": name, "amount": amount})


def build_invoice(rng: random.Random, n: int = 400) -> list[Example]:
    examples = []
    for _ in range(n):
        name = invoice_name(rng)
        written, value = invoice_amount(rng)
        sentence = rng.choice(INVOICE_TEMPLATES).format(name=name, amount=written, month=rng.choice(MONTHS),
                                                        day=rng.randrange(1, 29), number=rng.randrange(100, 99999))
        examples.append(Example(sentence, invoice_json(name, value)))
    return examples


ADAPTERS = {
    spec.name: spec for spec in (
        AdapterSpec("upper", "Answers in UPPER CASE.", build_upper, steps=120),
        AdapterSpec("invoice-json", 'Extracts {"name": ..., "amount": ...} JSON from an invoice sentence.',
                    build_invoice, steps=60),
    )
}


# ---------------------------------------------------------------- training


def encode(tokenizer: Any, example: Example) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated turn and their labels (IGNORE on the prompt part).

    The answer is tokenized on its own, after the generation prompt, exactly as the engine sees it
    while generating; the closing `<|im_end|>` (the model's EOS) is learned so the answer stops.
    """
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": example.user}], add_generation_prompt=True,
                                           tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False).input_ids
    answer_ids = tokenizer(example.answer, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return prompt_ids + answer_ids, [IGNORE] * len(prompt_ids) + answer_ids


def collate(batch: Sequence[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    width = max(len(ids) for ids, _ in batch)
    input_ids = torch.full((len(batch), width), pad_id)  # [batch, width]
    labels = torch.full((len(batch), width), IGNORE)  # [batch, width]
    mask = torch.zeros((len(batch), width), dtype=torch.long)  # [batch, width]
    for i, (ids, lab) in enumerate(batch):
        input_ids[i, :len(ids)] = torch.tensor(ids)
        labels[i, :len(lab)] = torch.tensor(lab)
        mask[i, :len(ids)] = 1
    return {"input_ids": input_ids, "labels": labels, "attention_mask": mask}


def train(spec: AdapterSpec, base_path: Path, out_dir: Path) -> Path:
    rng = random.Random(f"{SEED}-{spec.name}")
    examples = spec.build(rng)
    tokenizer = AutoTokenizer.from_pretrained(base_path)
    data = [encode(tokenizer, e) for e in examples]
    print(f"{spec.name}: {len(data)} examples, e.g. {examples[0].user!r} -> {examples[0].answer!r}", flush=True)

    torch.manual_seed(SEED)  # LoRA A matrices are initialised at random
    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    model = get_peft_model(base, LoraConfig(r=spec.rank, lora_alpha=spec.alpha, target_modules=list(spec.targets),
                                            lora_dropout=0.0, task_type="CAUSAL_LM"))
    model.train()
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=spec.lr, weight_decay=0.0)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1 - step / spec.steps)

    order: list[int] = []
    start = time.perf_counter()
    for step in range(spec.steps):
        if len(order) < spec.batch_size:  # a fresh shuffled pass over the data
            order += rng.sample(range(len(data)), len(data))
        batch = [data[i] for i in order[:spec.batch_size]]
        del order[:spec.batch_size]
        loss = model(**collate(batch, tokenizer.pad_token_id)).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad()
        if step % 10 == 0 or step == spec.steps - 1:
            print(f"{spec.name}: step {step + 1}/{spec.steps} loss {loss.item():.4f} "
                  f"({time.perf_counter() - start:.0f} s)", flush=True)

    folder = out_dir / spec.name
    folder.mkdir(parents=True, exist_ok=True)
    # Saved aside first: PEFT also writes a model-card template that would replace our README.md.
    with tempfile.TemporaryDirectory() as tmp:
        model.save_pretrained(tmp)
        _write_adapter(Path(tmp), folder)
    return folder


def _write_adapter(saved: Path, folder: Path) -> None:
    """PEFT's files, with float16 weights (half the size; loraplex computes in float32 anyway) and a
    config that names the public base model rather than this machine's cache path."""
    weights = load_file(saved / "adapter_model.safetensors")
    save_file({k: v.to(torch.float16).contiguous() for k, v in weights.items()},
              folder / "adapter_model.safetensors", metadata={"format": "pt"})
    config = json.loads((saved / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = BASE_MODEL_ID
    config["target_modules"] = sorted(config["target_modules"])  # PEFT saves a set, in hash order
    (folder / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=sorted(ADAPTERS), action="append", help="train only these adapters")
    parser.add_argument("--out", type=Path, default=OUT_DIR, help="folder that receives one folder per adapter")
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    base_path = resolve_model("demo")
    for name in args.only or sorted(ADAPTERS):
        folder = train(ADAPTERS[name], base_path, args.out)
        size = (folder / "adapter_model.safetensors").stat().st_size
        print(f"{name}: saved {folder} ({size / 1e6:.1f} MB)", flush=True)


if __name__ == "__main__":
    main()
