"""The published clients, unchanged, against the real server: lorax-client and text-generation (TGI)."""

from __future__ import annotations

import json

import httpx
import pytest

from tests.e2e.clients_venv import run_client_script

PROMPT = "The capital of France is"

LORAX_SCRIPT = r'''
import asyncio, json, sys
from lorax import AsyncClient, Client
from lorax.errors import NotFoundError, ValidationError
from lorax.types import MergedAdapters

url, prompt = sys.argv[1], sys.argv[2]
c = Client(url, timeout=120)
out = {}
r = c.generate(prompt, max_new_tokens=10, details=True, adapter_id="qv8")
out["generate"] = {"text": r.generated_text, "ids": [t.id for t in r.details.tokens],
                   "logprobs": [t.logprob for t in r.details.tokens], "finish": r.details.finish_reason.value,
                   "generated_tokens": r.details.generated_tokens, "prompt_tokens": r.details.prompt_tokens}
base = c.generate(prompt, max_new_tokens=10)
out["base"] = base.generated_text
# As lorax-client documents it: merge_strategy and majority_sign_method left unset go out as null.
halves = MergedAdapters(ids=["qv8", "qv8"], weights=[0.5, 0.5], density=1.0)
out["merged"] = c.generate(prompt, max_new_tokens=10, merged_adapters=halves).generated_text
events = list(c.generate_stream(prompt, max_new_tokens=10, adapter_id="qv8", details=True))
out["stream"] = {"texts": [e.token.text for e in events], "ids": [e.token.id for e in events],
                 "final": events[-1].generated_text, "finish": events[-1].details.finish_reason.value}
sampled = c.generate(prompt, max_new_tokens=8, do_sample=True, temperature=0.7, top_k=40, top_p=0.9, seed=11,
                     repetition_penalty=1.1, stop_sequences=["\n"], return_k_alternatives=2, details=True)
out["sampled"] = {"text": sampled.generated_text, "seed": sampled.details.seed,
                  "alternatives": [len(t.alternative_tokens or []) for t in sampled.details.tokens]}
try:
    c.generate(prompt, adapter_id="nope")
    out["unknown"] = "served"
except NotFoundError as e:
    out["unknown"] = "NotFoundError: " + str(e)
try:
    c.generate(prompt, max_new_tokens=0)
    out["invalid"] = "served"
except ValidationError as e:
    out["invalid"] = "ValidationError: " + str(e)

async def run_async():
    ac = AsyncClient(url, timeout=120)
    r = await ac.generate(prompt, max_new_tokens=10, adapter_id="qv8")
    texts = [e.token.text async for e in ac.generate_stream(prompt, max_new_tokens=10, adapter_id="qv8")]
    return r.generated_text, "".join(texts)
out["async"] = list(asyncio.run(run_async()))
print(json.dumps(out))
'''

TGI_SCRIPT = r'''
import json, sys
from text_generation import Client
from text_generation.errors import ValidationError
from text_generation.types import Grammar, GrammarType

url, prompt = sys.argv[1], sys.argv[2]
c = Client(url, timeout=120)
out = {}
r = c.generate(prompt, max_new_tokens=10, top_n_tokens=2)
out["generate"] = {"text": r.generated_text, "ids": [t.id for t in r.details.tokens],
                   "finish": r.details.finish_reason.value, "top": [len(t) for t in r.details.top_tokens]}
events = list(c.generate_stream(prompt, max_new_tokens=10))
out["stream"] = {"texts": [e.token.text for e in events], "final": events[-1].generated_text}
best = c.generate(prompt, max_new_tokens=6, do_sample=True, best_of=2)
out["best_of"] = len(best.details.best_of_sequences or [])
schema = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 10}}, "required": ["city"],
          "additionalProperties": False}
out["grammar"] = c.generate(prompt, max_new_tokens=24, grammar=Grammar(type=GrammarType.Json, value=schema)).generated_text
try:
    c.generate(prompt, max_new_tokens=5, grammar=Grammar(type=GrammarType.Regex, value="[0-9]+"))
    out["regex"] = "served"
except ValidationError as e:
    out["regex"] = "ValidationError: " + str(e)
try:
    c.generate(prompt, max_new_tokens=5, frequency_penalty=9.0)
    out["invalid"] = "served"
except ValidationError as e:
    out["invalid"] = "ValidationError: " + str(e)
print(json.dumps(out))
'''


def native(server, **parameters) -> dict:
    return httpx.post(server.url + "/generate", json={"inputs": PROMPT, "parameters": parameters}, timeout=120).json()


def test_lorax_client(server):
    out = run_client_script(LORAX_SCRIPT, server.url, PROMPT)
    want = native(server, max_new_tokens=10, details=True, adapter_id="qv8")
    assert out["generate"]["text"] == want["generated_text"]
    assert out["generate"]["ids"] == [t["id"] for t in want["details"]["tokens"]]
    assert out["generate"]["logprobs"] == pytest.approx([t["logprob"] for t in want["details"]["tokens"]])
    assert out["generate"]["finish"] == "length" and out["generate"]["generated_tokens"] == 10
    assert out["base"] == native(server, max_new_tokens=10)["generated_text"] != want["generated_text"]
    assert out["merged"] == out["generate"]["text"]  # halves of one adapter merge back into it
    assert out["stream"]["final"] == "".join(out["stream"]["texts"]) == want["generated_text"]
    assert out["stream"]["ids"] == out["generate"]["ids"] and out["stream"]["finish"] == "length"
    assert out["sampled"]["seed"] == 11 and set(out["sampled"]["alternatives"]) == {2}
    assert out["unknown"].startswith("NotFoundError") and "nope" in out["unknown"]
    assert out["invalid"].startswith("ValidationError") and "max_new_tokens" in out["invalid"]
    assert out["async"] == [want["generated_text"], want["generated_text"]]


def test_text_generation_client(server):
    out = run_client_script(TGI_SCRIPT, server.url, PROMPT)
    want = native(server, max_new_tokens=10, details=True)
    assert out["generate"]["text"] == want["generated_text"]
    assert out["generate"]["ids"] == [t["id"] for t in want["details"]["tokens"]]
    assert out["stream"]["final"] == "".join(out["stream"]["texts"]) == want["generated_text"]
    assert out["generate"]["finish"] == "length" and out["generate"]["top"] == [2] * 10
    assert out["best_of"] == 1
    assert set(json.loads(out["grammar"])) == {"city"}
    assert out["regex"].startswith("ValidationError") and "regex" in out["regex"]
    assert out["invalid"].startswith("ValidationError") and "frequency_penalty" in out["invalid"]
