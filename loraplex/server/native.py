"""The native LoRAX/TGI routes: /generate, /generate_stream, / (what lorax-client calls), /tokenize."""

from __future__ import annotations

from collections.abc import AsyncGenerator, AsyncIterator, Callable
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.engine.request import SamplingParams
from loraplex.lora.merge import MergeSpec
from loraplex.server.adapters import AdapterSpec
from loraplex.server.errors import error_body, status_of, strict_json
from loraplex.server.generation import Completion, Event, Job, TokenInfo
from loraplex.server.protocol import (
    DEFAULT_MAX_NEW_TOKENS,
    GenerateParameters,
    GenerateRequest,
    TokenizeRequest,
)
from loraplex.server.response_format import json_schema_of
from loraplex.server.state import ServerState, bearer_token, get_state, run_until_disconnected

router = APIRouter(tags=["native"])


@router.post("/generate")
async def generate(body: GenerateRequest, request: Request,
                   authorization: str | None = Header(default=None)) -> JSONResponse:
    state = get_state(request)
    job = native_job(state, body.parameters, body.inputs, authorization)
    completions = await run_until_disconnected(request, state.generation.complete(job))
    return JSONResponse(_response(state, body, job, completions))


@router.post("/generate_stream")
async def generate_stream(body: GenerateRequest, request: Request,
                          authorization: str | None = Header(default=None)) -> StreamingResponse:
    state = get_state(request)
    job = native_job(state, body.parameters, body.inputs, authorization, streaming=True)
    return await _sse(state, body, job)


@router.post("/", response_model=None)
async def compat(body: GenerateRequest, request: Request,
                 authorization: str | None = Header(default=None)) -> JSONResponse | StreamingResponse:
    """LoRAX's route: streaming when `stream` is true, else a JSON array holding one response."""
    state = get_state(request)
    job = native_job(state, body.parameters, body.inputs, authorization, streaming=body.stream)
    if body.stream:
        return await _sse(state, body, job)
    completions = await run_until_disconnected(request, state.generation.complete(job))
    return JSONResponse([_response(state, body, job, completions)])


@router.post("/tokenize")
async def tokenize(body: TokenizeRequest, request: Request) -> JSONResponse:
    tokenizer = get_state(request).generation.tokenizer
    enc = tokenizer(body.inputs, return_offsets_mapping=True)
    return JSONResponse([{"id": i, "text": body.inputs[start:stop], "start": start, "stop": stop}
                         for i, (start, stop) in zip(enc.input_ids, enc.offset_mapping, strict=True)])


def native_job(state: ServerState, p: GenerateParameters, inputs: str, authorization: str | None,
               streaming: bool = False) -> Job:
    """Validate what pydantic cannot (cross-field and server limits) and build the engine job."""
    if p.decoder_input_details and streaming:
        raise ValueError("decoder_input_details cannot be streamed")
    sampling = p.do_sample or any(v is not None for v in (p.top_k, p.top_p, p.typical_p)) or (
        p.temperature is not None and p.temperature not in (0.0, 1.0))
    best_of = p.best_of or 1
    if best_of > 1:
        if not sampling:
            raise ValueError("best_of > 1 needs sampling: set do_sample or a sampling parameter")
        if streaming:
            raise ValueError("best_of > 1 cannot be streamed")
        if best_of > state.config.max_best_of:
            raise ValueError(f"best_of must be <= {state.config.max_best_of}, got {best_of}")
    temperature = 0.0 if not sampling else (p.temperature if p.temperature is not None else 1.0)
    prompt_ids = state.generation.encode(inputs, p.truncate)
    alternatives = p.return_k_alternatives if p.return_k_alternatives is not None else p.top_n_tokens
    # Token logprobs only where the response shows them (details, stream events) or best_of ranks by them.
    logprobs = 0 if (p.details or streaming or best_of > 1) else None
    params = SamplingParams(
        max_new_tokens=state.token_budget(len(prompt_ids), p.max_new_tokens, DEFAULT_MAX_NEW_TOKENS, "max_new_tokens"),
        temperature=temperature,
        top_k=p.top_k or 0, top_p=p.top_p if p.top_p is not None else 1.0,
        typical_p=p.typical_p if p.typical_p is not None else 1.0,
        repetition_penalty=p.repetition_penalty if p.repetition_penalty is not None else 1.0,
        frequency_penalty=p.frequency_penalty or 0.0, presence_penalty=p.presence_penalty or 0.0,
        seed=p.seed, stop=tuple(p.stop), ignore_eos=p.ignore_eos_token, logprobs=alternatives if alternatives is not None else logprobs,
        prompt_logprobs=p.decoder_input_details, watermark=p.watermark, speculate=p.speculate,
        json_schema=json_schema_of(p.response_format))
    token = p.api_token or bearer_token(authorization)
    adapter = state.adapter_spec(p.adapter_id, p.adapter_source, token)
    if p.merged_adapters is not None:
        m = p.merged_adapters
        merge = MergeSpec(state.merge_ids(m.ids, p.adapter_source), tuple(m.weights), m.merge_strategy)
        adapter = AdapterSpec("merged:" + "+".join(merge.ids), p.adapter_source or state.config.adapter_source, token,
                              merge)
    return Job(prompt_ids, params, adapter, best_of, inputs)


