"""The hub source through huggingface_hub's real download code, against a Hub emulated on loopback."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from pathlib import Path

import pytest
from huggingface_hub import snapshot_download

from loraplex.adapters.disk_store import DiskStore
from loraplex.adapters.hub_source import ADAPTER_FILES, HubSource
from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.ref import AdapterIdentity, AdapterRef, parse_ref
from loraplex.adapters.sources import Resolved
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import AdapterAccessDenied, AdapterFetchError, AdapterNotFound
from tests.adapters.adapter_files import adapter_files, medusa_files, parse, write_adapter
from tests.adapters.fake_hub import FakeHub


@pytest.fixture()
def hub(monkeypatch: pytest.MonkeyPatch, tmp_path_factory: pytest.TempPathFactory) -> Iterator[FakeHub]:
    from huggingface_hub import constants

    monkeypatch.delenv("HF_TOKEN", raising=False)  # the only tokens are the ones a test passes
    # An empty huggingface_hub cache of the test's own: the machine's may hold these repos' commits already
    # (the fake hub's shas are deterministic), and huggingface_hub then serves them without a download.
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path_factory.mktemp("hf-hub-cache")))
    with FakeHub() as fake:
        yield fake


def hub_source(hub: FakeHub, **config: object) -> HubSource:
    return HubSource(AdapterSourceConfig(hub_endpoint=hub.url, hub_offline=False, **config))  # type: ignore[arg-type]


def loader_for(source: HubSource, tmp_path: Path, **kwargs: object) -> AdapterLoader:
    return AdapterLoader({"hub": source}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30), **kwargs)  # type: ignore[arg-type]


def test_a_public_adapter_downloads_only_its_files(hub: FakeHub, tmp_path: Path) -> None:
    files = adapter_files(seed=3) | {"README.md": b"# card", "model.safetensors": b"\x00" * 4096,
                                     "sub/adapter_config.json": b"{}"}
    sha = hub.publish("org/public", files)
    with loader_for(hub_source(hub), tmp_path) as loader:
        loaded = loader.request(parse_ref("org/public", "hub")).result(timeout=60)
    assert loaded.identity == AdapterIdentity("hub", "org/public", sha)
    assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "same", seed=3)).content_hash
    assert sorted(p.name for p in loaded.path.iterdir() if not p.name.startswith(".")) == sorted(
        name for name in ADAPTER_FILES if name in files)
    downloaded = {p.rsplit("/", 1)[1] for m, p, _ in hub.requests if m == "GET" and "/resolve/" in p}
    assert downloaded == {"adapter_config.json", "adapter_model.safetensors"}


def test_medusa_heads_beside_the_lora_are_downloaded_with_it(hub: FakeHub, tmp_path: Path) -> None:
    hub.publish("org/lookahead", adapter_files(seed=3) | medusa_files(heads=3))
    with loader_for(hub_source(hub), tmp_path) as loader:
        loaded = loader.request(parse_ref("org/lookahead", "hub")).result(timeout=60)
    assert loaded.weights.medusa is not None and loaded.weights.medusa.num_heads == 3
    assert loaded.weights.layers  # and the LoRA


def test_a_private_adapter_needs_its_token(hub: FakeHub, tmp_path: Path) -> None:
    hub.publish("org/private", adapter_files(seed=4), token="hf_secret")
    ref = AdapterRef("hub", "org/private")
    with loader_for(hub_source(hub), tmp_path) as loader:
        with pytest.raises(AdapterAccessDenied, match="hub:org/private.*HTTP 401") as info:
            loader.request(ref).result(timeout=60)
        assert "hf_secret" not in str(info.value)
        with pytest.raises(AdapterAccessDenied, match="HTTP 401"):
            loader.request(ref, token="hf_wrong").result(timeout=60)
        loaded = loader.request(ref, token="hf_secret").result(timeout=60)
    assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "same", seed=4)).content_hash
    authorized = [p for m, p, auth in hub.requests if auth == "Bearer hf_secret"]
    assert any("/resolve/" in p for p in authorized) and any("/api/models/" in p for p in authorized)


def test_a_server_wide_token_is_used_when_the_request_brings_none(hub: FakeHub, tmp_path: Path) -> None:
    hub.publish("org/private", adapter_files(seed=4), token="hf_server")
    with loader_for(hub_source(hub, hub_token="hf_server"), tmp_path) as loader:
        assert loader.request(AdapterRef("hub", "org/private")).result(timeout=60).weights.rank == 4


def test_missing_repo_revision_or_bad_id(hub: FakeHub) -> None:
    hub.publish("org/there", adapter_files())
    source = hub_source(hub)
    with pytest.raises(AdapterNotFound, match="hub:org/absent"):
        source.resolve(AdapterRef("hub", "org/absent"), "hf_any")
    # Without a token the Hub cannot say whether the repo is missing or private: 401, access denied.
    with pytest.raises(AdapterAccessDenied, match="hub:org/absent"):
        source.resolve(AdapterRef("hub", "org/absent"), None)
    with pytest.raises(AdapterNotFound, match="hub:org/there@nope"):
        source.resolve(AdapterRef("hub", "org/there", "nope"), None)
    with pytest.raises(AdapterNotFound, match="not a hub repo id"):
        source.resolve(AdapterRef("hub", "a/b/c"), None)


def test_a_push_to_the_branch_is_a_new_identity_and_a_pinned_commit_is_not(hub: FakeHub, tmp_path: Path) -> None:
    old = hub.publish("org/moving", adapter_files(seed=1))
    with loader_for(hub_source(hub), tmp_path, revalidate_s=0.0) as loader:
        first = loader.request(AdapterRef("hub", "org/moving")).result(timeout=60)
        new = hub.publish("org/moving", adapter_files(seed=2))
        second = loader.request(AdapterRef("hub", "org/moving")).result(timeout=60)
        assert (first.identity.version, second.identity.version) == (old, new)
        assert second.weights.content_hash != first.weights.content_hash
        info_calls = hub.count("GET", "/api/models/org/moving/revision/")
        pinned = [loader.request(parse_ref(f"org/moving@{old}", "hub")).result(timeout=60) for _ in range(3)]
        assert all(p.identity.version == old for p in pinned)
        assert pinned[0].weights.content_hash == first.weights.content_hash
        assert hub.count("GET", "/api/models/org/moving/revision/") == info_calls  # a commit never moves


def test_offline_mode_serves_a_prepopulated_cache_without_the_network(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.publish("org/cached", adapter_files(seed=6))
    cache = tmp_path / "hf-cache"
    snapshot_download("org/cached", cache_dir=cache, endpoint=hub.url, allow_patterns=ADAPTER_FILES)
    seen = len(hub.requests)
    source = HubSource(AdapterSourceConfig(hub_endpoint=hub.url, hub_offline=True, hub_cache_dir=str(cache)))
    with AdapterLoader({"hub": source}, parse) as loader:
        loaded = loader.request(AdapterRef("hub", "org/cached")).result(timeout=60)
        assert loaded.identity.version == sha and loaded.path.is_relative_to(cache)
        assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "same", seed=6)).content_hash
        with pytest.raises(AdapterNotFound, match="hub:org/elsewhere.*offline"):
            loader.request(AdapterRef("hub", "org/elsewhere")).result(timeout=60)
    assert len(hub.requests) == seen


def test_an_unreachable_hub_is_a_fetch_error() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening: connections are refused
        source = HubSource(AdapterSourceConfig(hub_endpoint=f"http://127.0.0.1:{sock.getsockname()[1]}",
                                               hub_offline=False))
        with pytest.raises(AdapterFetchError, match="hub:org/any") as info:
            source.resolve(AdapterRef("hub", "org/any"), None)
    assert isinstance(info.value.__cause__, Exception)


def test_a_pinned_commit_is_trusted_for_good_and_fetched_exactly(hub: FakeHub, tmp_path: Path) -> None:
    import math

    old = hub.publish("org/moving", adapter_files(seed=1))
    hub.publish("org/moving", adapter_files(seed=2))  # the branch has moved on since
    source = hub_source(hub)
    assert source.resolve(AdapterRef("hub", "org/moving", old), None) == Resolved(version=old, ttl_s=math.inf)
    assert source.resolve(AdapterRef("hub", "org/moving"), None).ttl_s is None  # a branch: revalidated
    with loader_for(source, tmp_path) as loader:
        pinned = loader.request(parse_ref(f"org/moving@{old}", "hub")).result(timeout=60)
    assert pinned.weights.content_hash == parse(write_adapter(tmp_path / "old", seed=1)).content_hash


def test_a_fetch_leaves_no_bookkeeping_and_draws_no_progress_bars(hub: FakeHub, tmp_path: Path,
                                                                 capfd: pytest.CaptureFixture[str]) -> None:
    hub.publish("org/public", adapter_files(seed=3))
    with loader_for(hub_source(hub), tmp_path) as loader:
        loaded = loader.request(AdapterRef("hub", "org/public")).result(timeout=60)
    assert not (loaded.path / ".cache").exists()  # huggingface_hub's local_dir metadata is removed
    assert capfd.readouterr().err == ""


def test_offline_a_pinned_revision_is_served_from_the_cache_for_good(hub: FakeHub, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    import math

    from huggingface_hub import constants

    old = hub.publish("org/cached", adapter_files(seed=1))
    new = hub.publish("org/cached", adapter_files(seed=2))
    cache = tmp_path / "hf-cache"
    for revision in (old, "main"):
        snapshot_download("org/cached", revision=revision, cache_dir=cache, endpoint=hub.url,
                          allow_patterns=ADAPTER_FILES)
    seen = len(hub.requests)
    # Were the source to go online after all, it would reach the fake hub (and the test would see it).
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    source = HubSource(AdapterSourceConfig(hub_offline=True, hub_cache_dir=str(cache)))
    pinned = source.resolve(AdapterRef("hub", "org/cached", old), None)
    assert (pinned.version, pinned.ttl_s) == (old, math.inf) and pinned.path is not None
    latest = source.resolve(AdapterRef("hub", "org/cached"), None)
    assert (latest.version, latest.ttl_s) == (new, None)
    assert parse(pinned.path).content_hash == parse(write_adapter(tmp_path / "old", seed=1)).content_hash
    assert len(hub.requests) == seen


def test_the_offline_setting_defaults_to_huggingface_hubs_own(monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import constants

    for hf_offline in (True, False):
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", hf_offline)
        assert HubSource(AdapterSourceConfig(hub_offline=None)).is_offline() is hf_offline
        assert HubSource(AdapterSourceConfig(hub_offline=not hf_offline)).is_offline() is (not hf_offline)


def test_a_hub_that_goes_away_between_resolve_and_fetch_is_a_fetch_error(hub: FakeHub, tmp_path: Path) -> None:
    sha = hub.publish("org/public", adapter_files(seed=3))
    source = hub_source(hub)
    resolved = source.resolve(AdapterRef("hub", "org/public"), None)
    assert resolved.version == sha
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))  # bound, never listening
        source.endpoint = f"http://127.0.0.1:{sock.getsockname()[1]}"
        dest = tmp_path / "dest"
        dest.mkdir()
        with pytest.raises(AdapterFetchError, match="hub:org/public: .*(could not be reached|failed)"):
            source.fetch(AdapterRef("hub", "org/public"), resolved, None, dest)


def test_a_server_error_is_reported_with_its_first_line_and_the_endpoint(hub: FakeHub,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    from huggingface_hub import HfApi, constants
    from huggingface_hub.hf_api import ModelInfo

    hub.publish("org/flaky", adapter_files())
    hub.failures["/api/models/org/flaky"] = (500, "the database is down")
    with pytest.raises(AdapterFetchError, match=r"hub:org/flaky: the hub answered HTTP 500: ") as info:
        hub_source(hub).resolve(AdapterRef("hub", "org/flaky"), None)
    assert "\n" not in str(info.value)
    hub.failures.clear()
    # A hub that answers without the commit sha: named by its endpoint (the configured one, else the default).
    monkeypatch.setattr(HfApi, "model_info", lambda *a, **k: ModelInfo(id="org/flaky", sha=None))
    with pytest.raises(AdapterFetchError, match=f"the hub at {hub.url} did not say which commit"):
        hub_source(hub).resolve(AdapterRef("hub", "org/flaky"), None)
    monkeypatch.setattr(constants, "ENDPOINT", "https://hub.example")
    with pytest.raises(AdapterFetchError, match="the hub at https://hub.example did not say"):
        HubSource(AdapterSourceConfig(hub_offline=False)).resolve(AdapterRef("hub", "org/flaky"), None)


def test_an_error_message_is_its_first_non_blank_line_else_its_kind() -> None:
    from loraplex.adapters.hub_source import _first_line

    assert _first_line(RuntimeError("\n  \nfirst\nsecond")) == "first"
    assert _first_line(ValueError("")) == "ValueError"
