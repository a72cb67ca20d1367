"""Write deploy/helm/loraplex/values.schema.json: the chart's values, with `config` allowed exactly the
`loraplex serve` flags that no named value sets (by config field name), so Helm refuses a misspelled flag.

    python scripts/helm_values_schema.py          (tests/deploy/test_helm.py checks the file is current)
"""

from __future__ import annotations

import dataclasses
import json
import sys
from pathlib import Path
from typing import Any

from loraplex.cli import CONFIG_CLASSES
from loraplex.config import ServerConfig

SCHEMA = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "loraplex" / "values.schema.json"
NAMED = {  # config field → the chart value that sets it (or the chart itself)
    "model": "modelId", "max_loras": "maxLoras", "max_lora_rank": "maxLoraRank", "adapter_source": "adapterSource",
    "allow_request_sources": "allowRequestSources", "preloaded_adapter_ids": "preloadedAdapterIds",
    "shutdown_timeout_s": "shutdownTimeoutSeconds", "adapter_roots": "adapters.volume",
    "s3_endpoint_url": "s3.endpointUrl", "admin_token": "adminToken", "hub_token": "hubToken",
    "hostname": "(the chart: 0.0.0.0)", "port": "(the chart: 3000)",
}
SCALAR = {"type": ["string", "number", "integer", "boolean", "array", "null"]}
SECRET_REF = {"type": "object", "additionalProperties": False,
              "properties": {"existingSecret": {"type": "string"}, "key": {"type": "string"}}}


def flag_fields() -> list[str]:
    return [f.name for cls in (ServerConfig, *CONFIG_CLASSES) for f in dataclasses.fields(cls)]


def schema() -> dict[str, Any]:
    config = {name: SCALAR for name in flag_fields() if name not in NAMED}
    obj = {"type": "object"}
    return {
        "$schema": "https://json-schema.org/draft-07/schema#",
        "title": "loraplex chart values",
        "type": "object",
        "additionalProperties": False,
        "properties": {
            "replicaCount": {"type": "integer", "minimum": 0},
            "image": {"type": "object", "additionalProperties": False, "required": ["repository", "tag"],
                      "properties": {"repository": {"type": "string"}, "tag": {"type": "string"},
                                     "pullPolicy": {"enum": ["Always", "IfNotPresent", "Never"]}}},
            "imagePullSecrets": {"type": "array"},
            "modelId": {"type": "string", "minLength": 1},
            "maxLoras": {"type": "integer", "minimum": 0},
            "maxLoraRank": {"type": "integer", "minimum": 1},
            "preloadedAdapterIds": {"type": "array", "items": {"type": "string"}},
            "adapterSource": {"enum": ["local", "hub", "s3"]},
            "allowRequestSources": {"type": "array", "items": {"enum": ["local", "hub", "s3"]}},
            "config": {"type": "object", "additionalProperties": False, "properties": config},
            "adminToken": SECRET_REF,
            "hubToken": SECRET_REF,
            "s3": {"type": "object", "additionalProperties": False,
                   "properties": {k: {"type": "string"} for k in ("endpointUrl", "region", "credentialsSecret")}},
            "adapters": {"type": "object", "additionalProperties": False, "properties": {"volume": obj}},
            "persistence": {"type": "object", "additionalProperties": False,
                            "properties": {"enabled": {"type": "boolean"}, "size": {"type": "string"},
                                           "storageClass": {"type": "string"}, "accessModes": {"type": "array"}}},
            "service": {"type": "object", "additionalProperties": False,
                        "properties": {"type": {"enum": ["ClusterIP", "NodePort", "LoadBalancer"]},
                                       "port": {"type": "integer", "minimum": 1, "maximum": 65535}}},
            "resources": obj,
            "gpus": {"type": "integer", "minimum": 0},
            "startupSeconds": {"type": "integer", "minimum": 10},
            "terminationGracePeriodSeconds": {"type": "integer", "minimum": 0},
            "shutdownTimeoutSeconds": {"type": "number", "minimum": 0},
            "podDisruptionBudget": {"type": "object", "additionalProperties": False,
                                    "properties": {"enabled": {"type": "boolean"},
                                                   "maxUnavailable": {"type": ["integer", "string"]}}},
            "serviceMonitor": {"type": "object", "additionalProperties": False,
                               "properties": {"enabled": {"type": "boolean"}, "interval": {"type": "string"},
                                              "labels": obj}},
            "podSecurityContext": obj, "securityContext": obj, "nodeSelector": obj, "affinity": obj,
            "podAnnotations": obj, "tolerations": {"type": "array"}, "extraEnv": {"type": "array"},
            "extraVolumes": {"type": "array"}, "extraVolumeMounts": {"type": "array"},
        },
    }


def render() -> str:
    return json.dumps(schema(), indent=2) + "\n"


if __name__ == "__main__":
    SCHEMA.write_text(render())
    print(f"wrote {SCHEMA}", file=sys.stderr)