def _token(t: TokenInfo, alternatives: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": t.id, "text": t.text, "logprob": t.logprob, "special": t.special}
    if alternatives:  # LoRAX's spelling (return_k_alternatives)
        out["alternative_tokens"] = [{"id": i, "text": s, "logprob": lp} for i, s, lp in t.top]
    return out


def _top_tokens(t: TokenInfo, special: frozenset[int]) -> list[dict[str, Any]]:
    """TGI's spelling of the alternatives (top_n_tokens): full tokens beside each generated one."""
    return [{"id": i, "text": s, "logprob": lp, "special": i in special} for i, s, lp in t.top]


def _prefill(c: Completion, job: Job, text: Callable[[int], str]) -> list[dict[str, Any]]:
    """The prompt tokens with their logprobs given the tokens before them (the first has none)."""
    logprobs = c.prompt_logprobs or [None] * len(job.prompt_ids)
    return [{"id": t, "text": text(t), "logprob": lp} for t, lp in zip(job.prompt_ids, logprobs, strict=True)]


def _summary(c: Completion, job: Job) -> dict[str, Any]:
    """What a stream's last event carries as `details` (and what full details start with)."""
    return {
        "finish_reason": c.finish_reason.value if c.finish_reason else None,
        "prompt_tokens": len(job.prompt_ids),
        "generated_tokens": len(c.tokens),
        "seed": c.seed if not job.params.greedy else None,
    }


def _details(c: Completion, job: Job, p: GenerateParameters, special: frozenset[int],
             text: Callable[[int], str]) -> dict[str, Any]:
    out: dict[str, Any] = {
        **_summary(c, job),
        "prefill": _prefill(c, job, text) if p.decoder_input_details else [],
        "tokens": [_token(t, p.return_k_alternatives is not None) for t in c.tokens],
    }
    if p.top_n_tokens is not None:
        out["top_tokens"] = [_top_tokens(t, special) for t in c.tokens]
    return out


def _response(state: ServerState, body: GenerateRequest, job: Job, completions: list[Completion]) -> dict[str, Any]:
    p = body.parameters
    prefix = body.inputs if p.return_full_text else ""
    special = state.generation.special_ids
    best = max(completions, key=lambda c: c.logprob_sum)
    out: dict[str, Any] = {"generated_text": prefix + best.text}
    if p.details:
        details = _details(best, job, p, special, state.generation.token_text)
        if len(completions) > 1:
            details["best_of_sequences"] = [
                {**_details(c, job, p, special, state.generation.token_text), "generated_text": prefix + c.text}
                for c in completions if c is not best]
        out["details"] = details
    return out


async def _sse(state: ServerState, body: GenerateRequest, job: Job) -> StreamingResponse:
    events = state.generation.stream(job)
    # The first event is awaited before the response starts, so a refused request (unknown adapter,
    # prompt too long, overload) gets its own HTTP status rather than an error inside a 200 stream.
    first = await anext(events)
    return StreamingResponse(_native_events(first, events, body, job, state.generation.special_ids),
                             media_type="text/event-stream")


async def _native_events(first: Event, events: AsyncGenerator[Event, None], body: GenerateRequest,
                         job: Job, special: frozenset[int]) -> AsyncIterator[str]:
    p = body.parameters
    event: Event | None = first
    try:
        while event is not None:
            data: dict[str, Any] = {"token": _token(event.token, p.return_k_alternatives is not None),
                                    "generated_text": None, "details": None}
            if p.top_n_tokens is not None:
                data["top_tokens"] = _top_tokens(event.token, special)
            if event.done is not None:
                data["generated_text"] = (body.inputs if p.return_full_text else "") + event.done.text
                if p.details:
                    data["details"] = _summary(event.done, job)
            yield f"data:{strict_json(data)}\n\n"
            event = await anext(events, None)
    except Exception as e:  # the stream has started: the error goes in the stream, as TGI does
        status, kind = status_of(e)
        yield f"data:{strict_json(error_body('/generate_stream', status, kind, str(e)))}\n\n"
    finally:
        await events.aclose()
