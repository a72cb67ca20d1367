"""The native LoRAX/TGI API over a real socket: outputs equal the offline engine's, wire format, errors."""

from __future__ import annotations

import json

import httpx
import pytest
import torch

from loraplex import SamplingParams, __version__
from loraplex.model import gemm

PROMPT = "The capital of France is"


def post(server, path: str, body: dict) -> httpx.Response:
    return httpx.post(server.url + path, json=body, timeout=120)


def sse_events(response: httpx.Response) -> list[dict]:
    return [json.loads(line[5:]) for line in response.text.splitlines() if line.startswith("data:")]


@pytest.mark.parametrize("adapter", [None, "qv8", "all16"])
def test_generate_equals_offline_engine(server, offline, adapter):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 12, "details": True, "ignore_eos_token": True, "adapter_id": adapter}})
    assert r.status_code == 200, r.text
    body = r.json()
    path = str(server.adapters[adapter]) if adapter else None
    want = offline.generate(PROMPT, SamplingParams(max_new_tokens=12, temperature=0, ignore_eos=True, logprobs=0),
                            adapter_id=path)[0]
    assert body["generated_text"] == want.text
    details = body["details"]
    assert [t["id"] for t in details["tokens"]] == want.token_ids
    assert [t["logprob"] for t in details["tokens"]] == pytest.approx([lp.logprob for lp in want.logprobs], abs=1e-4)
    assert "".join(t["text"] for t in details["tokens"]) == body["generated_text"]
    assert all(isinstance(t["special"], bool) for t in details["tokens"])  # TGI's field
    assert details["finish_reason"] == "length" and details["generated_tokens"] == 12
    assert details["prompt_tokens"] == len(offline.tokenizer(PROMPT).input_ids)


def test_adapters_change_the_output(server):
    texts = {a: post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "adapter_id": a}})
             .json()["generated_text"] for a in ("", "qv8", "all16")}
    assert len(set(texts.values())) == 3, texts


def test_stream_joins_to_the_same_text(server):
    body = {"inputs": PROMPT, "parameters": {"max_new_tokens": 10, "details": True, "adapter_id": "qv8"}}
    events = sse_events(post(server, "/generate_stream", body))
    whole = post(server, "/generate", body).json()
    assert len(events) == 10
    assert all(e["generated_text"] is None and e["details"] is None for e in events[:-1])
    assert events[-1]["generated_text"] == whole["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert events[-1]["details"] == {"finish_reason": "length", "prompt_tokens": whole["details"]["prompt_tokens"],
                                     "generated_tokens": 10, "seed": None}
    assert [e["token"]["id"] for e in events] == [t["id"] for t in whole["details"]["tokens"]]


def test_compat_route_answers_an_array_or_a_stream(server):
    one = post(server, "/", {"inputs": PROMPT, "parameters": {"max_new_tokens": 5}})
    assert one.status_code == 200 and isinstance(one.json(), list) and len(one.json()) == 1
    events = sse_events(post(server, "/", {"inputs": PROMPT, "stream": True, "parameters": {"max_new_tokens": 5}}))
    assert events[-1]["generated_text"] == one.json()[0]["generated_text"]


def test_stop_sequence_full_text_truncate_and_alternatives(server, offline):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 20, "stop": ["."], "details": True, "return_full_text": True, "truncate": 3,
        "return_k_alternatives": 3}}).json()
    assert r["details"]["finish_reason"] == "stop_sequence"
    assert r["details"]["prompt_tokens"] == 3
    assert r["generated_text"].startswith(PROMPT) and "." not in r["generated_text"][len(PROMPT):]
    for t in r["details"]["tokens"]:
        alts = t["alternative_tokens"]
        assert len(alts) == 3 and alts == sorted(alts, key=lambda a: -a["logprob"])
        assert alts[0]["logprob"] >= t["logprob"] - 1e-6


def test_seeded_sampling_and_best_of(server):
    params = {"max_new_tokens": 8, "do_sample": True, "temperature": 0.9, "top_p": 0.95, "seed": 7, "details": True}
    a = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    b = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    assert a == b and a["details"]["seed"] == 7
    best = post(server, "/generate", {"inputs": PROMPT, "parameters": {**params, "best_of": 3}}).json()
    others = best["details"]["best_of_sequences"]
    assert len(others) == 2
    total = sum(t["logprob"] for t in best["details"]["tokens"])
    assert all(total >= sum(t["logprob"] for t in o["tokens"]) for o in others)


