"""A demo-model server for hostile traffic (the fuzzer, the isolation test): cheap generations, no network.

Generation is kept cheap so a fuzzer's worst valid request (n=16, the longest max_tokens) costs a few
seconds, not minutes: a 48-token context (a chat prompt with the template's system message is ~30 of
them), which `max_total_tokens` equals so that OpenAI requests without max_tokens (until the end of the
context) still generate; a test that needs longer generations passes its own limits. The hub and S3 sources stay
configured (so hostile ids reach their parsing and validation code) but can only ever talk to a closed
loopback port: the hub is offline over an empty cache and S3's endpoint is 127.0.0.1:9 with fake keys
and no instance-metadata lookups. Local adapters are the bundled examples (`upper`, `invoice-json`),
served because no `--adapter-root` is given.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from loraplex.config import EngineConfig, ServerConfig
from loraplex.server.app import build_state, create_app
from tests.e2e.conftest import RunningServer, ServerThread

MAX_MODEL_LEN = 48
MAX_TOTAL_TOKENS = 48
CLOSED_PORT = "http://127.0.0.1:9"  # discard: nothing listens there, connections are refused at once
OFFLINE_ENV = {
    "AWS_ACCESS_KEY_ID": "fuzz", "AWS_SECRET_ACCESS_KEY": "fuzz", "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_CONFIG_FILE": "/nonexistent", "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
    "AWS_EC2_METADATA_DISABLED": "true", "AWS_MAX_ATTEMPTS": "1", "AWS_ENDPOINT_URL": CLOSED_PORT,
    "HF_HUB_OFFLINE": "1",
}


@contextmanager
def hardened_server(tmp: Path, **engine_options: Any) -> Iterator[RunningServer]:
    with pytest.MonkeyPatch.context() as env:
        for name, value in OFFLINE_ENV.items():
            env.setenv(name, value)
        options: dict[str, Any] = {
            "max_model_len": MAX_MODEL_LEN, "max_total_tokens": MAX_TOTAL_TOKENS, "num_blocks": 256,
            "max_loras": 4, "max_lora_rank": 16, "hub_offline": True, "hub_endpoint": CLOSED_PORT,
            "hub_cache_dir": str(tmp / "hub-cache"), "s3_endpoint_url": CLOSED_PORT,
            "disk_cache_dir": str(tmp / "adapter-disk"), **engine_options,
        }
        (tmp / "hub-cache").mkdir(exist_ok=True)
        state = build_state(EngineConfig.from_options(**options), ServerConfig(max_best_of=3))
        thread = ServerThread(create_app(state))
        try:
            yield RunningServer(thread.start(), state, {})
        finally:
            thread.stop()


def _no_constant(name: str) -> float:
    raise ValueError(f"{name} is not JSON")


def strict_json(text: str) -> Any:
    """json.loads that refuses NaN and ±Infinity, which Python writes but JSON (RFC 8259) has not."""
    value = json.loads(text, parse_constant=_no_constant)
    _finite(value)
    return value


def _finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):  # 1e999 parses to inf without a constant
        raise ValueError(f"{value} is not a finite JSON number")
    if isinstance(value, dict):
        for v in value.values():
            _finite(v)
    elif isinstance(value, list):
        for v in value:
            _finite(v)


def sse_payloads(text: str) -> list[str]:
    """The `data:` payloads of a server-sent event stream (both `data:x` and `data: x` spellings)."""
    return [line[5:].strip() for line in text.splitlines() if line.startswith("data:")]


def error_problems(path: str, body: Any) -> list[str]:
    """What is wrong with an error body, per API: native `{"error": str, "error_type": str}`, OpenAI
    `{"error": {"message": str, "type": str, ...}}` (README and ../shared/API.md)."""
    if not isinstance(body, dict) or "error" not in body:
        return [f"error body without `error`: {body!r:.300}"]
    error = body["error"]
    if path.startswith("/v1/") and not path.startswith("/v1/adapters"):
        if not (isinstance(error, dict) and isinstance(error.get("message"), str) and isinstance(error.get("type"), str)):
            return [f"OpenAI error body is not {{error: {{message, type}}}}: {body!r:.300}"]
        return []
    if not (isinstance(error, str) and isinstance(body.get("error_type"), str)):
        return [f"native error body is not {{error, error_type}}: {body!r:.300}"]
    return []
