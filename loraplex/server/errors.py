"""The one place where domain errors become HTTP responses.

Native routes (and admin, ops) answer `{"error": str, "error_type": str}`, what lorax-client and TGI's
client parse. OpenAI routes answer OpenAI's object, which the OpenAI SDK parses into its exceptions,
with `error_type` beside it so a client reading either shape finds the kind:
`{"error": {"message": str, "type": error_type, "param": null, "code": status}, "error_type": str}`.
Nothing else in the server builds an error response.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from loraplex.engine.async_engine import EngineDead, EngineStepError, Overloaded
from loraplex.lora.adapter import AdapterAccessDenied, AdapterError, AdapterNotFound
from loraplex.lora.manager import NoFreeSlot
from loraplex.server.state import ClientDisconnected

log = logging.getLogger(__name__)

OPENAI_PREFIXES = ("/v1/completions", "/v1/chat/completions", "/v1/models",
                   "/v1/load_lora_adapter", "/v1/unload_lora_adapter")  # vLLM's OpenAI server's routes


class Unauthorized(Exception):
    """Missing or wrong bearer token (HTTP 401)."""


def status_of(error: BaseException) -> tuple[int, str]:
    """HTTP status and `error_type` for a domain error."""
    table: list[tuple[type[BaseException], int, str]] = [
        (ClientDisconnected, 499, "client_closed"),
        (Unauthorized, 401, "unauthorized"),
        (Overloaded, 429, "overloaded"),
        (EngineDead, 503, "unavailable"),
        (NoFreeSlot, 503, "no_free_slot"),
        (EngineStepError, 500, "generation"),
        (AdapterNotFound, 404, "adapter_not_found"),
        (AdapterAccessDenied, 403, "adapter_access_denied"),
        (AdapterError, 424, "adapter_load"),
        (ValidationError, 422, "validation"),
        (ValueError, 422, "validation"),
    ]
    for cls, status, kind in table:
        if isinstance(error, cls):
            return status, kind
    return 500, "internal"


def error_body(path: str, status: int, error_type: str, message: str) -> dict[str, object]:
    if path.startswith(OPENAI_PREFIXES):
        return {"error": {"message": message, "type": error_type, "param": None, "code": status},
                "error_type": error_type}
    return {"error": message, "error_type": error_type}


def strict_json(data: object) -> str:
    """`data` as JSON text for a stream event. JSON has no NaN or Infinity, so such a value raises
    (RuntimeError: HTTP 500, the stream's error event) rather than go out as text no client parses;
    JSONResponse bodies get the same check from Starlette."""
    try:
        return json.dumps(data, allow_nan=False)
    except ValueError as e:
        raise RuntimeError(f"a response holds a non-finite number ({e})") from e


def error_response(request: Request, error: BaseException) -> JSONResponse:
    status, kind = status_of(error)
    if status >= 500:
        log.error("%s %s failed: %r", request.method, request.url.path, error)
    message = _describe(error) if not isinstance(error, ValidationError) else _pydantic_message(error)
    return JSONResponse(error_body(request.url.path, status, kind, message), status_code=status)


def install_error_handlers(app: FastAPI) -> None:
    async def on_domain_error(request: Request, error: Exception) -> JSONResponse:
        return error_response(request, error)

    async def on_request_validation(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, RequestValidationError)
        message = "; ".join(_one_error(e) for e in error.errors())
        return JSONResponse(error_body(request.url.path, 422, "validation", message), status_code=422)

    async def on_http_error(request: Request, error: Exception) -> JSONResponse:
        assert isinstance(error, HTTPException)
        return JSONResponse(error_body(request.url.path, error.status_code, "http", str(error.detail)),
                            status_code=error.status_code, headers=error.headers)

    app.add_exception_handler(RequestValidationError, on_request_validation)
    app.add_exception_handler(HTTPException, on_http_error)
    for cls in (ClientDisconnected, Unauthorized, Overloaded, EngineDead, NoFreeSlot, EngineStepError, AdapterError, ValidationError, ValueError,
                Exception):
        app.add_exception_handler(cls, on_domain_error)


def _describe(error: BaseException) -> str:
    if status_of(error)[0] == 500 and not isinstance(error, EngineStepError):
        return "internal server error"  # details go to the log, not to clients
    return str(error) or type(error).__name__


def _pydantic_message(error: ValidationError) -> str:
    return "; ".join(_one_error(e) for e in error.errors())


def _one_error(e: object) -> str:
    assert isinstance(e, dict)
    where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
    message = str(e.get("msg", "invalid"))
    message = message.removeprefix("Value error, ")
    return f"{where}: {message}" if where else message