BAD_PARAMETERS = [
    ({"temperature": -0.5}, "temperature"),
    ({"temperature": "hot"}, "temperature"),
    ({"top_k": 0}, "top_k"),
    ({"top_p": 1.5}, "top_p"),
    ({"top_p": 0}, "top_p"),
    ({"typical_p": 1.0}, "typical_p"),
    ({"repetition_penalty": 0}, "repetition_penalty"),
    ({"frequency_penalty": 3}, "frequency_penalty"),
    ({"presence_penalty": -2.5}, "presence_penalty"),
    ({"max_new_tokens": 0}, "max_new_tokens"),
    ({"max_new_tokens": 1.5}, "max_new_tokens"),
    ({"seed": -1}, "seed"),
    ({"stop": "x"}, "stop"),
    ({"stop": ["s"] * 17}, "stop"),
    ({"stop": [""]}, "stop"),
    ({"truncate": 0}, "truncate"),
    ({"best_of": 0}, "best_of"),
    ({"best_of": 2}, "best_of"),
    ({"best_of": 9, "do_sample": True}, "best_of"),
    ({"return_k_alternatives": 21}, "return_k_alternatives"),
    ({"adapter_source": "ftp"}, "adapter_source"),
    ({"details": "yes please"}, "details"),
    ({"adapter_id": "qv8", "merged_adapters": {"ids": ["a"], "weights": [1.0]}}, "adapter_id"),
    ({"max_new_tokens": 100000}, "tokens"),
]


@pytest.mark.parametrize(("params", "field"), BAD_PARAMETERS, ids=[str(p) for p, _ in BAD_PARAMETERS])
def test_bad_parameters_are_422(server, params, field):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": params})
    assert r.status_code == 422, r.text
    body = r.json()
    assert set(body) == {"error", "error_type"} and body["error_type"] == "validation"
    assert field in body["error"]


@pytest.mark.parametrize("body", [{}, {"inputs": ""}, {"inputs": 5}, {"inputs": PROMPT, "parameters": 3}])
def test_bad_bodies_are_422(server, body):
    r = post(server, "/generate", body)
    assert r.status_code == 422 and r.json()["error_type"] == "validation"


@pytest.mark.parametrize(("adapter", "status"), [("nope", 404), ("qv8/adapter_config.json", 404), ("../qv8", 422),
                                                 ("qv8/../../etc", 422), ("/etc", 422)])
def test_unknown_adapter_is_an_error_never_base_output(server, adapter, status):
    for path in ("/generate", "/generate_stream"):
        r = post(server, path, {"inputs": PROMPT, "parameters": {"adapter_id": adapter}})
        assert r.status_code == status, r.text
        kind = "adapter_not_found" if status == 404 else "validation"
        assert r.json()["error_type"] == kind and adapter in r.json()["error"]


def test_tokenize(server, offline):
    r = post(server, "/tokenize", {"inputs": PROMPT}).json()
    assert [t["id"] for t in r] == offline.tokenizer(PROMPT).input_ids
    assert "".join(t["text"] for t in r) == PROMPT
    assert all(PROMPT[t["start"]:t["stop"]] == t["text"] for t in r)


