"""Domain errors map to the HTTP status and error_type the API documents."""

from __future__ import annotations

import pytest

from loraplex.adapters.ref import AdapterIdInvalid
from loraplex.lora.adapter import AdapterAccessDenied, AdapterFetchError, AdapterInvalid, AdapterNotFound
from loraplex.server.errors import Unauthorized, status_of


@pytest.mark.parametrize(("error", "expected"), [
    (AdapterAccessDenied("adapter hub:org/private: the hub refused access"), (403, "adapter_access_denied")),
    (Unauthorized("the admin API needs a token"), (401, "unauthorized")),  # the server's own auth, not an adapter's
    (AdapterNotFound("adapter local:x: not found"), (404, "adapter_not_found")),
    (AdapterInvalid("adapter local:x: bad"), (424, "adapter_load")),
    (AdapterFetchError("adapter hub:o/n: timeout"), (424, "adapter_load")),
    (AdapterIdInvalid("adapter id 'x\\x00y' contains control characters"), (422, "validation")),
])
def test_status_of_adapter_errors(error: Exception, expected: tuple[int, str]) -> None:
    assert status_of(error) == expected


def test_status_of_the_servers_own_errors() -> None:
    from pydantic import BaseModel, ValidationError

    from loraplex.engine.async_engine import EngineDead, EngineStepError, Overloaded, ShuttingDown
    from loraplex.lora.manager import NoFreeSlot
    from loraplex.server.state import ClientDisconnected

    class One(BaseModel):
        x: int

    try:
        One(x="no")  # type: ignore[arg-type]
    except ValidationError as e:
        invalid = e
    cases = [(ClientDisconnected(), (499, "client_closed")), (Overloaded(), (429, "overloaded")),
             (EngineDead(), (503, "unavailable")), (ShuttingDown(), (503, "unavailable")),
             (NoFreeSlot(), (503, "no_free_slot")), (EngineStepError("step failed"), (500, "generation")),
             (invalid, (422, "validation")), (ValueError("bad"), (422, "validation")),
             (RuntimeError("bug"), (500, "internal"))]
    assert [status_of(error) for error, _ in cases] == [expected for _, expected in cases]


def test_stream_events_refuse_non_finite_numbers() -> None:
    from loraplex.server.errors import strict_json

    assert strict_json({"logprob": -1.5}) == '{"logprob": -1.5}'
    for bad in (float("nan"), float("inf")):
        with pytest.raises(RuntimeError, match="non-finite number"):
            strict_json({"logprob": bad})
