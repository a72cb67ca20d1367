"""Adapter administration (beyond LoRAX): list, load, unload, pin and unpin adapters at runtime.

Guarded by `--admin-token` when one is configured (`Authorization: Bearer <token>`). Fetching runs on
the exchange's workers; slot changes run on the engine thread between steps, so they never race a step.
"""

from __future__ import annotations

import asyncio
import hmac
from typing import Any

from fastapi import APIRouter, Depends, Header, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from loraplex.adapters.loader import LoadedAdapter
from loraplex.adapters.ref import AdapterIdentity, AdapterRef
from loraplex.engine.engine import Engine
from loraplex.lora.adapter import AdapterNotFound
from loraplex.server.errors import Unauthorized
from loraplex.server.protocol import AdapterAdminRequest, DynamicLoRARequest
from loraplex.server.state import ServerState, bearer_token, get_state


def require_admin(request: Request, authorization: str | None = Header(default=None)) -> None:
    token = get_state(request).config.admin_token
    if token is None:
        return
    given = bearer_token(authorization)
    if given is None or not hmac.compare_digest(given.encode(), token.encode()):
        raise Unauthorized("the adapter admin API needs `Authorization: Bearer <admin token>`")


router = APIRouter(prefix="/v1/adapters", tags=["admin"], dependencies=[Depends(require_admin)])
dynamic_lora = APIRouter(prefix="/v1", tags=["admin"], dependencies=[Depends(require_admin)])
"""vLLM's dynamic LoRA routes, as the Gateway API Inference Extension's adapter syncer calls them, on top of
`load` and `unload` (same admin token; the answers are vLLM's plain-text ones)."""


@router.get("")
async def list_adapters(request: Request) -> JSONResponse:
    """Every adapter the server holds, with its tiers (device, host) and size."""
    state = get_state(request)
    return JSONResponse(await state.engine.call(lambda e: _listing(e)))


@router.post("/load")
async def load(body: AdapterAdminRequest, request: Request) -> JSONResponse:
    """Fetch and parse the adapter (source → disk → host) and put it in an idle device slot if there is one."""
    return await _fetch_into_slot(get_state(request), body, pin=False)


@router.post("/pin")
async def pin(body: AdapterAdminRequest, request: Request) -> JSONResponse:
    """Load the adapter into a device slot and keep it there until unpinned."""
    return await _fetch_into_slot(get_state(request), body, pin=True)


@router.post("/unpin")
async def unpin(body: AdapterAdminRequest, request: Request) -> JSONResponse:
    state = get_state(request)
    identity = _known(state, body)
    if not await state.engine.call(lambda e: _lora(e).unpin(identity)):
        raise AdapterNotFound(f"adapter {body.adapter_id!r} is not pinned")
    return JSONResponse({"adapter_id": body.adapter_id, "pinned": False})


@router.post("/unload")
async def unload(body: AdapterAdminRequest, request: Request) -> JSONResponse:
    """Drop the adapter from the host tier and from its device slot unless requests are using it."""
    state = get_state(request)
    identity = _known(state, body)

    def drop(e: Engine) -> dict[str, bool]:
        lora = _lora(e)
        if lora.is_pinned(identity):
            raise ValueError(f"adapter {body.adapter_id!r} is pinned; unpin it first")
        return {"device": lora.evict(identity), "host": _loader(e).forget(identity)}

    removed = await state.engine.call(drop)
    return JSONResponse({"adapter_id": body.adapter_id, "removed_from": [t for t, done in removed.items() if done]})


@dynamic_lora.post("/load_lora_adapter")
async def load_lora_adapter(body: DynamicLoRARequest, request: Request) -> PlainTextResponse:
    await load(_admin_request(body), request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' added successfully.")


@dynamic_lora.post("/unload_lora_adapter")
async def unload_lora_adapter(body: DynamicLoRARequest, request: Request) -> PlainTextResponse:
    await unload(_admin_request(body), request)
    return PlainTextResponse(f"Success: LoRA adapter '{body.lora_name}' removed successfully.")


def _admin_request(body: DynamicLoRARequest) -> AdapterAdminRequest:
    if body.lora_path is not None and body.lora_path != body.lora_name:
        raise ValueError("lora_path must equal lora_name: loraplex serves an adapter under its own id (a name "
                         "under --adapter-root, a Hub id, or an s3:// URL), which is also the `model` clients "
                         "send; it has no aliases")
    return AdapterAdminRequest(adapter_id=body.lora_name)


def _ref(state: ServerState, body: AdapterAdminRequest) -> AdapterRef:
    return state.adapter_ref(body.adapter_id, body.adapter_source)  # the check every client's id passes


async def _fetch_into_slot(state: ServerState, body: AdapterAdminRequest, pin: bool) -> JSONResponse:
    """Fetch and parse the adapter on the exchange's workers, then warm (or pin) it into a device slot
    on the engine thread."""
    request = _loader(state.engine.engine).request(_ref(state, body), body.api_token)
    loaded: LoadedAdapter = await asyncio.wrap_future(request)

    def place(e: Engine) -> int | None:
        lora = _lora(e)
        return lora.pin(loaded.identity, loaded.weights) if pin else lora.warm(loaded.identity, loaded.weights)

    slot = await state.engine.call(place)
    return JSONResponse(_entry(loaded.identity, loaded.weights.size_bytes, slot, pinned=pin, host=True))


def _known(state: ServerState, body: AdapterAdminRequest) -> AdapterIdentity:
    ref = _ref(state, body)
    engine = state.engine.engine
    cached = _loader(engine).cached(ref)
    if cached is not None:
        return cached.identity
    resident = [i for i in _lora(engine).resident() if (i.source, i.id) == (ref.source, ref.id)]
    if not resident:
        raise AdapterNotFound(f"adapter {body.adapter_id!r} is not loaded")
    return resident[-1]


def _listing(engine: Engine) -> dict[str, Any]:
    lora, loader = _lora(engine), _loader(engine)
    host = {a.identity: a.weights.size_bytes for a in loader.host_entries()}
    resident = lora.resident()
    entries = [_entry(i, host.get(i), lora.slot_of(i), lora.is_pinned(i), i in host) for i in resident]
    entries += [_entry(i, size, None, False, True) for i, size in host.items() if i not in resident]
    refs = lora.slot_refs()
    return {"adapters": entries,
            "device_slots": {"total": len(refs), "in_use": sum(r > 0 for r in refs), "loaded": len(resident)},
            "exchange": loader.stats().as_dict()}


def _entry(identity: AdapterIdentity, size: int | None, slot: int | None, pinned: bool, host: bool) -> dict[str, Any]:
    tiers = (["device"] if slot is not None else []) + (["host"] if host else [])
    return {"adapter_id": identity.id, "source": identity.source, "version": identity.version, "tiers": tiers,
            "slot": slot, "pinned": pinned, "size_bytes": size}


def _lora(engine: Engine) -> Any:
    if engine.lora is None:
        raise ValueError("this server runs with max_loras=0: it serves no adapters")
    return engine.lora


def _loader(engine: Engine) -> Any:
    if engine.adapters is None:
        raise ValueError("this server runs with max_loras=0: it serves no adapters")
    return engine.adapters