def test_health_info_metrics(server):
    assert httpx.get(server.url + "/health").json() == {"status": "ok"}
    assert httpx.get(server.url + "/ready").status_code == 200
    info = httpx.get(server.url + "/info").json()
    assert info["model_id"] == "SmolLM2-135M-Instruct" and info["model_dtype"] == "float32"
    assert info["max_best_of"] == 3 and info["max_total_tokens"] == 8192
    assert info["linear_backend"] == gemm.resolve("auto", torch.device("cpu"), torch.float32)
    assert info["attention_backend"] == "torch" and info["lora_backend"] in ("native", "torch")  # CPU defaults
    assert isinstance(info["async_output"], bool) and isinstance(info["async_scheduling"], bool)
    assert info["cuda_graphs"]["enabled"] is False and "CUDA graphs need CUDA" in info["cuda_graphs"]["reason"]
    assert info["quantize"] == "none" and info["model_weight_bytes"]["float32"] > 500e6  # SmolLM2-135M, fp32
    post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "adapter_id": "all16"}})
    text = httpx.get(server.url + "/metrics").text
    assert 'loraplex_requests_total{adapter="all16",status="ok"}' in text
    assert 'loraplex_time_to_first_token_seconds_count{adapter="all16"}' in text
    assert "loraplex_kv_cache_usage_ratio" in text and "loraplex_batch_size_bucket" in text
    assert "loraplex_engine_step_failures_total 0.0" in text
    assert "loraplex_adapter_slot_parks_total 0.0" in text and "loraplex_preemptions_total 0.0" in text
    assert "loraplex_requests_parked 0.0" in text
    weights = next(line for line in text.splitlines() if line.startswith('loraplex_model_weight_bytes{dtype="float32"}'))
    assert float(weights.split()[-1]) == info["model_weight_bytes"]["float32"]
    assert "loraplex_prefix_cache_query_tokens_total" in text and "loraplex_prefix_cache_hit_tokens_total" in text
    assert 'loraplex_adapter_resident{adapter="all16",tier="device"} 1.0' in text
    assert 'loraplex_adapter_resident{adapter="all16",tier="host"} 1.0' in text  # parsed, kept in host memory
    assert "loraplex_engine_alive 1.0" in text
    docs = httpx.get(server.url + "/openapi.json").json()
    assert docs["info"]["title"] == "loraplex" and docs["info"]["version"] == __version__
    assert {"/generate", "/generate_stream", "/v1/chat/completions"} <= set(docs["paths"])


def test_decoder_input_details(server, offline):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {
        "max_new_tokens": 2, "details": True, "decoder_input_details": True, "adapter_id": "qv8"}}).json()
    prefill = r["details"]["prefill"]
    want = offline.generate(PROMPT, SamplingParams(max_new_tokens=1, prompt_logprobs=True),
                            adapter_id=str(server.adapters["qv8"]))[0]
    assert [t["id"] for t in prefill] == want.prompt_token_ids
    assert prefill[0]["logprob"] is None
    assert [t["logprob"] for t in prefill[1:]] == pytest.approx(want.prompt_logprobs[1:], abs=1e-4)
    assert "".join(t["text"] for t in prefill) == PROMPT
    streamed = post(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"decoder_input_details": True}})
    assert streamed.status_code == 422 and "decoder_input_details" in streamed.json()["error"]


def test_merged_adapters(server, offline):
    # Halves of the same adapter merge back into it exactly, so the output must equal the adapter's own.
    halves = {"ids": ["qv8", "qv8"], "weights": [0.5, 0.5], "merge_strategy": "linear", "density": 1.0}
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "merged_adapters": halves}})
    assert r.status_code == 200, r.text
    alone = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 12, "adapter_id": "qv8"}})
    assert r.json()["generated_text"] == alone.json()["generated_text"]
    too_big = {**halves, "ids": ["qv8", "all16"]}  # ranks 8 + 16 > max_lora_rank 16
    for bad, status, says in (({**halves, "merge_strategy": "ties"}, 422, "ties"),
                              ({**halves, "ids": ["qv8", "nope"]}, 404, "nope"),
                              ({**halves, "weights": [1.0]}, 422, "weights"), (too_big, 424, "rank 24")):
        r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"merged_adapters": bad}})
        assert r.status_code == status and says in r.json()["error"], r.text


@pytest.mark.parametrize(("body", "field"), [
    ({"inputs": PROMPT, "parameters": {"adapter": "qv8"}}, "parameters.adapter"),  # adapter_id misspelled
    ({"inputs": PROMPT, "parameters": {"max_tokens": 5}}, "parameters.max_tokens"),
    ({"inputs": PROMPT, "adapter_id": "qv8"}, "adapter_id"),
    ({"inputs": PROMPT, "parameters": {"merged_adapters": {"ids": ["qv8"], "weights": [1.0], "weight": 1}}},
     "parameters.merged_adapters.weight"),
])
def test_unknown_fields_are_422_never_ignored(server, body, field):
    for path in ("/generate", "/generate_stream", "/"):
        r = post(server, path, body)
        assert r.status_code == 422, r.text
        assert r.json()["error"] == f"{field}: Extra inputs are not permitted"


