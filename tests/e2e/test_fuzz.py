"""Schema fuzzing of the whole HTTP API (schemathesis over the app's own OpenAPI) against a live server.

Every operation FastAPI documents gets generated requests, valid (positive) and schema-violating
(negative), sent over a real socket to the demo-model server. Whatever arrives, the server must answer:
never a 5xx, never a hang (each request has a timeout), always strict JSON (no NaN/Infinity) with the
documented error shape for errors, and /health stays 200 once the run is over.

The default suite derandomizes Hypothesis (the same cases on every run, so CI is reproducible) and keeps
the example counts small enough for ~1 minute on a 2-core machine; `pytest -m slow` runs a randomized,
several times larger sweep. Failing cases are collected, not raised one by one, so a run reports every
distinct failure with the exact request that caused it. No operation is skipped: all of them are cheap
on the hardened server (tests/e2e/hardened.py), which bounds every sequence to 48 tokens.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import pytest
import requests
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis.errors import Unsatisfiable
from schemathesis import GenerationMode

from tests.e2e.conftest import RunningServer
from tests.e2e.hardened import error_problems, hardened_server, sse_payloads, strict_json

REQUEST_TIMEOUT_S = 60.0
# Native stream error events carry their error_type only; these are the types of 5xx statuses
# (loraplex/server/errors.py).
SERVER_ERROR_TYPES = {"internal", "generation", "unavailable", "no_free_slot"}
# Operations that start generations cost engine steps; the rest answer at once and get more examples.
GENERATING = ("/generate", "/generate_stream", "/", "/v1/completions", "/v1/chat/completions")


@dataclass
class FuzzLog:
    cases: Counter[str] = field(default_factory=Counter)
    statuses: Counter[str] = field(default_factory=Counter)
    seconds: Counter[str] = field(default_factory=Counter)
    failures: dict[str, str] = field(default_factory=dict)
    """A short key per distinct failure (operation, kind, status) → the first request that showed it."""

    def fail(self, key: str, case: schemathesis.Case, detail: str) -> None:
        self.failures.setdefault(key, f"{detail}\n    request: {_describe(case)}")


@pytest.fixture(scope="module")
def fuzz_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RunningServer]:
    with hardened_server(tmp_path_factory.mktemp("fuzz")) as server:
        yield server


def _describe(case: schemathesis.Case) -> str:
    """The request as a curl command (what a bug report needs to reproduce it)."""
    command = case.as_curl_command(headers={})
    return command if len(command) <= 3000 else command[:3000] + f"... ({len(command)} characters)"


def check_response(log: FuzzLog, case: schemathesis.Case, response: schemathesis.Response) -> None:
    op = f"{case.method} {case.path}"
    status = response.status_code
    log.statuses[f"{status // 100}xx"] += 1
    if status >= 500:
        log.fail(f"{op} {status}", case, f"{op} answered {status}: {response.text_lossy()[:500]}")
    content_type = (response.headers.get("content-type") or [""])[0]
    if content_type.startswith("text/event-stream"):
        for payload in sse_payloads(response.text_lossy()):
            if payload == "[DONE]":
                continue
            try:
                event = strict_json(payload)
            except ValueError as e:
                log.fail(f"{op} stream-json", case, f"{op} streamed an event that is not JSON ({e}): {payload[:300]}")
                continue
            if isinstance(event, dict) and "error" in event:
                error = event["error"]
                code = error.get("code") if isinstance(error, dict) else None
                kind = error.get("type") if isinstance(error, dict) else event.get("error_type")
                if (isinstance(code, int) and code >= 500) or kind in SERVER_ERROR_TYPES:
                    log.fail(f"{op} stream-{kind}", case, f"{op} streamed a server error: {payload[:500]}")
        return
    if not content_type.startswith("application/json"):
        return  # /metrics (Prometheus text)
    try:
        body = strict_json(response.text_lossy())
    except ValueError as e:
        log.fail(f"{op} json", case, f"{op} answered {status} with a body that is not JSON ({e}): {response.text_lossy()[:300]}")
        return
    if status >= 400:
        for problem in error_problems(case.path, body):
            log.fail(f"{op} error-shape", case, f"{op} answered {status}: {problem}")


def fuzz_operation(log: FuzzLog, server: RunningServer, operation: Any, mode: GenerationMode,
                   examples: int, derandomize: bool) -> None:
    session = requests.Session()

    @settings(max_examples=examples, deadline=None, database=None, derandomize=derandomize,
              suppress_health_check=list(HealthCheck), phases=[Phase.generate])
    @given(case=operation.as_strategy(generation_mode=mode))
    def run(case: schemathesis.Case) -> None:
        op = f"{case.method} {case.path}"
        started = time.monotonic()
        try:
            response = case.call(base_url=server.url, session=session, timeout=REQUEST_TIMEOUT_S)
        except requests.Timeout:
            log.cases[op] += 1
            log.fail(f"{op} timeout", case, f"{op} gave no answer within {REQUEST_TIMEOUT_S:.0f} s")
            return
        except requests.exceptions.InvalidHeader:
            return  # a header value `requests` itself refuses to send: nothing reached the server
        except requests.ConnectionError as e:
            log.cases[op] += 1
            log.fail(f"{op} connection", case, f"{op}: the connection failed: {e}")
            return
        finally:
            log.seconds[op] += time.monotonic() - started
        log.cases[op] += 1
        check_response(log, case, response)

    try:
        run()
    except Unsatisfiable:
        pass  # no negative case exists for an operation without parameters (GET /health)
    finally:
        session.close()


def run_fuzz(server: RunningServer, capsys: pytest.CaptureFixture[str], generating: int, other: int,
             derandomize: bool) -> FuzzLog:
    schema = schemathesis.openapi.from_url(server.url + "/openapi.json")
    log = FuzzLog()
    started = time.monotonic()
    operations = [result.ok() for result in schema.get_all_operations()]
    for operation in operations:
        examples = generating if operation.path in GENERATING else other
        for mode, count in ((GenerationMode.POSITIVE, examples), (GenerationMode.NEGATIVE, max(1, examples // 2))):
            fuzz_operation(log, server, operation, mode, count, derandomize)
    elapsed = time.monotonic() - started
    health = httpx.get(server.url + "/health", timeout=10)
    metrics = httpx.get(server.url + "/metrics", timeout=10)
    summary = (f"fuzz: {sum(log.cases.values())} cases over {len(operations)} operations in {elapsed:.0f} s; "
               f"statuses {dict(sorted(log.statuses.items()))}; {len(log.failures)} distinct failures; "
               f"/health {health.status_code}; /metrics {len(metrics.content)} bytes")
    with capsys.disabled():  # the case count belongs in every run's output, not only with -s
        print(f"\n{summary}")
        for op, n in sorted(log.cases.items()):
            print(f"  {n:4d} cases {log.seconds[op]:6.1f} s  {op}")
    assert not log.failures, "\n".join(f"- {v}" for v in log.failures.values())
    assert health.status_code == 200, health.text
    return log


def test_fuzz_no_server_errors(fuzz_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    log = run_fuzz(fuzz_server, capsys, generating=6, other=10, derandomize=True)
    assert set(log.cases) >= {f"POST {p}" for p in GENERATING}  # every generating route was reached


@pytest.mark.slow
def test_fuzz_larger_sweep(fuzz_server: RunningServer, capsys: pytest.CaptureFixture[str]) -> None:
    run_fuzz(fuzz_server, capsys, generating=50, other=80, derandomize=False)
