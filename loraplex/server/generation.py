"""What every generation route shares: prompt → engine request(s) → per-token events and completions.

A job asks for `n` independent sequences of one prompt (OpenAI's `n`, the native `best_of`); each
becomes its own engine request, so they batch with everything else. The engine reports cumulative
outputs, one per new token; this module turns them into token events whose texts concatenate to
exactly the final text (so a streaming client that joins them gets what a non-streaming one gets).
"""

from __future__ import annotations

import asyncio
import itertools
import random
import time
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass, field, replace
from typing import Any, TypeVar

from loraplex.engine.async_engine import AsyncEngine
from loraplex.engine.request import FinishReason, RequestOutput, SamplingParams
from loraplex.server.adapters import AdapterSpec
from loraplex.server.metrics import Metrics
from loraplex.tokenization import encode_chat

T = TypeVar("T")


@dataclass(frozen=True)
class Job:
    prompt_ids: list[int]
    params: SamplingParams
    adapter: AdapterSpec | None = None
    n: int = 1
    prompt: str | None = None


@dataclass(frozen=True)
class TokenInfo:
    id: int
    text: str
    """The text this token added to the output (may be empty while a stop string is undecided)."""
    logprob: float
    special: bool
    top: tuple[tuple[int, str, float], ...] = ()
    """(id, text, logprob) of the most likely tokens at this step, when asked."""


@dataclass
class Completion:
    index: int
    text: str = ""
    token_ids: list[int] = field(default_factory=list)
    tokens: list[TokenInfo] = field(default_factory=list)
    finish_reason: FinishReason | None = None
    seed: int | None = None
    prompt_logprobs: list[float | None] | None = None

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens)


@dataclass(frozen=True)
class Event:
    """One new token of sequence `index`; `done` is set on the sequence's last event."""

    index: int
    token: TokenInfo
    done: Completion | None = None


class Generation:
    def __init__(self, engine: AsyncEngine, tokenizer: Any, metrics: Metrics) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self.metrics = metrics
        self.special_ids = frozenset(tokenizer.all_special_ids)
        self._ids = itertools.count()

    def encode(self, text: str, truncate: int | None = None) -> list[int]:
        ids = list(self.tokenizer(text).input_ids)
        return ids[-truncate:] if truncate else ids

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        return encode_chat(self.tokenizer, messages)

    def token_text(self, token_id: int) -> str:
        return str(self.tokenizer.decode([token_id], skip_special_tokens=False))

    async def stream(self, job: Job, every_token: bool = True) -> AsyncGenerator[Event, None]:
        """Events of all `job.n` sequences as they come; leaving early aborts every sequence.

        With `every_token=False` the engine reports only each sequence's first and final output, and the
        events of the tokens between come together at the end (for callers that do not stream)."""
        if job.n == 1:
            async for event in self._one(job, 0, job.params, every_token):
                yield event
            return
        seeds = _seeds(job.params.seed, job.n)
        streams = [self._one(job, i, replace(job.params, seed=seeds[i]), every_token) for i in range(job.n)]
        async for _, event in merge(streams):
            yield event

    async def complete(self, job: Job) -> list[Completion]:
        done: dict[int, Completion] = {}
        async for event in self.stream(job, every_token=False):
            if event.done is not None:
                done[event.index] = event.done
        return [done[i] for i in range(job.n)]

    async def _one(self, job: Job, index: int, params: SamplingParams,
                   every_token: bool) -> AsyncGenerator[Event, None]:
        request_id = f"req-{next(self._ids)}"
        adapter = job.adapter or AdapterSpec("")

        completion = Completion(index)
        start = time.perf_counter()
        first: float | None = None
        status = "error"
        drafts = (0, 0, 0)  # speculative decoding: drafts proposed, accepted, verifying steps
        try:
            async for out in self.engine.generate(request_id, job.prompt_ids, params, prompt=job.prompt,
                                                  adapter_id=None if adapter.merge else adapter.id,
                                                  adapter_source=adapter.source, adapter_token=adapter.token,
                                                  merge=adapter.merge, every_token=every_token):
                if first is None:
                    first = time.perf_counter()
                new = self._new_tokens(out, completion)
                completion.text = out.text
                completion.token_ids = out.token_ids
                completion.tokens += new
                drafts = (out.draft_tokens, out.accepted_draft_tokens, out.verify_steps)
                if out.finished:
                    completion.finish_reason = out.finish_reason
                    completion.seed = out.seed
                    completion.prompt_logprobs = out.prompt_logprobs
                    status = "ok"
                for i, token in enumerate(new):
                    yield Event(index, token, completion if out.finished and i == len(new) - 1 else None)
        except asyncio.CancelledError:
            status = "cancelled"
            raise
        finally:
            end = time.perf_counter()
            self.metrics.observe_request(adapter.id, status, end - start,
                                         None if first is None else first - start,
                                         None if first is None else (end - first) / max(1, len(completion.tokens) - 1),
                                         len(job.prompt_ids), len(completion.tokens), drafts)

    def _new_tokens(self, out: RequestOutput, completion: Completion) -> list[TokenInfo]:
        """Tokens of `out` the completion does not have yet. One new token gets the text it added to the
        output, so streamed texts join to exactly the final text; several at once (a caller that does
        not stream) get each token's own text."""
        start = len(completion.tokens)
        new: list[TokenInfo] = []
        for i in range(start, len(out.token_ids)):
            token_id = out.token_ids[i]
            if len(out.token_ids) - start == 1:
                text = out.text[len(completion.text):] if out.text.startswith(completion.text) else ""
            elif token_id in self.special_ids:
                text = ""  # as in the output text, which leaves special tokens out
            else:
                text = self.token_text(token_id)
            logprob = out.logprobs[i] if out.logprobs else None
            top = tuple((t, self.token_text(t), lp) for t, lp in logprob.top) if logprob is not None else ()
            new.append(TokenInfo(token_id, text, logprob.logprob if logprob is not None else 0.0,
                                 token_id in self.special_ids, top))
        return new


async def merge(streams: list[AsyncGenerator[T, None]]) -> AsyncGenerator[tuple[int, T], None]:
    """Items of several async streams as they come, tagged with their stream's position. The first error
    of any stream is raised; leaving early (or an error) closes every stream."""
    if len(streams) == 1:
        async for item in streams[0]:
            yield 0, item
        return
    queue: asyncio.Queue[tuple[int, T] | BaseException | None] = asyncio.Queue()

    async def pump(i: int, stream: AsyncGenerator[T, None]) -> None:
        try:
            async with aclosing(stream):  # closed (its requests aborted) even when cancelled mid-put
                async for item in stream:
                    await queue.put((i, item))
        except Exception as e:
            await queue.put(e)
            return
        await queue.put(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(streams)
        while remaining:
            got = await queue.get()
            if got is None:
                remaining -= 1
            elif isinstance(got, BaseException):
                raise got
            else:
                yield got
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def _seeds(seed: int | None, n: int) -> list[int]:
    """Distinct seeds for `n` samples of one prompt: reproducible from the request's seed when given."""
    base = seed if seed is not None else random.getrandbits(62)
    return [(base + i) % 2**63 for i in range(n)]