def test_what_the_published_clients_send_is_accepted(server):
    # Every field of lorax-client 0.6.3's and text-generation 0.7.0's Parameters, as they send it (null when unset).
    lorax = {"adapter_id": None, "adapter_source": None, "api_token": None, "do_sample": False, "max_new_tokens": 6,
             "ignore_eos_token": False, "repetition_penalty": None, "return_full_text": False, "stop": [],
             "seed": None, "temperature": None, "top_k": None, "top_p": None, "truncate": None, "typical_p": None,
             "best_of": None, "watermark": False, "details": False, "decoder_input_details": False,
             "return_k_alternatives": None, "response_format": None,
             "merged_adapters": {"ids": ["qv8", "qv8"], "weights": [0.5, 0.5], "merge_strategy": None,
                                 "density": 1.0, "majority_sign_method": None}}
    tgi = {"do_sample": False, "max_new_tokens": 6, "repetition_penalty": None, "frequency_penalty": None,
           "return_full_text": False, "stop": [], "seed": None, "temperature": None, "top_k": None, "top_p": None,
           "truncate": None, "typical_p": None, "best_of": None, "watermark": False, "details": False,
           "decoder_input_details": False, "top_n_tokens": None, "grammar": None}
    merged = post(server, "/", {"inputs": PROMPT, "parameters": lorax, "stream": False})
    assert merged.status_code == 200, merged.text
    alone = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6, "adapter_id": "qv8"}})
    assert merged.json()[0]["generated_text"] == alone.json()["generated_text"]
    base = post(server, "/generate", {"inputs": PROMPT, "parameters": tgi, "stream": False})
    assert base.status_code == 200, base.text


def test_seed_zero_is_reproducible_and_reported(server):
    params = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.0, "seed": 0, "details": True}
    a = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    b = post(server, "/generate", {"inputs": PROMPT, "parameters": params}).json()
    assert a["details"]["seed"] == 0 and a == b
    c = post(server, "/generate", {"inputs": PROMPT, "parameters": {**params, "seed": 1}}).json()
    assert c["generated_text"] != a["generated_text"]


@pytest.mark.parametrize("knob", [{"top_p": 0.3}, {"top_k": 2}, {"typical_p": 0.3}, {"repetition_penalty": 1.8}])
def test_each_sampling_knob_reaches_the_engine(server, offline, knob):
    # Seeded sampling at temperature 1.5: with the knob the text is the offline engine's with the same knob,
    # and (checked) not what the same seed gives without it, so a knob dropped on the way would show.
    base = {"max_new_tokens": 12, "do_sample": True, "temperature": 1.5, "seed": 5}
    got = post(server, "/generate", {"inputs": PROMPT, "parameters": {**base, **knob}}).json()["generated_text"]
    want = SamplingParams(max_new_tokens=12, temperature=1.5, seed=5, **knob)  # the same names offline
    without = SamplingParams(max_new_tokens=12, temperature=1.5, seed=5)
    with_knob, plain = (offline.generate(PROMPT, p)[0].text for p in (want, without))
    assert got == with_knob and with_knob != plain


def test_the_stream_ends_with_the_whole_text(server):
    r = post(server, "/generate_stream", {"inputs": PROMPT, "parameters": {"max_new_tokens": 6}})
    events = sse_events(r)
    assert events[-1]["generated_text"] == "".join(e["token"]["text"] for e in events)
    assert all(e["generated_text"] is None for e in events[:-1])
    assert r.headers["content-type"].startswith("text/event-stream")


def test_top_tokens_in_tgis_shape(server):
    r = post(server, "/generate", {"inputs": PROMPT, "parameters": {"max_new_tokens": 3, "details": True,
                                                                     "top_n_tokens": 2}})
    details = r.json()["details"]
    assert len(details["top_tokens"]) == 3
    for chosen, top in zip(details["tokens"], details["top_tokens"], strict=True):
        assert [set(t) for t in top] == [{"id", "text", "logprob", "special"}] * 2
        assert top[0]["id"] == chosen["id"] and top[0]["special"] == chosen["special"]  # greedy: the top one
