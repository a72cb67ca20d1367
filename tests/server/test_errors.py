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
