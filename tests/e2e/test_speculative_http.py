"""Speculative decoding over HTTP with the published clients: a server with n-gram drafts answers the
invoice-json adapter's requests exactly as the offline engine without speculation does, streamed and not,
and reports its drafts in /info and /metrics."""

from __future__ import annotations

import httpx
import openai
import pytest

from loraplex import LLM, SamplingParams
from loraplex.examples import example_adapters
from tests.e2e.clients_venv import run_client_script
from tests.e2e.conftest import start_server
from tests.examples.test_example_adapters import INVOICE_HELD_OUT

LORAX_SCRIPT = r'''
import json, sys
from lorax import Client

url, prompts = sys.argv[1], json.loads(sys.argv[2])
c = Client(url, timeout=120)
out = []
for prompt in prompts:
    whole = c.generate(prompt, max_new_tokens=40, adapter_id="invoice-json", details=True)
    events = list(c.generate_stream(prompt, max_new_tokens=40, adapter_id="invoice-json"))
    out.append({"text": whole.generated_text, "ids": [t.id for t in whole.details.tokens],
                "stream": "".join(e.token.text for e in events if not e.token.special),
                "stream_ids": [e.token.id for e in events]})
print(json.dumps(out))
'''


@pytest.fixture(scope="module")
def spec_server(demo_model_path):
    adapters = {"invoice-json": example_adapters()["invoice-json"]}
    thread, running = start_server(adapters, max_loras=2, max_lora_rank=8, speculative_tokens=5)
    try:
        yield running
    finally:
        thread.stop()


def test_clients_get_what_decoding_without_drafts_gives(spec_server, demo_model_path):
    plain = LLM(str(demo_model_path), max_loras=2, max_lora_rank=8)
    adapter = str(example_adapters()["invoice-json"])
    messages = [[{"role": "user", "content": sentence}] for sentence, _, _ in INVOICE_HELD_OUT]
    params = SamplingParams(max_new_tokens=40, temperature=0.0)
    want = [plain.chat(m, params, adapter_id=adapter)[0] for m in messages]

    client = openai.OpenAI(base_url=spec_server.url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for m, w in zip(messages, want, strict=True):
        chat = client.chat.completions.create(model="invoice-json", messages=m, temperature=0, max_tokens=40)
        assert chat.choices[0].message.content == w.text
        assert chat.usage.completion_tokens == len(w.token_ids)
        chunks = client.chat.completions.create(model="invoice-json", messages=m, temperature=0, max_tokens=40,
                                                stream=True)
        assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == w.text

    tokenizer = plain.tokenizer
    prompts = [tokenizer.apply_chat_template(m, add_generation_prompt=True, tokenize=False) for m in messages]
    got = run_client_script(LORAX_SCRIPT, spec_server.url, __import__("json").dumps(prompts))
    for g, w in zip(got, want, strict=True):
        assert g["text"] == g["stream"] == w.text
        assert g["ids"] == g["stream_ids"] == w.token_ids

    before = httpx.get(spec_server.url + "/info").json()["speculative"]["draft_tokens"]
    declined = httpx.post(spec_server.url + "/generate", json={"inputs": prompts[0], "parameters": {
        "adapter_id": "invoice-json", "max_new_tokens": 40, "speculate": False}}, timeout=120)
    assert declined.status_code == 200 and declined.json()["generated_text"] == want[0].text
    chat = client.chat.completions.create(model="invoice-json", messages=messages[0], temperature=0, max_tokens=40,
                                          extra_body={"speculate": False})
    assert chat.choices[0].message.content == want[0].text
    info = httpx.get(spec_server.url + "/info").json()["speculative"]
    assert info["draft_tokens"] == before  # the two requests that declined drafted nothing
    assert info["method"] == "ngram" and info["tokens"] == 5
    assert info["accepted_tokens"] > info["verify_steps"] > 0  # more than a token saved per verifying step
    metrics = httpx.get(spec_server.url + "/metrics").text
    accepted = [line for line in metrics.splitlines()
                if line.startswith('loraplex_speculative_accepted_tokens_total{adapter="invoice-json"}')]
    assert accepted and float(accepted[0].split()[-1]) > 0


@pytest.fixture(scope="module")
def medusa_server(demo_model_path, tmp_path_factory):
    """Medusa drafts; the lookahead adapter, and a copy of it whose config.json promises five heads."""
    import json
    import shutil

    good = example_adapters()["invoice-json-lookahead"]
    bad = tmp_path_factory.mktemp("bad-medusa") / "five-heads"
    shutil.copytree(good, bad)
    config = json.loads((bad / "config.json").read_text())
    (bad / "config.json").write_text(json.dumps({**config, "medusa_num_heads": 5}))
    thread, running = start_server({"invoice-json-lookahead": good, "five-heads": bad}, max_loras=2,
                                   max_lora_rank=8, speculative_tokens=4, speculative_method="medusa")
    try:
        yield running
    finally:
        thread.stop()


def test_medusa_server_serves_the_lookahead_adapter_and_refuses_bad_heads(medusa_server, demo_model_path):
    url = medusa_server.url
    bad = httpx.post(url + "/generate", json={"inputs": "Invoice from Kestrel Kites for $90.", "parameters": {
        "adapter_id": "five-heads", "max_new_tokens": 8}}, timeout=120)
    assert bad.status_code == 424, bad.text
    assert "missing 4.0.linear.bias" in bad.json()["error"]
    plain = LLM(str(demo_model_path), max_loras=1, max_lora_rank=8)
    client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    for sentence, _, _ in INVOICE_HELD_OUT:
        m = [{"role": "user", "content": sentence}]
        want = plain.chat(m, SamplingParams(max_new_tokens=40, temperature=0.0),
                          adapter_id=str(example_adapters()["invoice-json"]))[0]
        chat = client.chat.completions.create(model="invoice-json-lookahead", messages=m, temperature=0,
                                              max_tokens=40)
        assert chat.choices[0].message.content == want.text
    info = httpx.get(url + "/info").json()["speculative"]
    assert info["method"] == "medusa" and info["accepted_tokens"] > 0
    assert httpx.get(url + "/health").status_code == 200
