"""The s3 source against a real S3-compatible server (moto's server mode on loopback) through boto3."""

from __future__ import annotations

import re
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from loraplex.adapters.disk_store import DiskStore
from loraplex.adapters.loader import AdapterLoader
from loraplex.adapters.ref import AdapterRef, parse_ref
from loraplex.adapters.s3_source import S3Source
from loraplex.config import AdapterSourceConfig
from loraplex.lora.adapter import (
    CONFIG_FILE,
    SAFETENSORS_FILE,
    AdapterFetchError,
    AdapterInvalid,
    AdapterNotFound,
)
from tests.adapters.adapter_files import adapter_files, medusa_files, parse, write_adapter

BUCKET = "adapters"


@pytest.fixture(scope="module")
def endpoint() -> Iterator[str]:
    with pytest.MonkeyPatch.context() as env:
        # Credentials of the standard chain, and none of this machine's own AWS files.
        env.setenv("AWS_ACCESS_KEY_ID", "testing")
        env.setenv("AWS_SECRET_ACCESS_KEY", "testing")
        env.setenv("AWS_DEFAULT_REGION", "us-east-1")
        env.setenv("AWS_CONFIG_FILE", "/nonexistent")
        env.setenv("AWS_SHARED_CREDENTIALS_FILE", "/nonexistent")
        env.delenv("AWS_ENDPOINT_URL", raising=False)
        server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
        server.start()
        host, port = server.get_host_and_port()
        url = f"http://{host}:{port}"
        boto3.client("s3", endpoint_url=url).create_bucket(Bucket=BUCKET)
        try:
            yield url
        finally:
            server.stop()


@pytest.fixture()
def s3(endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=endpoint)


def upload(s3: Any, prefix: str, files: dict[str, bytes]) -> None:
    for name, data in files.items():
        s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=data)


def source(endpoint: str) -> S3Source:
    return S3Source(AdapterSourceConfig(s3_endpoint_url=endpoint))


def test_an_uploaded_adapter_loads_through_the_disk_tier(endpoint: str, s3: Any, tmp_path: Path) -> None:
    upload(s3, "team/one", adapter_files(seed=5))
    s3.put_object(Bucket=BUCKET, Key="team/one/README.md", Body=b"not an adapter file")
    s3.put_object(Bucket=BUCKET, Key="team/one/nested/adapter_config.json", Body=b"{}")
    disk = DiskStore(tmp_path / "disk", 1 << 30)
    with AdapterLoader({"s3": source(endpoint)}, parse, disk=disk) as loader:
        loaded = loader.request(parse_ref(f"s3://{BUCKET}/team/one")).result(timeout=60)
    assert loaded.identity.source == "s3" and loaded.identity.id == f"{BUCKET}/team/one"
    assert loaded.identity.version.startswith("etag-")
    assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "same", seed=5)).content_hash
    assert loaded.path == disk.get(loaded.identity)
    assert sorted(p.name for p in loaded.path.iterdir() if not p.name.startswith(".")) == sorted(
        [CONFIG_FILE, SAFETENSORS_FILE])


def test_medusa_heads_alone_load_from_s3(endpoint: str, s3: Any, tmp_path: Path) -> None:
    upload(s3, "team/heads", medusa_files(heads=2))
    with AdapterLoader({"s3": source(endpoint)}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30)) as loader:
        loaded = loader.request(parse_ref(f"s3://{BUCKET}/team/heads")).result(timeout=60)
    assert loaded.weights.medusa is not None and loaded.weights.medusa.num_heads == 2
    assert not loaded.weights.layers  # heads alone: no LoRA


def test_missing_prefix_or_bucket_is_not_found(endpoint: str) -> None:
    with pytest.raises(AdapterNotFound, match=f"s3:{BUCKET}/nothing/here"):
        source(endpoint).resolve(AdapterRef("s3", f"{BUCKET}/nothing/here"), None)
    with pytest.raises(AdapterNotFound, match="NoSuchBucket"):
        source(endpoint).resolve(AdapterRef("s3", "no-such-bucket/x"), None)


def test_a_changed_object_is_a_new_identity(endpoint: str, s3: Any, tmp_path: Path) -> None:
    upload(s3, "team/two", adapter_files(seed=1))
    src = source(endpoint)
    with AdapterLoader({"s3": src}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30), revalidate_s=0.0) as loader:
        first = loader.request(AdapterRef("s3", f"{BUCKET}/team/two")).result(timeout=60)
        assert loader.request(AdapterRef("s3", f"{BUCKET}/team/two")).result(timeout=60) is first
        upload(s3, "team/two", {SAFETENSORS_FILE: adapter_files(seed=2)[SAFETENSORS_FILE]})
        second = loader.request(AdapterRef("s3", f"{BUCKET}/team/two")).result(timeout=60)
    assert second.identity.version != first.identity.version
    assert second.weights.content_hash == parse(write_adapter(tmp_path / "v2", seed=2)).content_hash


def test_an_object_replaced_between_resolve_and_fetch_fails_the_fetch(endpoint: str, s3: Any,
                                                                      tmp_path: Path) -> None:
    upload(s3, "team/three", adapter_files(seed=1))
    src, ref = source(endpoint), AdapterRef("s3", f"{BUCKET}/team/three")
    resolved = src.resolve(ref, None)
    upload(s3, "team/three", {SAFETENSORS_FILE: adapter_files(seed=9)[SAFETENSORS_FILE]})
    with pytest.raises(AdapterFetchError, match="changed"):
        src.fetch(ref, resolved, None, tmp_path)


