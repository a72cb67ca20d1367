"""parse_ref: which source and revision an API's adapter_id names, the ids it refuses and how it spells
what it accepts; AdapterSourceConfig validation."""

from __future__ import annotations

import re

import pytest

from loraplex.adapters import sources
from loraplex.adapters.ref import (
    MAX_ADAPTER_ID_CHARS,
    AdapterIdentity,
    AdapterIdInvalid,
    AdapterRef,
    parse_ref,
)
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


@pytest.mark.parametrize(("text", "source", "expected"), [
    # One folder, one spelling: the dots and slashes that name the same folder are dropped.
    ("upper", "local", AdapterRef("local", "upper")),
    ("./upper", "local", AdapterRef("local", "upper")),
    ("upper/", "local", AdapterRef("local", "upper")),
    ("./team//b/./", "local", AdapterRef("local", "team/b")),
    ("s3://bucket/a/b/", None, AdapterRef("s3", "bucket/a/b")),
    ("s3://bucket/", None, AdapterRef("s3", "bucket")),
    ("org/name@", "hub", AdapterRef("hub", "org/name")),
    ("org/name@refs/pr/3", "hub", AdapterRef("hub", "org/name", "refs/pr/3")),
    ("gpt2", "hub", AdapterRef("hub", "gpt2")),
])
def test_parse_ref_spells_one_adapter_one_way(text: str, source: str | None, expected: AdapterRef) -> None:
    ref = parse_ref(text, source, local_paths=False)
    assert ref == expected
    assert parse_ref(ref.request_id, ref.source, local_paths=False) == ref  # what the engine re-parses


@pytest.mark.parametrize(("text", "source", "message"), [
    ("x\u0000y", "local", "control characters"),
    ("x\ny", "hub", "control characters"),
    ("a\u202eb", "local", "control characters"),  # right-to-left override: a format character
    ("x" * (MAX_ADAPTER_ID_CHARS + 1), "local", f"at most {MAX_ADAPTER_ID_CHARS}"),
    ("", "local", "non-empty"),
    ("..", "local", "'..'"),
    ("team/../../etc", "local", "'..'"),
    ("./", "local", "names no folder"),
    ("/abs/upper", "local", "is a path"),
    ("~/upper", "local", "is a path"),
    (".hidden", "local", "may not start with '.'"),
    ("a b", "local", "may use only"),
    ("s3://bucket/x", "local", "may use only"),  # an explicit local source does not switch to s3
    ("org/na me", "hub", "not a Hugging Face repo id"),
    ("a/b/c", "hub", "not a Hugging Face repo id"),
    ("org/-name", "hub", "not a Hugging Face repo id"),
    ("org/na--me", "hub", "not a Hugging Face repo id"),
    ("o" * 97, "hub", "not a Hugging Face repo id"),
    ("org/name@../x", "hub", "not a branch"),
    ("org/name@-x", "hub", "not a branch"),
    ("s3://Bucket/x", None, "not an S3 bucket"),
    ("s3://ab/x", None, "not an S3 bucket"),
    ("s3://bucket/a//b", None, "empty, '.' or '..'"),
    ("s3://bucket/a/../b", None, "empty, '.' or '..'"),
])
def test_parse_ref_refuses_what_no_source_can_serve(text: str, source: str | None, message: str) -> None:
    with pytest.raises(AdapterIdInvalid, match=re.escape(message)) as info:
        parse_ref(text, source, local_paths=False)
    assert isinstance(info.value, ValueError)  # the API answers 422
    assert "\x00" not in str(info.value) and "\n" not in str(info.value)  # quoted escaped, never raw
    assert len(str(info.value)) < 400  # a long id is quoted cut short


