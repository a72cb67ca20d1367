"""What the routes share: the engine facade, the generation service, config and metrics."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TypeVar

from fastapi import Request

from loraplex.adapters.ref import AdapterRef
from loraplex.config import ServerConfig
from loraplex.engine.async_engine import AsyncEngine
from loraplex.server.adapters import AdapterSpec, request_ref
from loraplex.server.generation import Generation
from loraplex.server.metrics import Metrics
from loraplex.server.protocol import max_new_tokens

T = TypeVar("T")
DISCONNECT_POLL_S = 0.25


class ClientDisconnected(Exception):
    """The client went away before its (non-streaming) response was ready."""


@dataclass
class ServerState:
    config: ServerConfig
    engine: AsyncEngine
    generation: Generation
    metrics: Metrics
    model_id: str

    def adapter_ref(self, adapter_id: str, source: str | None) -> AdapterRef:
        """The checked, canonically spelled adapter a client names (server.adapters.request_ref)."""
        return request_ref(adapter_id, source, self.config.adapter_source, self.config.allow_request_sources)

    def adapter_spec(self, adapter_id: str | None, source: str | None, token: str | None) -> AdapterSpec | None:
        """The adapter a request names; None or "" (or the base model's id) means the base model."""
        if not adapter_id or adapter_id == self.model_id:
            return None
        ref = self.adapter_ref(adapter_id, source)
        return AdapterSpec(ref.request_id, ref.source, token)

    def token_limit(self) -> int:
        """The most tokens one request may hold, prompt and generated together (/info reports it):
        `--max-total-tokens`, capped by the model's length and by what one request can hold in the KV
        cache, so that OpenAI's "up to the limit" default is always admitted."""
        core = self.engine.engine
        limits = core.config.scheduler
        held = [core.max_model_len, core.pool.num_blocks * core.kv_cache.block_size]
        return min(held + [n for n in (limits.max_total_tokens, limits.max_batch_total_tokens) if n is not None])

    def token_budget(self, prompt_tokens: int, requested: int | None, default: int | None, name: str) -> int:
        """max_new_tokens for a request of either API under this server's limit (protocol.max_new_tokens)."""
        return max_new_tokens(prompt_tokens, requested, default, self.token_limit(), name)

    def merge_ids(self, ids: list[str], source: str | None) -> tuple[str, ...]:
        """The parts of a merge, checked and canonically spelled; the engine reads them all with one source."""
        one_source = source or self.config.adapter_source
        return tuple(self.adapter_ref(i, one_source).request_id for i in ids)


def get_state(request: Request) -> ServerState:
    state: ServerState = request.app.state.loraplex
    return state


def bearer_token(authorization: str | None) -> str | None:
    if authorization and authorization.lower().startswith("bearer "):
        return authorization[7:].strip() or None
    return None


async def run_until_disconnected(request: Request, work: Awaitable[T]) -> T:
    """Await `work`, cancelling it (which aborts its engine requests) if the client disconnects first."""
    task = asyncio.ensure_future(work)
    try:
        while True:
            done, _ = await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
            if done:
                return task.result()
            if await request.is_disconnected():
                raise ClientDisconnected(f"client disconnected from {request.url.path}")
    finally:
        if not task.done():
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