def test_weights_without_a_config_are_invalid(endpoint: str, s3: Any, tmp_path: Path) -> None:
    upload(s3, "team/four", {SAFETENSORS_FILE: adapter_files()[SAFETENSORS_FILE]})
    with (AdapterLoader({"s3": source(endpoint)}, parse, disk=DiskStore(tmp_path / "disk", 1 << 30)) as loader,
          pytest.raises(AdapterInvalid, match=f"s3:{BUCKET}/team/four.*no adapter_config.json")):
        loader.request(AdapterRef("s3", f"{BUCKET}/team/four")).result(timeout=60)


def test_an_unreachable_endpoint_is_a_fetch_error(monkeypatch: pytest.MonkeyPatch, endpoint: str) -> None:
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        closed = f"http://127.0.0.1:{sock.getsockname()[1]}"  # bound, never listening: refused
        with pytest.raises(AdapterFetchError, match=f"s3:{BUCKET}/x"):
            source(closed).resolve(AdapterRef("s3", f"{BUCKET}/x"), None)


def test_the_endpoint_comes_from_the_standard_variable_when_not_configured(monkeypatch: pytest.MonkeyPatch,
                                                                           endpoint: str, s3: Any) -> None:
    upload(s3, "team/env", adapter_files(seed=1))
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    src = S3Source(AdapterSourceConfig())
    assert src.endpoint_url == endpoint
    assert src.resolve(AdapterRef("s3", f"{BUCKET}/team/env"), None).version.startswith("etag-")
    assert S3Source(AdapterSourceConfig(s3_endpoint_url="http://configured:9000")).endpoint_url == (
        "http://configured:9000")
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    assert S3Source(AdapterSourceConfig()).endpoint_url is None


def test_an_s3_ref_with_a_revision_is_invalid(endpoint: str) -> None:
    with pytest.raises(AdapterInvalid, match=f"s3:{BUCKET}/x@v1: s3 adapters have no revisions"):
        source(endpoint).resolve(AdapterRef("s3", f"{BUCKET}/x", "v1"), None)


def test_an_adapter_may_fill_a_whole_bucket(endpoint: str, s3: Any, tmp_path: Path) -> None:
    s3.create_bucket(Bucket="whole-adapter")
    for name, data in adapter_files(seed=2).items():
        s3.put_object(Bucket="whole-adapter", Key=name, Body=data)
    with AdapterLoader({"s3": source(endpoint)}, parse) as loader:
        loaded = loader.request(parse_ref("s3://whole-adapter")).result(timeout=60)
    assert loaded.weights.content_hash == parse(write_adapter(tmp_path / "same", seed=2)).content_hash


def test_an_object_replaced_during_the_fetch_is_refused_not_mixed(endpoint: str, s3: Any, tmp_path: Path) -> None:
    # The fetch lists the objects, then reads each one by the ETag it listed (If-Match): a write that lands
    # between the two fails the fetch instead of mixing two versions' files.
    upload(s3, "team/race", adapter_files(seed=1))
    src, ref = source(endpoint), AdapterRef("s3", f"{BUCKET}/team/race")
    resolved = src.resolve(ref, None)
    listed = src._list  # noqa: SLF001

    def list_then_replace(r: AdapterRef) -> dict[str, dict[str, Any]]:
        objects = listed(r)
        upload(s3, "team/race", {SAFETENSORS_FILE: adapter_files(seed=2)[SAFETENSORS_FILE]})
        return objects

    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(src, "_list", list_then_replace)
    try:
        with pytest.raises(AdapterFetchError, match=f"s3:{BUCKET}/team/race: S3 error PreconditionFailed"):
            src.fetch(ref, resolved, None, tmp_path)
    finally:
        monkeypatch.undo()


def test_a_body_shorter_than_its_listed_size_fails_the_fetch(endpoint: str, s3: Any, tmp_path: Path) -> None:
    upload(s3, "team/short", adapter_files(seed=1))
    src, ref = source(endpoint), AdapterRef("s3", f"{BUCKET}/team/short")
    resolved = src.resolve(ref, None)
    client = src._s3()  # noqa: SLF001
    real_get = client.get_object

    class Truncated:
        def __init__(self, body: Any) -> None:
            self.body, self.left = body, 10

        def read(self, n: int) -> bytes:
            data = self.body.read(min(n, self.left))
            self.left -= len(data)
            return data

        def __enter__(self) -> Truncated:
            return self

        def __exit__(self, *exc: object) -> None:
            self.body.close()

    def get_object(**kwargs: Any) -> dict[str, Any]:
        answer = real_get(**kwargs)
        return {**answer, "Body": Truncated(answer["Body"])}

    client.get_object = get_object
    sizes = {name: len(data) for name, data in adapter_files(seed=1).items()}
    with pytest.raises(AdapterFetchError, match=r"s3://adapters/team/short/(\S+) ended after 10 of (\d+) bytes") as info:
        src.fetch(ref, resolved, None, tmp_path)
    name, size = re.search(r"team/short/(\S+) ended after 10 of (\d+)", str(info.value)).groups()  # type: ignore[union-attr]
    assert sizes[name] == int(size)