def test_offline_api_takes_paths_but_not_control_characters_or_dotdot() -> None:
    assert parse_ref("/abs/my adapters/upper/").id == "/abs/my adapters/upper"
    assert parse_ref("~/upper").id == "~/upper"
    assert parse_ref("./upper").id == "upper"
    for bad in ("/abs/x\u0000y", "/abs/../etc", "/" + "x" * MAX_ADAPTER_ID_CHARS):
        with pytest.raises(AdapterIdInvalid):
            parse_ref(bad)


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


@pytest.mark.parametrize("name", ["", "has-dash", "has space", "1starts_with_digit", "a/b"])
def test_a_source_name_must_be_an_identifier(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sources, "_REGISTRY", dict(sources._REGISTRY))
    with pytest.raises(ValueError, match=f"adapter source names are identifiers, got {name!r}"):
        register_source(name, lambda config: None)  # type: ignore[arg-type,return-value]
    assert name not in sources.source_names()


def test_what_a_client_is_told_of_a_fetch_failure() -> None:
    detail = sources.fetch_error_detail
    # An OSError's text names local files: only its kind and reason go out.
    assert detail(FileNotFoundError(2, "No such file or directory", "/srv/cache/x")) == (
        "FileNotFoundError: No such file or directory")
    assert detail(OSError("/srv/cache/x")) == "OSError: I/O error"
    assert detail(TimeoutError(110, "Connection timed out")) == "TimeoutError: Connection timed out"
    assert detail(ValueError("bad header")) == "ValueError: bad header"


@pytest.mark.parametrize(("text", "source", "message"), [
    ("o" * 48 + "/" + "n" * 48, "hub", "not a Hugging Face repo id"),  # 97 characters with the slash
    ("org/na..me", "hub", "not a Hugging Face repo id"),
    ("org/name.git", "hub", "not a Hugging Face repo id"),
    ("org/name@a..b", "hub", "not a branch"),
    ("org/name@branch/", "hub", "not a branch"),
    ("org/name@branch.lock", "hub", "not a branch"),
    ("s3://my..bucket/x", None, "not an S3 bucket"),
    ("s3://bucket/./a", None, "empty, '.' or '..'"),
    ("s3:///bucket/", None, "not an S3 bucket"),  # no bucket before the prefix
    ("s3://bucket/a/.", None, "empty, '.' or '..'"),
])
def test_parse_ref_refuses_the_edges_of_each_sources_names(text: str, source: str | None, message: str) -> None:
    with pytest.raises(AdapterIdInvalid, match=re.escape(message)):
        parse_ref(text, source, local_paths=False)


@pytest.mark.parametrize(("text", "source", "expected"), [
    ("x" * MAX_ADAPTER_ID_CHARS, "local", AdapterRef("local", "x" * MAX_ADAPTER_ID_CHARS)),  # exactly the limit
    ("o" * 47 + "/" + "n" * 48, "hub", AdapterRef("hub", "o" * 47 + "/" + "n" * 48)),  # 96: the hub's limit
    ("org/name.gitx@v1.lockx", "hub", AdapterRef("hub", "org/name.gitx", "v1.lockx")),
    ("s3://bucket//a/", None, AdapterRef("s3", "bucket/a")),
    ("s3://bucket///", None, AdapterRef("s3", "bucket")),
])
def test_parse_ref_accepts_up_to_each_limit(text: str, source: str | None, expected: AdapterRef) -> None:
    assert parse_ref(text, source, local_paths=False) == expected


def test_a_refused_id_is_quoted_cut_short_with_an_ellipsis_only_when_cut() -> None:
    from loraplex.adapters.ref import shown_id

    assert shown_id("x" * 40) == repr("x" * 40)
    assert shown_id("x" * 41) == repr("x" * 40) + "..."
    with pytest.raises(AdapterIdInvalid, match=re.escape("local adapter id 'a b': the name 'a b' may")):
        parse_ref("a b", "local", local_paths=False)


def test_a_ref_without_a_revision_prints_without_an_at() -> None:
    assert str(AdapterRef("hub", "org/name")) == "hub:org/name"
    assert str(AdapterRef("local", "team/x@y")) == "local:team/x@y"
