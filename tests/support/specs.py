"""Custom resources as the API server stores them (defaults applied), for pure tests."""

from __future__ import annotations

import copy
from typing import Any

from tests.support.crd import EXAMPLES, load

DEFAULTS: dict[str, Any] = {
    "model": {"encoderPath": "", "mountPath": "/models"},
    "runtime": {"imagePullPolicy": "IfNotPresent", "backend": "sglang", "serviceAccountName": ""},
    "deepstack": {"enabled": True, "numLayers": 3, "hiddenSize": 2048, "dtype": "bfloat16"},
    "transfer": {
        "backend": "mooncake",
        "protocol": "tcp",
        "rdmaDevices": [],
        "rdmaResourceName": "rdma/hca_shared_devices_a",
        "blockTokens": 256,
        "defaultAllocationTokens": 4096,
        "poolBlocks": 1024,
        "bootstrapPort": 8998,
        "handshakeTimeoutSeconds": 10,
        "transferTimeoutSeconds": 60,
        "resumption": {"maxRounds": 8, "timeoutSeconds": 30},
    },
    "encode": {"replicas": 1, "tensorParallelSize": 1, "resources": {}},
    "language": {"replicas": 1, "tensorParallelSize": 1, "resources": {}},
    "router": {"enabled": True, "replicas": 1, "port": 8000},
    "rollout": {"maxUnavailable": 1},
    "networkPolicy": {"enabled": True},
    "monitoring": {"podMonitor": True, "metricsPort": 9090},
}


def _merge(defaults: dict[str, Any], given: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(defaults)
    for key, value in given.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def stored(obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """What the API server would store for `obj`: defaults, namespace, uid, generation."""
    out = copy.deepcopy(obj)
    out["spec"] = _merge(DEFAULTS, obj["spec"])
    out["metadata"] = {
        **obj["metadata"],
        "namespace": namespace,
        "uid": "00000000-0000-0000-0000-000000000001",
        "generation": 1,
    }
    return out


def example(stem: str) -> dict[str, Any]:
    (path,) = [p for p in EXAMPLES if p.stem == stem]
    return stored(load(path))
