"""OpenAI-compatible routes: /v1/completions, /v1/chat/completions, /v1/models.

`model` selects the adapter (the base model's id or "" = none). Sequences are numbered as OpenAI
does: prompt i's j-th sample is choice i·n + j.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncGenerator, AsyncIterator
from dataclasses import replace
from typing import Any

from fastapi import APIRouter, Header, Request
from fastapi.responses import JSONResponse, StreamingResponse

from loraplex.engine.request import FinishReason, SamplingParams
from loraplex.server.adapters import local_adapter_names
from loraplex.server.errors import error_body, status_of, strict_json
from loraplex.server.generation import Completion, Event, Job, TokenInfo, merge
from loraplex.server.protocol import ChatCompletionRequest, CompletionRequest, OpenAISampling
from loraplex.server.response_format import json_schema_of
from loraplex.server.state import ServerState, bearer_token, get_state, run_until_disconnected
from loraplex.server.tools import tool_call_message, tool_mode, with_tool_prompt

router = APIRouter(tags=["openai"])
DEFAULT_COMPLETION_TOKENS = 16
"""OpenAI's default max_tokens for /v1/completions; chat's default is "up to the limit"."""
_MESSAGE_FIELDS = {"role", "content", "name", "tool_calls", "tool_call_id"}
"""What a chat message carries into the template (the rest of ChatMessage is accepted and ignored)."""


@router.get("/v1/models")
async def models(request: Request) -> JSONResponse:
    state = get_state(request)
    created = int(time.time())
    ids = [state.model_id, *local_adapter_names(state.engine.engine.config.adapters.adapter_roots)]
    return JSONResponse({"object": "list", "data": [
        {"id": i, "object": "model", "created": created, "owned_by": "loraplex",
         **({"parent": state.model_id} if i != state.model_id else {})} for i in ids]})


@router.post("/v1/completions", response_model=None)
async def completions(body: CompletionRequest, request: Request,
                      authorization: str | None = Header(default=None)) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    if body.suffix:
        raise ValueError("suffix is not supported")
    if body.best_of is not None and body.best_of != body.n:
        raise ValueError(f"best_of is not supported (it would be {body.best_of}, with n {body.n}): give n alone")
    prompts = _prompts(state, body.prompt)
    jobs = [_job(state, body, ids, text, body.max_tokens, body.logprobs, authorization, "max_tokens",
                 DEFAULT_COMPLETION_TOKENS) for ids, text in prompts]
    meta = _meta("cmpl", "text_completion", body)
    if body.stream:
        return await _stream(state, jobs, body, meta, _completion_chunk)
    results = await run_until_disconnected(request, _complete_all(state, jobs))
    choices = []
    for i, (job, comps) in enumerate(zip(jobs, results, strict=True)):
        for c in comps:
            text = (job.prompt or "") + c.text if body.echo else c.text
            choices.append({"index": i * body.n + c.index, "text": text, "finish_reason": _finish(c.finish_reason),
                            "logprobs": _completion_logprobs(c) if body.logprobs is not None else None})
    return JSONResponse({**meta, "choices": choices, "usage": _usage(jobs, results)})


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: ChatCompletionRequest, request: Request,
                           authorization: str | None = Header(default=None)) -> JSONResponse | StreamingResponse:
    state = get_state(request)
    tools = tool_mode(body.tools, body.tool_choice)
    if tools is not None and body.stream:
        raise ValueError("replies with tools cannot be streamed yet; send the request with stream false "
                         "(or tool_choice \"none\")")
    if tools is not None and body.response_format is not None and body.response_format.type != "text":
        raise ValueError("give either tools or response_format, not both")
    messages = [m.model_dump(exclude_none=True, include=_MESSAGE_FIELDS) for m in body.messages]
    for m in messages:
        if isinstance(m.get("content"), list):  # OpenAI's content parts: only text parts carry meaning here
            parts = m["content"]
            if any(p.get("type") != "text" for p in parts):
                raise ValueError("only text content parts are supported")
            m["content"] = "".join(str(p.get("text", "")) for p in parts)
    if tools is not None:
        messages = with_tool_prompt(messages, tools.prompt)
    ids = state.generation.encode_chat(messages)
    top = (body.top_logprobs or 0) if body.logprobs else None
    job = _job(state, body, ids, None, body.max_completion_tokens or body.max_tokens, top, authorization,
               "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens")
    if tools is not None:
        job = replace(job, params=replace(job.params, json_schema=tools.schema))
    meta = _meta("chatcmpl", "chat.completion", body)
    if body.stream:
        return await _stream(state, [job], body, {**meta, "object": "chat.completion.chunk"}, _chat_chunk)
    (comps,) = await run_until_disconnected(request, _complete_all(state, [job]))
    choices = []
    for c in comps:
        message, finish = ({"role": "assistant", "content": c.text}, _finish(c.finish_reason)) \
            if tools is None else tool_call_message(c.text, c.finish_reason)
        choices.append({"index": c.index, "message": message, "finish_reason": finish,
                        "logprobs": {"content": _chat_logprobs(c)} if body.logprobs else None})
    return JSONResponse({**meta, "choices": choices, "usage": _usage([job], [comps])})


def _prompts(state: ServerState, prompt: str | list[str] | list[int] | list[list[int]]) -> list[tuple[list[int], str | None]]:
    if isinstance(prompt, str):
        return [(state.generation.encode(prompt), prompt)]
    if not prompt:
        raise ValueError("prompt must not be empty")
    if all(isinstance(p, int) for p in prompt):
        return [(list(prompt), None)]  # type: ignore[arg-type]
    if all(isinstance(p, str) for p in prompt):
        return [(state.generation.encode(p), p) for p in prompt]  # type: ignore[misc, arg-type]
    return [(list(p), None) for p in prompt]  # type: ignore[misc, arg-type]


def _job(state: ServerState, body: OpenAISampling, ids: list[int], text: str | None, max_tokens: int | None,
         logprobs: int | None, authorization: str | None, max_tokens_name: str,
         default_max_tokens: int | None = None) -> Job:
    if body.logit_bias:
        raise ValueError("logit_bias is not supported")
    stop = (body.stop,) if isinstance(body.stop, str) else tuple(body.stop or ())
    params = SamplingParams(
        max_new_tokens=state.token_budget(len(ids), max_tokens, default_max_tokens, max_tokens_name),
        temperature=body.temperature if body.temperature is not None else 1.0,
        top_p=body.top_p if body.top_p is not None else 1.0, top_k=body.top_k or 0,
        repetition_penalty=body.repetition_penalty if body.repetition_penalty is not None else 1.0,
        frequency_penalty=body.frequency_penalty or 0.0, presence_penalty=body.presence_penalty or 0.0,
        seed=body.seed, stop=stop, ignore_eos=body.ignore_eos, logprobs=logprobs, speculate=body.speculate,
        json_schema=json_schema_of(body.response_format))
    token = body.api_token or bearer_token(authorization)
    return Job(ids, params, state.adapter_spec(body.model, body.adapter_source, token), body.n, text)


def _meta(prefix: str, kind: str, body: OpenAISampling) -> dict[str, Any]:
    return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()), "model": body.model}


def _finish(reason: FinishReason | None) -> str | None:
    return None if reason is None else "length" if reason is FinishReason.LENGTH else "stop"


def _usage(jobs: list[Job], results: list[list[Completion]]) -> dict[str, int]:
    prompt = sum(len(j.prompt_ids) for j in jobs)
    completion = sum(len(c.tokens) for comps in results for c in comps)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


async def _complete_all(state: ServerState, jobs: list[Job]) -> list[list[Completion]]:
    return list(await asyncio.gather(*(state.generation.complete(j) for j in jobs)))


def _completion_logprobs(c: Completion) -> dict[str, Any]:
    offsets, pos = [], 0
    for t in c.tokens:
        offsets.append(pos)
        pos += len(t.text)
    return {"tokens": [t.text for t in c.tokens], "token_logprobs": [t.logprob for t in c.tokens],
            "top_logprobs": [{s: lp for _, s, lp in t.top} for t in c.tokens], "text_offset": offsets}


def _chat_logprobs(c: Completion) -> list[dict[str, Any]]:
    return [_chat_token_logprob(t) for t in c.tokens]


def _chat_token_logprob(t: TokenInfo) -> dict[str, Any]:
    return {"token": t.text, "logprob": t.logprob, "bytes": list(t.text.encode()),
            "top_logprobs": [{"token": s, "logprob": lp, "bytes": list(s.encode())} for _, s, lp in t.top]}


def _completion_chunk(event: Event, index: int, body: Any) -> dict[str, Any]:
    logprobs = None
    if body.logprobs is not None:
        t = event.token
        logprobs = {"tokens": [t.text], "token_logprobs": [t.logprob], "top_logprobs": [{s: lp for _, s, lp in t.top}]}
    return {"index": index, "text": event.token.text, "logprobs": logprobs,
            "finish_reason": _finish(event.done.finish_reason) if event.done else None}


def _chat_chunk(event: Event, index: int, body: Any) -> dict[str, Any]:
    return {"index": index, "delta": {"content": event.token.text},
            "logprobs": {"content": [_chat_token_logprob(event.token)]} if body.logprobs else None,
            "finish_reason": _finish(event.done.finish_reason) if event.done else None}


async def _stream(state: ServerState, jobs: list[Job], body: Any, meta: dict[str, Any],
                  chunk: Any) -> StreamingResponse:
    streams = [state.generation.stream(j) for j in jobs]
    merged = merge(streams)
    first = await anext(merged)  # errors before the first token keep their own HTTP status
    return StreamingResponse(_openai_events(first, merged, jobs, body, meta, chunk), media_type="text/event-stream")


async def _openai_events(first: tuple[int, Event], rest: AsyncGenerator[tuple[int, Event], None], jobs: list[Job],
                         body: Any, meta: dict[str, Any], chunk: Any) -> AsyncIterator[str]:
    generated = 0
    is_chat = meta["object"] == "chat.completion.chunk"
    item: tuple[int, Event] | None = first
    try:
        if is_chat:  # OpenAI opens each choice with the role
            for j in range(body.n):
                yield _sse({**meta, "choices": [{"index": j, "delta": {"role": "assistant", "content": ""},
                                                 "logprobs": None, "finish_reason": None}]})
        while item is not None:
            prompt_index, event = item
            generated += 1
            yield _sse({**meta, "choices": [chunk(event, prompt_index * body.n + event.index, body)]})
            item = await anext(rest, None)
        if body.stream_options is not None and body.stream_options.include_usage:
            prompt = sum(len(j.prompt_ids) for j in jobs)
            yield _sse({**meta, "choices": [], "usage": {"prompt_tokens": prompt, "completion_tokens": generated,
                                                         "total_tokens": prompt + generated}})
        yield "data: [DONE]\n\n"
    except Exception as e:
        status, kind = status_of(e)
        yield _sse(error_body("/v1/completions", status, kind, str(e)))
    finally:
        await rest.aclose()


def _sse(data: dict[str, Any]) -> str:
    return f"data: {strict_json(data)}\n\n"
