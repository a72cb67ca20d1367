"""parse_ref: which source and revision an API's adapter_id names; AdapterSourceConfig validation."""

from __future__ import annotations

import pytest

from loraplex.adapters import sources
from loraplex.adapters.ref import AdapterIdentity, AdapterRef, parse_ref
from loraplex.adapters.sources import build_sources, register_source
from loraplex.config import AdapterSourceConfig


@pytest.mark.parametrize(("text", "source", "expected"), [
    ("org/name", "hub", AdapterRef("hub", "org/name")),
    ("org/name@v2", "hub", AdapterRef("hub", "org/name", "v2")),
    ("s3://bucket/a/b", None, AdapterRef("s3", "bucket/a/b")),
    ("s3://bucket/a/b", "s3", AdapterRef("s3", "bucket/a/b")),
    ("bucket/a", "s3", AdapterRef("s3", "bucket/a")),
    ("team/x@y", "local", AdapterRef("local", "team/x@y")),  # '@' is only a revision on the hub
    ("team/x", None, AdapterRef("local", "team/x")),
])
def test_parse_ref(text: str, source: str | None, expected: AdapterRef) -> None:
    assert parse_ref(text, source) == expected


def test_identity_and_ref_text_never_hold_a_token() -> None:
    assert str(AdapterRef("hub", "org/name", "main")) == "hub:org/name@main"
    assert str(AdapterIdentity("hub", "org/name", "f" * 40)) == "hub:org/name#ffffffffffff"
    assert "secret" not in repr(AdapterSourceConfig(hub_token="secret"))


@pytest.mark.parametrize(("field", "value"), [
    ("sources", ()), ("adapter_roots", ("",)), ("hub_token", ""), ("disk_cache_bytes", -1),
    ("host_cache_bytes", -1), ("loader_workers", 0), ("negative_ttl_s", -1.0), ("revalidate_s", -0.5),
])
def test_config_rejects_bad_values_by_name(field: str, value: object) -> None:
    with pytest.raises(ValueError, match=field):
        AdapterSourceConfig(**{field: value})  # type: ignore[arg-type]


def test_build_sources_knows_registered_names_and_refuses_others(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))  # the registration ends with the test

    class Nothing:
        def __init__(self, config: AdapterSourceConfig) -> None:
            self.config = config

    register_source("nothing_test", Nothing)  # type: ignore[arg-type]
    built = build_sources(AdapterSourceConfig(sources=("local", "nothing_test")))
    assert set(built) == {"local", "nothing_test"}
    with pytest.raises(ValueError, match="'nope'"):
        build_sources(AdapterSourceConfig(sources=("nope",)))
