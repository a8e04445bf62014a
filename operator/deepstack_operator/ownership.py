"""Handing a field over to another controller without server-side apply dropping it.

When a role gets an autoscaler, the rendered StatefulSet stops carrying `spec.replicas`
(the HorizontalPodAutoscaler owns the count). Applied as is, server-side apply would
remove the field we owned until then, and the StatefulSet would fall to the default of
one replica until the autoscaler acts. So we keep applying the live count until another
manager has written the field; from then on it is theirs and we leave it out.
"""

from __future__ import annotations

import copy
from typing import Any

from deepstack_operator.names import FIELD_MANAGER

Manifest = dict[str, Any]


def replica_owners(live: Manifest) -> set[str]:
    """Managers recorded as owning `spec.replicas` of a live object."""
    owners = set()
    for entry in live.get("metadata", {}).get("managedFields") or []:
        fields = (entry.get("fieldsV1") or {}).get("f:spec") or {}
        if "f:replicas" in fields:
            owners.add(str(entry.get("manager", "")))
    return owners


def keep_replicas_until_handed_over(manifest: Manifest, live: Manifest | None) -> Manifest:
    """`manifest`, with the live replica count added while we alone own that field and
    the manifest leaves it out; unchanged otherwise."""
    if live is None or "replicas" in manifest.get("spec", {}):
        return manifest
    if replica_owners(live) != {FIELD_MANAGER}:
        return manifest  # handed over already (or never ours): leaving it out drops nothing
    replicas = (live.get("spec") or {}).get("replicas")
    if replicas is None:
        return manifest
    kept = copy.deepcopy(manifest)
    kept["spec"]["replicas"] = replicas
    return kept
