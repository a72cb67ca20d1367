"""The Helm chart (deploy/helm/loraplex): `helm lint` and `helm template` with the default, GPU and S3 values,
every rendered object checked against the Kubernetes schemas (kubernetes-validate, offline), and the
ConfigMap's environment parsed by `loraplex serve`'s own flag parser."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml

from loraplex.cli import build_parser
from scripts import helm_values_schema

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "loraplex"
VALUES = {"default": None, "gpu": CHART / "ci" / "gpu-values.yaml", "s3": CHART / "ci" / "s3-values.yaml"}
KUBERNETES = "1.30.0"


def helm(*args: str) -> subprocess.CompletedProcess[str]:
    exe = shutil.which("helm")
    assert exe, "helm is not installed (the test extra's helm-binary provides it)"
    return subprocess.run([exe, *args], capture_output=True, text=True, timeout=120)


def render(values: Path | None, *extra: str) -> dict[str, dict[str, Any]]:
    """The chart's objects by kind, rendered as release `t`."""
    proc = helm("template", "t", str(CHART), *(["-f", str(values)] if values else []), *extra)
    assert proc.returncode == 0, proc.stderr
    objects = [o for o in yaml.safe_load_all(proc.stdout) if o]
    by_kind = {o["kind"]: o for o in objects}
    assert len(by_kind) == len(objects), "one object of each kind"
    return by_kind


@pytest.mark.parametrize("name", list(VALUES))
def test_chart_lints_and_renders_schema_valid_objects(name: str) -> None:
    values = VALUES[name]
    lint = helm("lint", "--strict", str(CHART), *(["-f", str(values)] if values else []))
    assert lint.returncode == 0, lint.stdout + lint.stderr
    for kind, obj in render(values).items():
        if kind == "ServiceMonitor":  # a CRD (prometheus-operator): no schema in Kubernetes' own
            assert obj["apiVersion"] == "monitoring.coreos.com/v1"
            assert obj["spec"]["endpoints"] == [{"port": "http", "path": "/metrics", "interval": "15s"}]
            continue
        kubernetes_validate.validate(obj, KUBERNETES, strict=True)


def _container(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    (container,) = objects["Deployment"]["spec"]["template"]["spec"]["containers"]
    return container


def _env(objects: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The container's environment: its ConfigMap's data, then its own `env` entries."""
    env: dict[str, Any] = dict(objects["ConfigMap"]["data"])
    env.update({e["name"]: e.get("value", e.get("valueFrom")) for e in _container(objects)["env"]})
    return env


def test_default_values_a_single_cpu_replica_with_probes_and_no_root() -> None:
    objects = render(None)
    assert set(objects) == {"ConfigMap", "Deployment", "Service"}  # no PDB for one replica, no PVC
    pod = objects["Deployment"]["spec"]["template"]["spec"]
    container = _container(objects)
    assert container["livenessProbe"]["httpGet"]["path"] == "/health"
    assert container["readinessProbe"]["httpGet"]["path"] == "/ready"
    startup = container["startupProbe"]
    assert startup["httpGet"]["path"] == "/health" and startup["periodSeconds"] * startup["failureThreshold"] >= 600
    assert pod["securityContext"]["runAsNonRoot"] and pod["securityContext"]["runAsUser"] == 1000
    assert pod["terminationGracePeriodSeconds"] > int(objects["ConfigMap"]["data"]["LORAPLEX_SHUTDOWN_TIMEOUT_S"])
    assert {"name": "data", "emptyDir": {}} in pod["volumes"]
    assert "nvidia.com/gpu" not in container["resources"].get("limits", {})
    env = _env(objects)
    assert env["LORAPLEX_HOSTNAME"] == "0.0.0.0" and env["LORAPLEX_MODEL"] == "demo"


def test_gpu_values_gpus_replicas_disruption_budget_disk_tier_and_metrics() -> None:
    objects = render(VALUES["gpu"])
    assert set(objects) == {"ConfigMap", "Deployment", "Service", "PersistentVolumeClaim", "PodDisruptionBudget",
                            "ServiceMonitor"}
    assert objects["Deployment"]["spec"]["replicas"] == 2
    assert _container(objects)["resources"]["limits"] == {"memory": "64Gi", "nvidia.com/gpu": 1}
    pvc = objects["PersistentVolumeClaim"]
    assert pvc["spec"]["resources"]["requests"]["storage"] == "200Gi" and pvc["spec"]["storageClassName"] == "fast-ssd"
    volumes = objects["Deployment"]["spec"]["template"]["spec"]["volumes"]
    assert {"name": "data", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in volumes
    assert objects["ServiceMonitor"]["metadata"]["labels"]["release"] == "prometheus"
    env = _env(objects)
    assert env["LORAPLEX_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "loraplex-admin", "key": "token"}}
    assert env["LORAPLEX_KV_CACHE_BYTES"] == "68719476736"  # a large whole number stays an integer


def test_s3_values_credentials_and_tokens_from_secrets_adapters_read_only() -> None:
    objects = render(VALUES["s3"])
    container = _container(objects)
    assert {"secretRef": {"name": "loraplex-s3"}} in container["envFrom"]
    env = _env(objects)
    assert env["LORAPLEX_S3_ENDPOINT_URL"] == "http://minio.storage.svc:9000"
    assert env["LORAPLEX_ADMIN_TOKEN"] == {"secretKeyRef": {"name": "loraplex-admin", "key": "admin-token"}}
    assert env["LORAPLEX_ADAPTER_ROOTS"] == "/adapters"
    assert {"name": "adapters", "mountPath": "/adapters", "readOnly": True} in container["volumeMounts"]
    assert not any(isinstance(v, str) and "SECRET" in k for k, v in env.items())  # no credential in plain text


@pytest.mark.parametrize("name", list(VALUES))
def test_the_configmap_is_what_loraplex_serve_parses(name: str, monkeypatch: pytest.MonkeyPatch) -> None:
    # Every variable the chart sets is a real flag's, with a value its parser takes.
    data = render(VALUES[name], "--set", "config.max_num_seqs=64", "--set", "config.enable_prefix_caching=false")[
        "ConfigMap"]["data"]
    for key, value in data.items():
        if key.startswith("LORAPLEX_"):
            monkeypatch.setenv(key, value)
    args = build_parser().parse_args(["serve"])
    flags = vars(args)
    for key in data:
        if key.startswith("LORAPLEX_"):
            assert key.removeprefix("LORAPLEX_").lower() in flags, key
    assert args.max_num_seqs == 64 and args.enable_prefix_caching is False
    assert args.max_loras == yaml.safe_load(VALUES[name].read_text()).get("maxLoras", 4) if VALUES[name] else 4
    if name == "s3":
        assert args.adapter_source == "s3" and args.preloaded_adapter_ids == (
            "s3://adapters/customer-a", "s3://adapters/customer-b")


def test_a_misspelled_flag_is_refused_and_the_schema_is_current() -> None:
    proc = helm("template", "t", str(CHART), "--set", "config.max_num_seq=3")
    assert proc.returncode != 0 and "max_num_seq is not allowed" in proc.stderr
    assert json.loads((CHART / "values.schema.json").read_text()) == json.loads(helm_values_schema.render()), (
        "values.schema.json is stale: run python scripts/helm_values_schema.py")
    config = helm_values_schema.schema()["properties"]["config"]["properties"]
    named = set(helm_values_schema.NAMED)
    assert set(config) | named == set(helm_values_schema.flag_fields()) and not set(config) & named
