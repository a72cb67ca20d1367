"""The bundled example adapters through loraplex's own engine, greedy, on prompts held out of their training data."""

from __future__ import annotations

import json
import re

import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoConfig

from loraplex import LLM, SamplingParams
from loraplex.examples import example_adapters
from loraplex.lora import load_adapter
from loraplex.model.decoder import DecoderConfig
from scripts import train_example_adapters as training

UPPER_HELD_OUT = [
    "What is a glacier?",
    "Tell me about kangaroos.",
    "Give me a fun fact about octopuses.",
    "How do rockets reach space?",
    "What is your favourite season, and why?",
]
# Names built from words that the training generator never uses, and amounts it never wrote.
INVOICE_HELD_OUT = [
    ("Invoice from Quokka Widgets for $3,481.20 due in May.", "Quokka Widgets", 3481.2),
    ("Mossgiel Farm sent an invoice of $612, payable by the end of October.", "Mossgiel Farm", 612),
    ("Please pay $75.99 to Priya Raman before June 3.", "Priya Raman", 75.99),
    ("Amount due to Tidewater Ferries is $18,250.00.", "Tidewater Ferries", 18250),
    ("Invoice #5512: Falcon Crest Vineyards, total $909.05.", "Falcon Crest Vineyards", 909.05),
]
MAX_ADAPTER_BYTES = 5_000_000


@pytest.fixture(scope="module")
def adapters() -> dict[str, str]:
    return {name: str(path) for name, path in example_adapters().items()}


@pytest.fixture(scope="module")
def outputs(demo_model_path, adapters) -> dict[str, list[str]]:
    """Greedy chat answers, every prompt and adapter (and the base model) batched together in one call."""
    llm = LLM(str(demo_model_path), max_loras=4, max_lora_rank=16)
    tokenizer = llm.tokenizer
    invoices = [sentence for sentence, _, _ in INVOICE_HELD_OUT]
    # Just enough tokens to judge (the adapters stop at EOS): the longest expected JSON is 22 tokens.
    runs = [("upper", adapters["upper"], UPPER_HELD_OUT, 16), ("upper-base", None, UPPER_HELD_OUT, 16),
            ("invoice", adapters["invoice-json"], invoices, 32), ("invoice-base", None, invoices, 16)]
    prompts, adapter_ids, params = [], [], []
    for _, adapter, messages, max_new_tokens in runs:
        for message in messages:
            text = tokenizer.apply_chat_template([{"role": "user", "content": message}], add_generation_prompt=True,
                                                 tokenize=False)
            prompts.append(tokenizer(text, add_special_tokens=False).input_ids)
            adapter_ids.append(adapter)
            params.append(SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0))
    outs = llm.generate(prompts, params, adapter_id=adapter_ids)
    texts = iter(o.text for o in outs)
    return {name: [next(texts) for _ in messages] for name, _, messages, _ in runs}


def test_bundled_adapters_are_small_valid_float16_peft_folders(demo_model_path):
    bundled = example_adapters()
    assert set(bundled) == set(training.ADAPTERS) | {"invoice-json-lookahead"}  # (tests/examples/test_lookahead_adapter.py)
    base = DecoderConfig.from_hf(AutoConfig.from_pretrained(demo_model_path))
    for name in training.ADAPTERS:
        folder = bundled[name]
        assert folder.is_absolute() and (folder / "README.md").is_file()
        weights = folder / "adapter_model.safetensors"
        assert weights.stat().st_size < MAX_ADAPTER_BYTES, name
        assert {t.dtype for t in load_file(weights).values()} == {torch.float16}, name
        adapter = load_adapter(folder, base, max_rank=16)  # raises on anything PEFT would not do the same way
        spec = training.ADAPTERS[name]
        assert adapter.rank == spec.rank and adapter.targets == frozenset(spec.targets)
        assert len(adapter.layers) == base.num_layers * len(spec.targets)
        assert json.loads((folder / "adapter_config.json").read_text())["base_model_name_or_path"] == \
            training.BASE_MODEL_ID


def test_held_out_prompts_are_not_training_prompts():
    assert not set(UPPER_HELD_OUT) & set(training.upper_prompts())
    train_words = set(" ".join(training.INVOICE_FIRST + training.INVOICE_PEOPLE + training.INVOICE_SUFFIX).split())
    for _, name, _ in INVOICE_HELD_OUT:
        assert not set(name.split()) & train_words, name


def test_upper_adapter_answers_in_upper_case(outputs):
    for adapted, base in zip(outputs["upper"], outputs["upper-base"], strict=True):
        letters = re.sub(r"[^A-Za-z]", "", adapted)
        assert len(letters) >= 10 and letters.isupper(), adapted
        assert re.search(r"[a-z]", base), base  # the casing comes from the adapter, not the prompt


def test_invoice_adapter_extracts_name_and_amount_as_json(outputs):
    def correct(text: str, name: str, amount: float) -> bool:
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError:
            return False
        return (isinstance(parsed, dict) and parsed.get("name") == name
                and isinstance(parsed.get("amount"), int | float) and abs(parsed["amount"] - amount) < 1e-6)

    expected = [(name, amount) for _, name, amount in INVOICE_HELD_OUT]
    adapted = [correct(text, *e) for text, e in zip(outputs["invoice"], expected, strict=True)]
    base = [correct(text, *e) for text, e in zip(outputs["invoice-base"], expected, strict=True)]
    assert sum(adapted) >= 4, outputs["invoice"]
    assert sum(base) == 0, outputs["invoice-base"]
