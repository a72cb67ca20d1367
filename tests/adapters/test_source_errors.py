"""Remote sources' errors name the adapter and never a local path (the cache, a temp folder)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import AbstractContextManager

import pytest

from loraplex.adapters.hub_source import _hub_errors
from loraplex.adapters.ref import AdapterRef
from loraplex.adapters.s3_source import _s3_errors
from loraplex.lora.adapter import AdapterFetchError

SECRET = "/srv/secret-cache/models--org--name/blobs/abc.incomplete"


@pytest.mark.parametrize(("errors", "ref"), [
    (lambda ref: _hub_errors(ref, offline=False), AdapterRef("hub", "org/name")),
    (_s3_errors, AdapterRef("s3", "bucket/name")),
])
def test_an_os_error_is_reported_without_its_file_name(
        errors: Callable[[AdapterRef], AbstractContextManager[None]], ref: AdapterRef) -> None:
    with pytest.raises(AdapterFetchError) as info, errors(ref):
        raise PermissionError(13, "Permission denied", SECRET)
    assert str(ref) in str(info.value) and "Permission denied" in str(info.value)
    assert "/srv" not in str(info.value)
