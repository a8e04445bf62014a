"""Custom resources as the API server stores them (the CRD's defaults applied), for pure
tests; test_crd checks this against what the API server stores."""

from __future__ import annotations

import copy
import functools
from typing import Any

from devkit.crd import CRD_FILE, EXAMPLES, load


@functools.cache
def _schema() -> dict[str, Any]:
    crd = load(CRD_FILE)
    (version,) = crd["spec"]["versions"]
    spec: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["spec"]
    return spec


def apply_defaults(schema: dict[str, Any], value: Any) -> Any:
    """Structural defaulting as the API server does it, from the CRD's own `default`s: a
    missing property with a default gets it, then defaulting goes on inside objects
    (defaulted ones included) and array items. The only source of the defaults."""
    if isinstance(value, dict) and schema.get("type") == "object":
        out = copy.deepcopy(value)
        for key, prop in (schema.get("properties") or {}).items():
            if key not in out and "default" in prop:
                out[key] = copy.deepcopy(prop["default"])
            if key in out:
                out[key] = apply_defaults(prop, out[key])
        extra = schema.get("additionalProperties")
        if isinstance(extra, dict):
            for key in set(out) - set(schema.get("properties") or {}):
                out[key] = apply_defaults(extra, out[key])
        return out
    if isinstance(value, list) and schema.get("type") == "array":
        return [apply_defaults(schema.get("items") or {}, v) for v in value]
    return value


def defaulted(obj: dict[str, Any]) -> dict[str, Any]:
    """`obj` with its spec defaulted (again) from the CRD; metadata as it is."""
    return {**obj, "spec": apply_defaults(_schema(), obj["spec"])}


def stored(obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
    """What the API server would store for `obj`: defaults, namespace, uid, generation."""
    out = copy.deepcopy(obj)
    out["spec"] = apply_defaults(_schema(), obj["spec"])
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
