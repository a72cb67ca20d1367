"""request_ref: the check every adapter id a client sends passes, and the source policy with it."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest

from loraplex.adapters.ref import AdapterIdInvalid, AdapterRef
from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.adapters import request_ref
from loraplex.server.app import build_state, preload


@pytest.mark.parametrize(("adapter_id", "source", "allowed", "expected"), [
    ("./team/x/", None, (), AdapterRef("local", "team/x")),
    ("org/name@v1", "hub", ("hub",), AdapterRef("hub", "org/name", "v1")),
    ("s3://bucket/p/", None, ("s3",), AdapterRef("s3", "bucket/p")),
])
def test_an_allowed_source_passes_in_canonical_spelling(adapter_id: str, source: str | None,
                                                        allowed: tuple[str, ...], expected: AdapterRef) -> None:
    assert request_ref(adapter_id, source, "local", allowed) == expected


@pytest.mark.parametrize(("adapter_id", "source"), [("org/name", "hub"), ("s3://bucket/p", None),
                                                    ("bucket/p", "s3")])
def test_a_source_the_operator_did_not_enable_is_refused(adapter_id: str, source: str | None) -> None:
    with pytest.raises(AdapterIdInvalid, match="not enabled for requests"):
        request_ref(adapter_id, source, "local", ("local",))


def test_the_servers_own_source_is_always_allowed() -> None:
    assert request_ref("org/name", None, "hub", ()) == AdapterRef("hub", "org/name")
    with pytest.raises(AdapterIdInvalid, match="not enabled for requests"):
        request_ref("x", "local", "hub", ())  # then local is not, unless allowed


def test_local_ids_from_clients_are_names_never_paths() -> None:
    with pytest.raises(AdapterIdInvalid, match="is a path"):
        request_ref("/srv/adapters/x", None, "local", ("local",))


def test_server_config_defaults_to_local_requests_and_checks_names() -> None:
    assert ServerConfig().allow_request_sources == ("local",)
    assert ServerConfig(allow_request_sources=["hub", "s3"]).allow_request_sources == ("hub", "s3")
    with pytest.raises(ValueError, match="allow_request_sources"):
        ServerConfig(allow_request_sources=("hub,s3",))


@pytest.mark.parametrize("adapter_id", ["x\u0000y", "/srv/adapters/x", "../x", "a" * 5000])
def test_preloaded_ids_pass_the_same_check(adapter_id: str) -> None:
    unused = SimpleNamespace(request=None, warm=None)  # the check comes before any load
    state = SimpleNamespace(config=ServerConfig(preloaded_adapter_ids=(adapter_id,)),
                            engine=SimpleNamespace(engine=SimpleNamespace(adapters=unused, lora=unused)))
    with pytest.raises(AdapterIdInvalid):
        preload(state)  # type: ignore[arg-type]


def test_a_request_source_the_engine_lacks_is_refused_at_startup() -> None:
    with pytest.raises(ValueError, match=r"\['hub'\]"):
        build_state(EngineConfig.from_options(sources=("local",)), ServerConfig(allow_request_sources=("hub",)))


def test_preloading_needs_adapter_slots_and_names_the_id_that_fails() -> None:
    from concurrent.futures import Future

    from loraplex.lora.adapter import AdapterNotFound

    no_slots = SimpleNamespace(config=ServerConfig(preloaded_adapter_ids=("team/a",)),
                               engine=SimpleNamespace(engine=SimpleNamespace(adapters=None, lora=None)))
    with pytest.raises(ValueError, match=r"^preloaded_adapter_ids needs max_loras > 0$"):
        preload(no_slots)  # type: ignore[arg-type]
    missing: Future[object] = Future()
    missing.set_exception(AdapterNotFound("adapter local:team/a: not a folder under the adapter roots"))
    failing = SimpleNamespace(request=lambda ref: missing, warm=None)
    state = SimpleNamespace(config=ServerConfig(preloaded_adapter_ids=("team/a",)),
                            engine=SimpleNamespace(engine=SimpleNamespace(adapters=failing, lora=failing)))
    with pytest.raises(ValueError, match=r"^preloaded adapter 'team/a' could not be loaded: adapter local:team/a: "):
        preload(state)  # type: ignore[arg-type]
    assert ServerConfig().preloaded_adapter_ids == ()  # nothing preloaded: nothing asked of the engine
    preload(SimpleNamespace(config=ServerConfig(), engine=SimpleNamespace(engine=None)))  # type: ignore[arg-type]


def test_a_native_grammar_becomes_a_response_format_or_is_refused_by_name() -> None:
    from loraplex.server.protocol import Grammar

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}}
    for value in (schema, json.dumps(schema)):
        response_format = Grammar(type="json", value=value).as_response_format()
        assert (response_format.type, response_format.schema_) == ("json_object", schema)
    with pytest.raises(ValueError, match=r'^grammar of type "regex" is not supported; use a "json" grammar or '
                                         r"response_format$"):
        Grammar(type="regex", value="[a-z]+").as_response_format()
    for not_an_object in ("[1, 2]", "3"):
        with pytest.raises(ValueError, match="^grammar.value must be a JSON schema object$"):
            Grammar(type="json", value=not_an_object).as_response_format()
