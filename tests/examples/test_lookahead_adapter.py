"""The bundled lookahead adapter (`invoice-json-lookahead`: the invoice-json LoRA with Medusa heads trained by
scripts/train_medusa_heads.py): its LoRA is invoice-json's, and its heads' drafts are accepted on held-out
invoices far more often than untrained heads' (through loraplex's engine, full vocabulary)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from loraplex import LLM, SamplingParams
from loraplex.examples import example_adapters
from loraplex.lora import load_adapter
from loraplex.model.decoder import DecoderConfig
from tests.examples.test_example_adapters import INVOICE_HELD_OUT

MORE_HELD_OUT = [  # names and amounts the training generator never writes
    "Kestrel Kites sent an invoice of $4,410.75, payable by the end of August.",
    "Please pay $129.40 to Ottoline Marsh before March 9.",
    "Invoice #7781: Bramblewood Pottery, total $2,006.00.",
    "Amount due to Halcyon Tiles is 845.10 USD.",
    "Wexford Sailcloth billed us $31,250 on July 14.",
]


def _acceptance(model_path, adapter: str) -> tuple[float, list[list[int]]]:
    """Accepted drafts per verifying step, heads only, over the held-out invoices at batch 1."""
    llm = LLM(str(model_path), max_loras=1, max_lora_rank=8, speculative_tokens=4, speculative_method="medusa",
              speculative_medusa_lookup=False)
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    outs = [llm.chat([{"role": "user", "content": s}], params, adapter_id=adapter)[0].token_ids
            for s in [s for s, _, _ in INVOICE_HELD_OUT] + MORE_HELD_OUT]
    engine = llm.engine
    assert engine.verify_steps > 0
    return engine.accepted_tokens / engine.verify_steps, outs


def test_lookahead_adapter_is_invoice_json_with_four_heads(demo_model_path):
    adapters = example_adapters()
    folder = adapters["invoice-json-lookahead"]
    base = DecoderConfig.from_hf(AutoConfig.from_pretrained(demo_model_path))
    weights = load_adapter(folder, base, max_rank=8)
    assert weights.medusa is not None and weights.medusa.num_heads == 4 and weights.medusa.out is None
    lora = load_adapter(adapters["invoice-json"], base, max_rank=8)
    assert weights.layers.keys() == lora.layers.keys()
    assert all(torch.equal(weights.layers[k].b, lora.layers[k].b) for k in lora.layers)
    config = json.loads((folder / "config.json").read_text())
    assert config["medusa_num_heads"] == 4 and config["medusa_num_layers"] == 1
    assert (folder / "README.md").is_file()
    assert sum(p.stat().st_size for p in folder.iterdir()) < 6_500_000


def test_trained_heads_are_accepted_on_held_out_invoices(demo_model_path, tmp_path):
    trained, outs = _acceptance(demo_model_path, str(example_adapters()["invoice-json-lookahead"]))
    # The same folder with every head zeroed: each head then proposes what the LM head would (the token
    # just picked, again), the heads' starting point before training.
    untrained = tmp_path / "untrained"
    shutil.copytree(example_adapters()["invoice-json-lookahead"], untrained)
    heads = untrained / "medusa_lm_head.safetensors"
    save_file({k: torch.zeros_like(v) for k, v in load_file(str(heads)).items()}, str(heads))
    baseline, same = _acceptance(demo_model_path, str(untrained))
    assert same == outs  # heads never change the output
    assert trained >= 0.8, trained  # measured 1.05 here (2026-12-02; 1.0 with the first heads)
    assert trained >= 4 * baseline, (trained, baseline)


@pytest.mark.parametrize("name", ["invoice-json-lookahead"])
def test_lookahead_adapter_output_equals_its_lora_alone(demo_model_path, name):
    llm = LLM(str(demo_model_path), max_loras=2, max_lora_rank=8)
    messages = [[{"role": "user", "content": s}] for s in MORE_HELD_OUT]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    adapters = example_adapters()
    a = [o.token_ids for o in llm.chat(messages, params, adapter_id=str(adapters[name]))]
    b = [o.token_ids for o in llm.chat(messages, params, adapter_id=str(adapters["invoice-json"]))]
    assert a == b
