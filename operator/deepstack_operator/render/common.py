"""Pieces every renderer uses: metadata with owner references, spec access with defaults."""

from __future__ import annotations

import hashlib
import json
from typing import Any

from deepstack_operator import names

Manifest = dict[str, Any]


def cr_name(cr: Manifest) -> str:
    return str(cr["metadata"]["name"])


def cr_namespace(cr: Manifest) -> str:
    return str(cr["metadata"]["namespace"])


def spec(cr: Manifest) -> dict[str, Any]:
    value = cr.get("spec", {})
    assert isinstance(value, dict)
    return value


def owner_reference(cr: Manifest) -> dict[str, Any]:
    return {
        "apiVersion": names.API_VERSION,
        "kind": names.KIND,
        "name": cr_name(cr),
        "uid": cr["metadata"]["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def metadata(cr: Manifest, name: str, role: str | None = None) -> dict[str, Any]:
    return {
        "name": name,
        "namespace": cr_namespace(cr),
        "labels": names.common_labels(cr_name(cr), role),
        "ownerReferences": [owner_reference(cr)],
    }


def content_hash(value: Any) -> str:
    """Stable short hash of JSON-able content (for pod-template annotations)."""
    data = json.dumps(value, sort_keys=True, separators=(",", ":")).encode()
    return hashlib.sha256(data).hexdigest()[:16]


def scaled_by_hpa(cr: Manifest) -> set[str]:
    """Pod groups a HorizontalPodAutoscaler sizes (autoscaling.policy HPA)."""
    autoscaling = spec(cr).get("autoscaling") or {}
    if autoscaling.get("policy", "HPA") != "HPA":
        return set()
    return {role for role in names.ROLES if role in autoscaling}


def scaled_by_load(cr: Manifest) -> set[str]:
    """Pod groups the operator sizes from their load (autoscaling.policy Load)."""
    autoscaling = spec(cr).get("autoscaling") or {}
    if autoscaling.get("policy", "HPA") != "Load":
        return set()
    return {role for role in names.ROLES if role in autoscaling}
